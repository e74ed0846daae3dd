"""The Fledgling flow's view of a finetune run folder: what it offers to evaluate, and whether the leg finished."""

import json

import pytest

from tasks.eval.fledgling import locate_finetuned, require_finished_finetune
from tasks.run import RunFolder, mark_complete, new_run_dir


@pytest.fixture
def finetune_run(tmp_path) -> RunFolder:
    run = RunFolder(new_run_dir(tmp_path, "fledgling-toolcall"))
    (run.merged_dir / "config.json").write_text("{}")
    run.recipe_json.write_text(json.dumps({"export": {"serve_type": "q4_k_m"}}))
    run.gguf("q4_k_m").write_bytes(b"GGUF")
    return run


def test_a_finished_run_offers_its_merged_model_served_gguf_and_gate_verdicts(finetune_run):
    gates = [{"name": "model-performance", "passed": True}, {"name": "loss-converged", "passed": False}]
    mark_complete(finetune_run, {"gates": gates})
    assert require_finished_finetune.fn(str(finetune_run), "Failed") == str(finetune_run)   # failed gates: a verdict
    found = locate_finetuned.fn(str(finetune_run), "Failed")
    assert found == {"run_dir": str(finetune_run), "state": "Failed", "model_dir": str(finetune_run.merged_dir),
                     "adapter_dir": None, "gguf": str(finetune_run.gguf("q4_k_m")), "lora_gguf": None,
                     "gates": gates, "gates_passed": False}


def test_a_leg_that_stopped_before_its_report_is_an_error(finetune_run):
    with pytest.raises(RuntimeError, match="ended Crashed before its report: out of memory"):
        require_finished_finetune.fn(str(finetune_run), "Crashed", "out of memory")


def test_a_folder_without_a_model_is_refused(tmp_path):
    run = RunFolder(new_run_dir(tmp_path, "empty"))
    with pytest.raises(FileNotFoundError, match="no merged model"):
        locate_finetuned.fn(str(run))
