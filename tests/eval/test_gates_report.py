import pytest

from tasks.eval.gates import GateFailed, enforce_gates, evaluate_gates
from tasks.recipe import Recipe, load_recipe
from tasks.release.report import render_eval_report, render_report


def results(base, merged, served, **extra):
    row = lambda a: {"anchor_accuracy": a, "strict_parse": a, "src_dst_accuracy": 0.0, "anchor_loose": a,
                     "payload_f1": a, "rows": 10, "runner": "x", "tokens_per_second": 1.0, "latency_p50_s": 0.5,
                     "per_anchor": {"RequestReview": a}, "cost": {"usd_per_1k_requests": 0.01, "basis": "$0.05/h"},
                     "slip_tokens": {"rows": 10, "instruction": 200, "slip": 80, "json": 240,
                                     "reduction_vs_instruction": 0.6, "reduction_vs_json": 0.6667}}
    return {"base": row(base), "merged": row(merged), "gguf-q8_0": row(served)} | {k: row(v) for k, v in extra.items()}


def training(*losses):
    return {"history": [{"step": i, "loss": x} for i, x in enumerate(losses)], "mask": {}}


def test_gates_pass_and_fail_with_numbers():
    recipe = Recipe(name="x")
    passing = evaluate_gates(recipe, results(0.0, 0.5, 0.48), "gguf-q8_0", training(3.0, 2.0, 1.2))
    assert [g.name for g in passing] == ["baseline-established", "model-performance", "loss-converged",
                                         "quantization-verified"]
    assert [g.passed for g in passing] == [True, True, True, True]
    failing = evaluate_gates(recipe, results(0.1, 0.2, 0.05), "gguf-q8_0", training(3.0, 7.0, 2.5))
    assert [g.passed for g in failing] == [True, False, False, False]
    assert failing[1].observed == "0.200 - 0.100 = +0.100"
    assert failing[2].observed == "first 3.000, final 2.500, max 7.000 over 3 logged steps"
    with pytest.raises(GateFailed, match="model-performance failed: 0.200 - 0.100 = \\+0.100"):
        enforce_gates.fn([g.as_dict() for g in failing])
    enforce_gates.fn([g.as_dict() for g in passing])   # nothing raised


def test_a_drop_of_exactly_the_limit_passes():
    # 55 vs 51 right answers of 80 is a drop of exactly 0.05, which floats compute as 0.050000000000000044
    recipe = Recipe(name="x")
    recipe.eval.max_quant_drop, recipe.eval.min_improvement = 0.05, 0.6875
    gates = evaluate_gates(recipe, results(0.0, 55 / 80, 51 / 80), "gguf-q8_0")
    assert [(g.name, g.passed) for g in gates] == [("baseline-established", True), ("model-performance", True),
                                                   ("quantization-verified", True)]


def test_loss_gate_catches_nan_and_a_loss_that_did_not_drop():
    recipe = Recipe(name="x")
    nan = evaluate_gates(recipe, results(0, 1, 1), "gguf-q8_0", training(3.0, float("nan"), 1.0))[2]
    flat = evaluate_gates(recipe, results(0, 1, 1), "gguf-q8_0", training(3.0, 3.1))[2]
    assert not nan.passed and not flat.passed


def test_baseline_gate_needs_the_llm_when_the_recipe_names_one():
    recipe = load_recipe("slipstream", {"baseline.source": "local-gguf"})
    missing = evaluate_gates(recipe, results(0.1, 0.5, 0.5), "gguf-q8_0")
    assert not missing[0].passed and "llm: not measured" in missing[0].observed
    present = evaluate_gates(recipe, results(0.1, 0.5, 0.5, llm=0.7), "gguf-q8_0")
    assert present[0].passed and "llm: 0.700 on 10 rows" in present[0].observed
    assert present[1].observed.endswith("; LLM baseline 0.700 (merged -0.200)")


def test_report_shows_every_model_gate_and_stage(tmp_path):
    recipe = Recipe(name="x")
    gates = [g.as_dict() for g in evaluate_gates(recipe, results(0.0, 0.1, 0.1), "gguf-q8_0", training(2, 1))]
    text = render_report(recipe, tmp_path, results(0.0, 0.1, 0.1), gates, {"mask": {}},
                         {"train": {"seconds": 12.0, "status": "ok"}}, {})
    assert "gates FAILED" in text and "**FAIL**" in text
    for label in ("| base |", "| merged |", "| gguf-q8_0 |", "| train | 12.0 | ok |", "| loss-converged | PASS |",
                  "| RequestReview | 0.0% | 10.0% | 10.0% |", "| base | 10 | 200 | 80 | 240 | 60.0% | 66.7% |",
                  "$0.0100 | $0.05/h |"):
        assert label in text


def budgeted_report(run_dir, budget: dict | None, seconds: float | None = None) -> str:
    """The report of a run whose training stats carry this time-budget decision (None: no budget)."""
    recipe = Recipe(name="x")
    gates = [g.as_dict() for g in evaluate_gates(recipe, results(0.0, 0.6, 0.6), "gguf-q8_0", training(2, 1))]
    stats = {"mask": {}} | ({"time_budget": budget, "seconds": seconds} if budget else {})
    return render_report(recipe, run_dir, results(0.0, 0.6, 0.6), gates, stats, {}, {})


def test_the_report_says_how_many_rows_the_time_budget_trained(tmp_path):
    budget = {"budget_s": 540.0, "probe_step_s": 0.622, "probe_s": 6.1, "predicted_train_s": 539.7,
              "rows_available": 2800, "rows_kept": 1542}
    text = budgeted_report(tmp_path, budget, 541.9)
    assert ("| time budget | 540 s: 0.622 s a probed step here, so 1542 of 2800 training rows (predicted 539.7 s, "
            "took 541.9 s) |") in text
    assert "time budget" not in budgeted_report(tmp_path, None)
    stopped = budgeted_report(tmp_path, {**budget, "stopped_at_step": 700}, 540.2)
    assert "took 540.2 s; the budget stopped training at step 700, the rest of the schedule's tail not trained) |" \
        in stopped


def test_the_data_section_counts_the_rows_a_time_budget_trained(tmp_path):
    """The split holds 6 train rows, the budget kept the first 4: the mix gets a `trained` column of those 4."""
    from tasks.data.prepare import mix_counts
    from tasks.run import RunFolder, atomic_write_json, atomic_write_jsonl

    run = RunFolder(tmp_path)
    train = [{"anchor": a, "source": "templates"} for a in ("Accept", "Accept", "Reject", "Accept", "Reject", "Reject")]
    atomic_write_jsonl(run.split("train"), train)
    atomic_write_json(run.data_stats, {"source_rows": 8, "train_rows": 6, "test_rows": 2,
                                       "mix": mix_counts({"train": train, "test": train[:2]})})
    budget = {"budget_s": 60.0, "probe_step_s": 1.0, "probe_s": 2.0, "predicted_train_s": 59.0,
              "rows_available": 6, "rows_kept": 4}
    text = budgeted_report(tmp_path, budget, 58.0)
    assert "| trained: the first train rows that fit training.time_budget_s | 4 |" in text
    assert "| anchor | trained: templates | train: templates | test: templates |" in text
    assert "| Accept | 3 | 3 | 2 |" in text and "| Reject | 1 | 3 | 0 |" in text
    assert "| **total** | 4 | 6 | 2 |" in text


def test_a_base_scored_on_fewer_rows_does_not_change_the_test_rows_the_report_names(tmp_path):
    recipe = Recipe(name="x")
    scored = results(0.0, 0.6, 0.6, **{"merged@hand": 0.5})
    scored["base"]["rows"], scored["merged@hand"]["rows"] = 3, 7   # eval.base_rows; an eval file's own rows
    gates = [g.as_dict() for g in evaluate_gates(recipe, scored, "gguf-q8_0", training(2, 1))]
    text = render_report(recipe, tmp_path, scored, gates, {"mask": {}}, {}, {})
    assert "test rows: 10 ·" in text and "base: 0.000 on 3 rows" in text
    assert "Rows scored: base 3, merged 10, gguf-q8_0 10, merged@hand 7" in text


def test_eval_report_shows_the_decision_trail(tmp_path):
    recipe = load_recipe("slipstream", {"baseline.source": "local-gguf"})
    res = {k: v for k, v in results(0.1, 0.5, 0.5, llm=0.7).items() if k in ("base", "llm")}
    decisions = [{"action": "fine-tune", "reason": "short", "metric": "anchor_accuracy", "margin": 0.05},
                 {"action": "keep-llm", "reason": "still short", "metric": "anchor_accuracy", "margin": 0.05}]
    finetune = {"run_dir": "/runs/x-finetune", "state": "Failed", "gates_passed": False,
                "gates": [{"name": "model-performance", "passed": False, "threshold": "t", "observed": "o"}]}
    text = render_eval_report(recipe, tmp_path, res, decisions, finetune, "data/x.jsonl (test split)")
    assert "decision: **keep-llm**" in text and "| 1 | fine-tune | short |" in text
    assert "gates FAILED" in text and "| model-performance | **FAIL** | t | o |" in text


def test_the_report_names_the_allocator_and_the_compiled_layers(tmp_path):
    recipe = Recipe(name="x")
    gates = [g.as_dict() for g in evaluate_gates(recipe, results(0.0, 0.6, 0.6), "gguf-q8_0", training(2, 1))]
    stats = {"mask": {}, "device": "cpu", "mixed_precision": "bf16", "world_size": 1, "allocator": "mimalloc",
             "compiled_layers": 30}
    text = render_report(recipe, tmp_path, results(0.0, 0.6, 0.6), gates, stats, {}, {})
    assert "| device | cpu (bf16), world size 1, malloc mimalloc, 30 decoder layers compiled |" in text
    plain = render_report(recipe, tmp_path, results(0.0, 0.6, 0.6), gates, {**stats, "compiled_layers": 0}, {}, {})
    assert "| device | cpu (bf16), world size 1, malloc mimalloc |" in plain


def test_the_report_names_the_averaged_steps(tmp_path):
    recipe = Recipe(name="x")
    gates = [g.as_dict() for g in evaluate_gates(recipe, results(0.0, 0.6, 0.6), "gguf-q8_0", training(2, 1))]
    stats = {"mask": {}, "steps": 40, "tail_average": {"steps": 12, "from_step": 29, "to_step": 40}}
    text = render_report(recipe, tmp_path, results(0.0, 0.6, 0.6), gates, stats, {}, {})
    assert "| schedule | 40 steps, 2.0 epochs, lr 0.001 cosine, weights averaged over steps 29-40, batch 8×1" in text
    plain = render_report(recipe, tmp_path, results(0.0, 0.6, 0.6), gates, {**stats, "tail_average": None}, {}, {})
    assert "averaged" not in plain


def test_the_report_says_when_a_slow_machine_shrank_the_time_budget():
    from tasks.release.report import time_budget_lines

    budget = {"budget_s": 549.5, "probe_step_s": 0.544, "rows_kept": 1800, "rows_available": 4000,
              "predicted_train_s": 549.1, "stopped_at_step": 850, "shrunk_from_s": 700}
    (line,) = time_budget_lines(budget, 530.2)
    assert line.startswith("| time budget | 549.5 s (shrunk from 700 s: the stages after training are slower here "
                           "too): 0.544 s a probed step here, so 1800 of 4000 training rows")
    (plain,) = time_budget_lines({**budget, "shrunk_from_s": None}, 530.2)
    assert "shrunk" not in plain
