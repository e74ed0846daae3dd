"""Promotion gates: explicit verdicts with their thresholds and numbers, never hidden.

model-performance      the fine-tuned (merged) model beats the base by the recipe's margin (anchor accuracy)
quantization-verified  the served GGUF loses at most the recipe's drop against the merged model
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prefect import task

from tasks.recipe import Recipe

GATE_METRIC = "anchor_accuracy"


class GateFailed(RuntimeError):
    """At least one gate failed; the report and every artifact are kept."""


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    threshold: str
    observed: str

    def as_dict(self) -> dict:
        return asdict(self)


def evaluate_gates(recipe: Recipe, results: dict[str, dict], served_label: str) -> list[Gate]:
    """Compute every gate from the evaluation summaries (keyed by model label)."""
    base, merged, served = (results[k][GATE_METRIC] for k in ("base", "merged", served_label))
    gain = merged - base
    drop = merged - served
    return [
        Gate("model-performance", gain >= recipe.eval.min_improvement,
             f"merged - base {GATE_METRIC} >= {recipe.eval.min_improvement:.2f}",
             f"{merged:.3f} - {base:.3f} = {gain:+.3f}"),
        Gate("quantization-verified", drop <= recipe.eval.max_quant_drop,
             f"merged - {served_label} {GATE_METRIC} <= {recipe.eval.max_quant_drop:.2f}",
             f"{merged:.3f} - {served:.3f} = {drop:+.3f}"),
    ]


@task(name="check-gates")
def check_gates(recipe: Recipe, results: dict[str, dict], served_label: str) -> list[dict]:
    return [g.as_dict() for g in evaluate_gates(recipe, results, served_label)]


@task(name="enforce-gates")
def enforce_gates(gates: list[dict]) -> None:
    """Last task: fail the flow run when a gate failed (after the report was written).

    Raises:
        GateFailed: naming each failed gate with its numbers.
    """
    failed = [g for g in gates if not g["passed"]]
    if failed:
        raise GateFailed("; ".join(f"{g['name']} failed: {g['observed']} (needs {g['threshold']})"
                                   for g in failed))
