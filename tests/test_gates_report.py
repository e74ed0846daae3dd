import pytest

from tasks.gates import GateFailed, enforce_gates, evaluate_gates
from tasks.recipe import Recipe
from tasks.report import render_report


def results(base, merged, served):
    row = lambda a: {"anchor_accuracy": a, "strict_parse": a, "src_dst_accuracy": 0.0, "anchor_loose": a,
                     "rows": 10, "runner": "x", "tokens_per_second": 1.0}
    return {"base": row(base), "merged": row(merged), "gguf-q8_0": row(served)}


def test_gates_pass_and_fail_with_numbers():
    recipe = Recipe(name="x")
    passing = evaluate_gates(recipe, results(0.0, 0.5, 0.48), "gguf-q8_0")
    assert [g.passed for g in passing] == [True, True]
    failing = evaluate_gates(recipe, results(0.1, 0.2, 0.05), "gguf-q8_0")
    assert [g.passed for g in failing] == [False, False]
    assert failing[0].observed == "0.200 - 0.100 = +0.100"
    with pytest.raises(GateFailed, match="model-performance failed: 0.200 - 0.100 = \\+0.100"):
        enforce_gates.fn([g.as_dict() for g in failing])
    enforce_gates.fn([g.as_dict() for g in passing])   # nothing raised


def test_report_shows_every_model_gate_and_stage(tmp_path):
    recipe = Recipe(name="x")
    gates = [g.as_dict() for g in evaluate_gates(recipe, results(0.0, 0.1, 0.1), "gguf-q8_0")]
    text = render_report(recipe, tmp_path, results(0.0, 0.1, 0.1), gates, {"mask": {}},
                         {"train": {"seconds": 12.0, "status": "ok"}}, {})
    assert "gates FAILED" in text and "**FAIL**" in text
    for label in ("| base |", "| merged |", "| gguf-q8_0 |", "| train | 12.0 | ok |"):
        assert label in text
