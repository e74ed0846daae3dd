"""The report of a training-only run (flow `train`): the loss gate, the training figures and the devices the run
saw. The full finetune run's report (evaluation, export, every gate) is tasks/release/report.py.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.eval.gates import loss_gate
from tasks.markdown import cell
from tasks.recipe import Recipe
from tasks.run import RunFolder, atomic_write_text, mark_complete, read_json


@task(name="check-training-gates")
def check_training_gates(recipe: Recipe, training: dict) -> list[dict]:
    """The gate a training-only run can judge: loss-converged."""
    return [loss_gate(recipe, training).as_dict()]


def render_training_report(recipe: Recipe, run: RunFolder, gates: list[dict], training: dict,
                           devices: dict | None) -> str:
    verdict = "PASSED" if all(g["passed"] for g in gates) else "FAILED"
    devices = devices or {}
    history = [h for h in training.get("history", []) if h.get("num_tokens")]
    lines = [f"# Slipway training run `{run.name}` — gates {verdict}", "",
             f"Recipe **{recipe.name}** ({recipe.task}) · base model **{recipe.model.name}** · training only "
             f"(no export or evaluation) · finished {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
             "## Gates", "", "| gate | verdict | threshold | observed |", "|---|---|---|---|"]
    lines += [f"| {g['name']} | {'PASS' if g['passed'] else '**FAIL**'} | {g['threshold']} | {cell(g['observed'])} |"
              for g in gates]
    lines += ["", "## Training", "", "| setting | value |", "|---|---|",
              f"| devices | CUDA_VISIBLE_DEVICES=`{devices.get('cuda_visible_devices')}`, "
              f"{devices.get('cuda_device_count')} GPU(s) seen {cell(', '.join(devices.get('gpu_names', [])))} |",
              f"| processes | {training.get('world_size')} on {training.get('device')} "
              f"({training.get('mixed_precision')}) |",
              f"| schedule | {training.get('steps')} steps, batch {recipe.training.batch_size}×"
              f"{recipe.training.grad_accum} per process, {training.get('train_rows')} rows |",
              f"| loss | {training.get('first_loss')} → {training.get('final_loss')} (val {training.get('eval_loss')}) |",
              f"| time | {training.get('seconds')} s"
              + (f", {history[-1]['num_tokens']:,.0f} tokens by step {history[-1]['step']}" if history else "") + " |",
              "", "![loss curve](metrics/loss-curve.png)", ""]
    return "\n".join(lines)


@task(name="write-training-report")
def write_training_report(recipe: Recipe, run_dir: Path, gates: list[dict], training: dict) -> Path:
    """report.md (also a Prefect Markdown artifact), then COMPLETE with the gate verdicts; returns the report."""
    run = RunFolder(run_dir)
    markdown = render_training_report(recipe, run, gates, training, read_json(run.devices, missing_ok=True))
    report = atomic_write_text(run.report_md, markdown)
    create_markdown_artifact(key=f"training-{recipe.name}".lower().replace("_", "-"), markdown=markdown,
                             description=f"Slipway training run {run.name}")
    mark_complete(run, {"report": str(report), "gates": gates})
    return report
