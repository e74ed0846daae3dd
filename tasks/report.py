"""The run report: Markdown (file + Prefect artifact), metrics/eval.json, a comparison chart, and the
COMPLETE marker, written last so a run folder only looks complete when every stage finished.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from prefect import task

from tasks.deploy import report_sections as export_report_sections
from tasks.recipe import Recipe
from tasks.runfs import atomic_write_json, atomic_write_text, mark_complete

REPORT_METRICS = [("strict_parse", "strict parse"), ("anchor_accuracy", "anchor acc."),
                  ("src_dst_accuracy", "src/dst acc."), ("anchor_loose", "anchor (loose)")]


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def plot_comparison(results: dict[str, dict], path: Path) -> None:
    """Grouped bars: each metric for each model, so the gap is visible at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    metrics = REPORT_METRICS[:3]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for i, label in enumerate(labels):
        values = [100 * results[label][key] for key, _ in metrics]
        bars = ax.bar([m + i * width for m in range(len(metrics))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([m + width * (len(labels) - 1) / 2 for m in range(len(metrics))], [n for _, n in metrics])
    ax.set_ylabel("% of test rows")
    ax.set_ylim(0, 105)
    ax.set_title("Base vs fine-tuned, test split")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _data_lines(run_dir: Path) -> list[str]:
    """What data preparation removed and kept (data/stats.json), when the run folder has it."""
    path = Path(run_dir) / "data" / "stats.json"
    if not path.exists():
        return []
    stats = json.loads(path.read_text())
    sources = (stats.get("contamination") or {}).get("by_source") or {}
    lines = ["", "## Data", "", "| step | rows |", "|---|---|",
             f"| source rows | {stats.get('source_rows')} |",
             f"| exact duplicate prompts removed | {stats.get('duplicates_removed', 0)} |",
             f"| near duplicates removed (Jaccard ≥ {(stats.get('dedupe') or {}).get('threshold', '–')}) | "
             f"{stats.get('near_duplicates_removed', 0)} |",
             f"| training rows matching an eval prompt removed | {stats.get('contaminated_removed', 0)}"
             + (" (" + ", ".join(f"{k}: {v}" for k, v in sources.items()) + ")" if sources else "") + " |"]
    lines += [f"| {name} rows | {stats[f'{name}_rows']} |" for name in ("train", "val", "test")
              if f"{name}_rows" in stats]
    return lines


def render_report(recipe: Recipe, run_dir: Path, results: dict[str, dict], gates: list[dict],
                  training: dict, timings: dict, manifest: dict) -> str:
    """The Markdown report; every number comes from the run folder's metrics."""
    verdict = "PASSED" if all(g["passed"] for g in gates) else "FAILED"
    lines = [f"# Slipway run `{run_dir.name}` — gates {verdict}", "",
             f"Recipe **{recipe.name}** · base model **{recipe.model.name}** · "
             f"{training.get('train_rows')} training rows · test rows: "
             f"{next(iter(results.values()))['rows']} · finished "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
             "## Results on the test split", "",
             "| model | runner | " + " | ".join(n for _, n in REPORT_METRICS) + " | tokens/s |",
             "|---|---|" + "---|" * (len(REPORT_METRICS) + 1)]
    for label, res in results.items():
        lines.append(f"| {label} | {res['runner']} | " + " | ".join(_pct(res.get(k)) for k, _ in REPORT_METRICS)
                     + f" | {res.get('tokens_per_second') or '–'} |")
    lines += ["", "![comparison](metrics/eval-chart.png)", "", "## Gates", "",
              "| gate | verdict | threshold | observed |", "|---|---|---|---|"]
    lines += [f"| {g['name']} | {'PASS' if g['passed'] else '**FAIL**'} | {g['threshold']} | {g['observed']} |"
              for g in gates]
    lines += _data_lines(run_dir)
    lines += [""] + export_report_sections(run_dir)  # parity, template check, deployment (tasks/deploy.py)
    mask = training.get("mask", {})
    lines += ["", "## Training", "",
              "| setting | value |", "|---|---|",
              f"| LoRA | r={recipe.lora.r}, alpha={recipe.lora.alpha}, dropout={recipe.lora.dropout}, "
              f"{len(recipe.lora.target_modules)} target modules |",
              f"| schedule | {training.get('steps')} steps, {recipe.training.epochs} epochs, "
              f"lr {recipe.training.learning_rate} {recipe.training.lr_scheduler}, "
              f"batch {recipe.training.batch_size}×{recipe.training.grad_accum} |",
              f"| loss | {training.get('first_loss')} → {training.get('final_loss')} "
              f"(val {training.get('eval_loss')}) |",
              f"| mask | {mask.get('label_tokens')} of {mask.get('tokens')} tokens trained on "
              f"({_pct(mask.get('label_token_share'))}); assistant share of labels "
              f"{_pct(mask.get('assistant_share_of_labels'))} |",
              f"| device | {training.get('device')} ({training.get('mixed_precision')}), "
              f"world size {training.get('world_size')} |",
              f"| adapter tensors changed | {training.get('trainable_tensors_changed')} / "
              f"{training.get('trainable_tensors')} |", "",
              "![loss curve](metrics/loss-curve.png)", "", "## Stage timings", "",
              "| stage | seconds | status |", "|---|---|---|"]
    lines += [f"| {stage} | {t['seconds']} | {t['status']} |" for stage, t in timings.items()]
    lines += [f"| **total** | {sum(t['seconds'] for t in timings.values()):.1f} | |", "",
              "## Artifacts", "", "| artifact | path | size | sha256 |", "|---|---|---|---|"]
    lines += [f"| {name} | `{a['path']}` | {a['bytes'] / 1e6:.1f} MB | {(a['sha256'] or '(folder)')[:16]} |"
              for name, a in manifest.items()]
    lines += ["", "Per-row predictions: `metrics/predictions-<model>.jsonl`; numbers: `metrics/eval.json`.", ""]
    return "\n".join(lines)


@task(name="write-report")
def write_report(recipe: Recipe, run_dir: Path, results: dict[str, dict], gates: list[dict],
                 training: dict) -> Path:
    """report.md, metrics/eval.json, the chart, a Prefect Markdown artifact, then the COMPLETE marker."""
    from prefect.artifacts import create_markdown_artifact

    metrics = run_dir / "metrics"
    atomic_write_json(metrics / "eval.json", {label: {k: res.get(k) for k, _ in REPORT_METRICS}
                                              | {"per_anchor": res.get("per_anchor"), "rows": res.get("rows")}
                                              for label, res in results.items()})
    plot_comparison(results, metrics / "eval-chart.png")
    timings = json.loads((metrics / "timings.json").read_text())
    manifest_path = run_dir / "gguf" / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    markdown = render_report(recipe, run_dir, results, gates, training, timings, manifest)
    report = atomic_write_text(run_dir / "report.md", markdown)
    create_markdown_artifact(key=f"report-{recipe.name}".lower().replace("_", "-"), markdown=markdown,
                             description=f"Slipway report for {run_dir.name}")
    mark_complete(run_dir, {"report": str(report), "gates": gates})
    return report
