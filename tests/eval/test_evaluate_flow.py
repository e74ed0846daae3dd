"""The `evaluate` flow end to end with real models: SmolLM2 as the SLM (transformers or llama.cpp), a local
llama.cpp server as the 'LLM baseline', real fine-tuning in the Fledgling leg, Langfuse to a local receiver."""

import json
import subprocess
import sys

import pytest

from receivers import LangfuseReceiver
from tasks import tracing
from tasks.eval.decision import decide
from tasks.tasktypes import task_type
from tasks.recipe import load_recipe
from tasks.run import is_complete

from conftest import REPO

pytestmark = pytest.mark.integration


def test_slipstream_base_vs_finetuned_vs_llm_with_every_call_traced(trained_run, base_model_dir, tmp_path,
                                                                      monkeypatch):
    from flows.evaluate import evaluate

    finetuned_run, _ = trained_run
    overrides = {"baseline.source": "local-gguf", "data.eval_rows": 4, "eval.batch_size": 4, "eval.max_new_tokens": 64}
    with LangfuseReceiver() as receiver:
        for key, value in receiver.env().items():
            monkeypatch.setenv(key, value)
        tracing.reset()
        run_dir = evaluate(recipe="slipstream", finetuned_run=str(finetuned_run), overrides=overrides,
                           output_root=str(tmp_path / "runs"), run_name="slipstream-eval")
        metrics = task_type("slipstream").metric_keys
        expected_scores = 3 * (4 * len(metrics) + len(metrics)) + 1   # rows, aggregates, the decision
        receiver.wait_for(lambda: len(receiver.generations()) == 12 and len(receiver.scores) == expected_scores)
    tracing.reset()
    results = json.loads((tmp_path / "runs" / "slipstream-eval" / "metrics" / "eval.json").read_text())
    assert list(results) == ["base", "llm", "fine-tuned"]
    assert results["fine-tuned"]["runner"] == "transformers" and results["llm"]["runner"] == "llama.cpp server"
    decision = json.loads((tmp_path / "runs" / "slipstream-eval" / "metrics" / "decision.json").read_text())
    [only] = decision["decisions"]   # a fine-tuned run was given: decide once, never fine-tune again
    recipe = load_recipe("slipstream", overrides)
    assert only == decide(recipe, results, finetune_gates_passed=None).as_dict()   # the fixture has no gates
    report = (tmp_path / "runs" / "slipstream-eval" / "report.md").read_text()
    for text in ("| base | transformers |", "| llm | llama.cpp server |", "| fine-tuned | transformers |",
                 "### SLIP message tokens vs the natural-language instruction", "| gold answers | 4 |",
                 "### Accuracy per anchor",
                 "est. USD per 1k requests", f"decision: **{only['action']}**"):
        assert text in report
    assert (tmp_path / "runs" / "slipstream-eval" / "metrics" / "eval-chart.png").stat().st_size > 10_000
    assert is_complete(run_dir)
    gens = receiver.generations()
    assert sorted(g["name"] for g in gens) == ["base"] * 4 + ["fine-tuned"] * 4 + ["llm"] * 4
    assert {g["trace_id"] for g in gens} == {tracing.trace_id_for("slipstream-eval")}
    assert all(json.loads(g["attributes"]["langfuse.observation.usage_details"])["output"] > 0 for g in gens)
    assert {s["name"] for s in receiver.scores} == set(metrics) | {"decision"}
    assert [s["value"] for s in receiver.scores if s["name"] == "decision"] == [only["action"]]


@pytest.mark.parametrize("track, metric", [("structured", "valid_json"), ("toolcall", "valid_call")])
def test_fledgling_decision_flow_runs_end_to_end(track, metric, tmp_path, base_model_dir, monkeypatch):
    """Both tracks: measure, decide, fine-tune (a few real steps), re-evaluate, decide again. The primary metric
    is the format metric so that the stand-in LLM (grammar-constrained, so always well-formed) leads the raw
    SLM by far and the fine-tune leg really runs. No Langfuse keys: a listening receiver gets nothing."""
    from flows.evaluate import evaluate

    overrides = {"data.eval_rows": 3, "data.train_rows": 8, "data.val_ratio": 0.0, "training.max_steps": 3,
                 "training.logging_steps": 1,
                 "eval.max_new_tokens": 64, "eval.batch_size": 4, "eval.primary_metric": metric}
    with LangfuseReceiver() as receiver:
        monkeypatch.setenv("LANGFUSE_BASE_URL", receiver.url)
        monkeypatch.delenv("LANGFUSE_PUBLIC_KEY", raising=False)
        monkeypatch.delenv("LANGFUSE_SECRET_KEY", raising=False)
        tracing.reset()
        evaluate(recipe=f"fledgling-{track}", overrides=overrides, output_root=str(tmp_path / "runs"),
                 run_name=f"{track}-eval")
    assert receiver.requests == []
    run = tmp_path / "runs" / f"{track}-eval"
    results = json.loads((run / "metrics" / "eval.json").read_text())
    trail = json.loads((run / "metrics" / "decision.json").read_text())
    first, final = trail["decisions"][0], trail["decisions"][-1]
    recipe = load_recipe(f"fledgling-{track}", overrides)
    assert first["action"] == "fine-tune", first   # the raw SLM cannot keep to the format yet
    assert first == decide(recipe, {k: results[k] for k in ("base", "llm")}).as_dict()
    finetune = trail["finetune"]
    ft_run = tmp_path / "runs" / f"{track}-eval-finetune"
    assert finetune["run_dir"] == str(ft_run) and is_complete(ft_run) and (ft_run / "report.md").exists()
    assert [g["name"] for g in finetune["gates"]] == ["baseline-established", "model-performance",
                                                      "loss-converged", "quantization-verified",
                                                      "template-verified"]
    assert final == decide(recipe, results, finetune["gates_passed"]).as_dict()
    assert results["fine-tuned"]["runner"] == "llama.cpp server" and results["fine-tuned"]["rows"] == 3
    ft_report = (ft_run / "report.md").read_text()
    assert "| llm | llama.cpp server |" in ft_report and "LLM baseline" in ft_report
    assert f"decision: **{final['action']}**" in (run / "report.md").read_text()


def test_a_user_eval_file_with_a_bad_line_is_rejected_naming_the_line(tmp_path):
    rows = (REPO / "data" / "fledgling-toolcall.jsonl").read_text().splitlines()[:4]
    bad = json.loads(rows[2])
    bad["expected"]["name"] = "launch_rocket"
    rows[2] = json.dumps(bad)
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(rows) + "\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "evaluate", "fledgling-toolcall",
                           "--eval-file", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{path}:3: toolcall: expected tool 'launch_rocket' is not in 'tools'" in proc.stderr
    assert "Traceback" not in proc.stderr
