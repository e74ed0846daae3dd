"""The finetune flow's evaluation path: base (its cached f16 GGUF) and merged (the run's f16 GGUF) measured by
llama.cpp's server, greedily, on the test split and on a recipe eval file's rows written into the run."""

import json
from pathlib import Path

import pytest

from tasks.data.prepare import write_eval_file_split
from tasks.eval.measure import serve_and_measure_gguf
from tasks.export.convert import base_model_gguf
from tasks.recipe import DeployConfig, EvalConfig
from tasks.run import RunFolder, read_jsonl
from conftest import REPO

pytestmark = pytest.mark.integration


def test_base_and_merged_are_measured_by_llama_server_on_test_and_eval_file_rows(exported_run, base_model_dir,
                                                                                  tmp_path):
    run_dir, recipe, ggufs = exported_run
    run = RunFolder(run_dir)
    eval_file = tmp_path / "hand.jsonl"
    eval_file.write_text("\n".join((REPO / "data" / "slipstream-handwritten.jsonl").read_text().splitlines()[:2]))
    name = write_eval_file_split.fn(run_dir, str(eval_file), recipe.model.system_prompt, "slipstream")
    assert name == "hand" and len(read_jsonl(run.split(name))) == 2
    ev = EvalConfig(max_new_tokens=24)

    label = f"merged@{name}"
    merged = serve_and_measure_gguf.fn(run_dir, label, Path(ggufs["f16"]), ev, DeployConfig(),
                                       tokenizer_dir=base_model_dir, split=name)
    assert merged["rows"] == 2 and merged["runner"] == "llama.cpp server" and merged["recipient_rows"] == 2
    first = read_jsonl(run.predictions(label))
    assert [p["id"] for p in first] == ["hand-01", "hand-02"] and all(p["answer"].strip() for p in first)
    assert json.loads(run.eval_metrics(label).read_text())["model_name"] == "model-f16.gguf"
    # Greedy (temperature 0, repeat_penalty 1.0): the same GGUF gives the same answers again.
    serve_and_measure_gguf.fn(run_dir, label, Path(ggufs["f16"]), ev, DeployConfig(), tokenizer_dir=base_model_dir,
                              split=name)
    assert [p["answer"] for p in read_jsonl(run.predictions(label))] == [p["answer"] for p in first]

    base_gguf = base_model_gguf.fn(base_model_dir)
    assert base_gguf.read_bytes()[:4] == b"GGUF" and base_model_gguf.fn(base_model_dir) == base_gguf   # cached
    # eval.base_rows: the base on the first rows of the test split only.
    base = serve_and_measure_gguf.fn(run_dir, "base", base_gguf, ev, DeployConfig(), tokenizer_dir=base_model_dir,
                                     max_rows=1)
    test_rows = read_jsonl(run.split("test"))
    assert len(test_rows) > 1 and base["rows"] == 1 and base["runner"] == "llama.cpp server"
    assert [p["prompt"] for p in read_jsonl(run.predictions("base"))] == [test_rows[0]["messages"][-2]["content"]]
    assert run.server_log("base").exists()
