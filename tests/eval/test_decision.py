"""The Fledgling decision rule on the primary metric, with the recipe's margin."""

import pytest

from tasks.eval.decision import decide
from tasks.recipe import load_recipe


def res(**values):
    return {label.replace("_", "-"): {"field_accuracy": v, "rows": 20} for label, v in values.items()}


@pytest.fixture
def recipe():
    return load_recipe("fledgling-structured", {"baseline.swap_margin": 0.05})


def test_slm_within_margin_swaps_now(recipe):
    d = decide(recipe, res(base=0.62, llm=0.66))
    assert (d.action, d.chosen, d.metric) == ("swap-now", "base", "field_accuracy")
    assert "within 0.05 of the LLM's 0.660" in d.reason


def test_slm_short_fine_tunes_then_keeps_the_swap_only_if_it_reaches_the_llm(recipe):
    assert decide(recipe, res(base=0.1, llm=0.6)).action == "fine-tune"
    after = decide(recipe, res(base=0.1, llm=0.6, fine_tuned=0.58), finetune_gates_passed=True)
    assert (after.action, after.chosen) == ("swap-now", "fine-tuned")
    short = decide(recipe, res(base=0.1, llm=0.6, fine_tuned=0.5), finetune_gates_passed=True)
    assert short.action == "keep-llm" and "still short after fine-tuning" in short.reason


def test_a_fine_tuned_model_that_failed_its_gates_is_not_swapped_in(recipe):
    d = decide(recipe, res(base=0.1, llm=0.6, fine_tuned=0.7), finetune_gates_passed=False)
    assert d.action == "keep-llm" and "failed its promotion gates" in d.reason


def test_fine_tuning_off_means_measure_and_decide(recipe):
    off = load_recipe("fledgling-structured", {"baseline.allow_finetune": False})
    d = decide(off, res(base=0.1, llm=0.6))
    assert d.action == "keep-llm" and "allow_finetune" in d.reason
