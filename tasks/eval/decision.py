"""The Fledgling decision rule: keep the LLM, swap to the SLM now, or fine-tune the SLM first.

On the track's primary metric, with `margin = recipe.baseline.swap_margin`:

    swap-now   the best SLM (base, or fine-tuned when its promotion gates passed) is within `margin` of the LLM
    fine-tune  no SLM is within the margin, no fine-tuned SLM was measured yet and fine-tuning is allowed
    keep-llm   otherwise: the (fine-tuned) SLM still falls short, its gates failed, or fine-tuning is off

After a fine-tune round the rule runs again with the fine-tuned SLM included, so the swap is kept only
when the fine-tuned model reaches the LLM.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from prefect import task

from tasks import tracing
from tasks.tasktypes import primary_metric
from tasks.recipe import Recipe

SLM_LABELS = ("base", "fine-tuned")


@dataclass(frozen=True)
class Decision:
    action: str            # keep-llm | swap-now | fine-tune
    reason: str
    metric: str
    llm: float
    slm: dict              # label -> primary metric
    margin: float
    chosen: str | None = None   # the SLM to swap to

    def as_dict(self) -> dict:
        return asdict(self)


def decide(recipe: Recipe, results: dict[str, dict], finetune_gates_passed: bool | None = None) -> Decision:
    """Apply the rule to the evaluation summaries (keyed by model label)."""
    metric, margin = primary_metric(recipe), recipe.baseline.swap_margin
    llm = results[recipe.baseline.label][metric]
    slm = {label: results[label][metric] for label in SLM_LABELS if label in results}
    eligible = {k: v for k, v in slm.items() if k != "fine-tuned" or finetune_gates_passed is not False}
    best = max(eligible, key=eligible.get) if eligible else None
    common = dict(metric=metric, llm=llm, slm=slm, margin=margin)
    if best is not None and eligible[best] >= llm - margin:
        how = "reaches" if eligible[best] >= llm else f"is within {margin:.2f} of"
        return Decision("swap-now", f"{best} {metric} {eligible[best]:.3f} {how} the LLM's {llm:.3f}",
                        chosen=best, **common)
    short = f"best SLM {max(slm.values()):.3f} vs LLM {llm:.3f} (margin {margin:.2f})"
    if "fine-tuned" not in slm and recipe.baseline.allow_finetune:
        return Decision("fine-tune", f"{short}: fine-tune with recipe {recipe.name!r}", **common)
    if "fine-tuned" in slm and finetune_gates_passed is False:
        return Decision("keep-llm", f"{short}; the fine-tuned SLM failed its promotion gates", **common)
    why = "still short after fine-tuning" if "fine-tuned" in slm else "fine-tuning is off (baseline.allow_finetune)"
    return Decision("keep-llm", f"{short}: {why}", **common)


@task(name="decide-swap")
def decide_swap(recipe: Recipe, results: dict[str, dict], run_name: str,
                finetune_gates_passed: bool | None = None) -> dict:
    """Decide, log it and record it as a categorical score on the run's trace."""
    from prefect.logging import get_run_logger

    decision = decide(recipe, results, finetune_gates_passed)
    get_run_logger().info("[decision] %s: %s", decision.action, decision.reason)
    tracing.score("decision", decision.action, run_name=run_name, comment=decision.reason)
    tracing.flush()
    return decision.as_dict()
