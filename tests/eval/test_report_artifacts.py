"""Results and gates are Prefect table artifacts, and the report's images show in the Prefect UI (embedded as
data URIs in the Markdown artifact; report.md keeps its relative links beside the files)."""

import json

from prefect import flow

from tasks.names import artifact_key
from tasks.recipe import Recipe
from tasks.release.report import write_eval_report
from tasks.run import RunFolder, new_run_dir


def _summary(accuracy: float) -> dict:
    return {"anchor_accuracy": accuracy, "strict_parse": accuracy, "src_dst_accuracy": 0.0, "anchor_loose": accuracy,
            "payload_f1": accuracy, "rows": 4, "runner": "llama.cpp server", "failed_calls": 1,
            "latency_p50_s": 0.5, "per_anchor": {}, "cost": {}}


def test_an_evaluation_report_publishes_tables_and_embedded_images(tmp_path):
    from prefect.client.orchestration import get_client

    recipe = Recipe(name="qwen2.5-art")
    run = RunFolder(new_run_dir(tmp_path, "qwen2.5-art"))
    decision = {"action": "keep-llm", "reason": "r", "metric": "anchor_accuracy", "margin": 0.05}
    gates = [{"name": "model-performance", "passed": False, "threshold": ">= 0.2", "observed": "+0.1"}]

    @flow(name="publish-eval-report")
    def publish():
        return write_eval_report(recipe, run, {"base": _summary(0.25), "llm": _summary(0.75)}, [decision],
                                 {"run_dir": "x", "state": "Completed", "gates_passed": False, "gates": gates})

    assert publish() == run.report_md
    assert "![comparison](metrics/eval-chart.png)" in run.report_md.read_text()
    with get_client(sync_client=True) as client:
        arts = {a.key: a for a in client.read_artifacts() if a.key and "qwen2-5-art" in a.key}
    report = arts[artifact_key("evaluation", recipe.name)]
    assert "](data:image/png;base64,iVBORw0KGgo" in report.data and "](metrics/" not in report.data
    results, gate_table = arts["results-qwen2-5-art"], arts["gates-qwen2-5-art"]
    assert results.type == gate_table.type == "table"
    rows = results.data if isinstance(results.data, list) else json.loads(results.data)
    assert [(r["model"], r["failed calls"], r["anchor acc."]) for r in rows] == [("base", 1, 0.25), ("llm", 1, 0.75)]
    assert "FAIL" in str(gate_table.data) and "model-performance" in str(gate_table.data)
