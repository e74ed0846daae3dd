"""Run reports: Markdown (file + Prefect artifact), metrics/eval.json and a PNG chart, from the run's metrics.

`write_report` closes a finetune run (then writes the COMPLETE marker, last, so a run folder only looks
complete when every stage finished); `write_eval_report` closes an evaluate (Fledgling) run. Both show,
per model: the task's metrics, per-anchor / per-field / per-function accuracy, latency, tokens and the
estimated cost per 1,000 requests; Slipstream runs also show SLIP message tokens against the instruction.
"""

from __future__ import annotations

import base64
import os
import re
from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.data.prepare import mix_counts, mix_lines
from tasks.release.deploy import report_sections as export_report_sections
from tasks.tasktypes import primary_metric, task_type
from tasks.markdown import pct
from tasks.names import artifact_key
from tasks.recipe import Recipe
from tasks.run import RunFolder, atomic_write_json, atomic_write_text, mark_complete, read_json, read_jsonl


def _num(x, fmt: str = "{}") -> str:
    return "–" if x is None else fmt.format(x)


def plot_comparison(results: dict[str, dict], path: Path, task: str = "slipstream") -> None:
    """Grouped bars per metric for each model, and each model's median latency beside them."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(results)
    metrics = task_type(task).metrics[:4]
    width = 0.8 / len(labels)
    fig, (ax, lat) = plt.subplots(1, 2, figsize=(10, 3.8), dpi=110, gridspec_kw={"width_ratios": [3, 1]})
    for i, label in enumerate(labels):
        values = [100 * (results[label].get(key) or 0) for key, _ in metrics]
        bars = ax.bar([m + i * width for m in range(len(metrics))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks([m + width * (len(labels) - 1) / 2 for m in range(len(metrics))], [n for _, n in metrics])
    ax.set_ylabel("% of test rows")
    ax.set_ylim(0, 105)
    ax.set_title(f"{task}: models on the same test rows")
    ax.legend(fontsize=8)
    lat.bar(labels, [results[k].get("latency_p50_s") or 0 for k in labels], color="gray")
    lat.set_title("median latency (s)")
    lat.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _data_lines(run_dir: RunFolder | Path, time_budget: dict | None = None) -> list[str]:
    """What data preparation removed and kept (data/stats.json), when the run folder has it; with a
    training.time_budget_s that kept fewer rows, the rows trained and their mix beside the split's."""
    run = RunFolder(run_dir)
    stats = read_json(run.data_stats, missing_ok=True)
    if stats is None:
        return []
    kept = (time_budget or {}).get("rows_kept")
    trained = kept is not None and kept < stats.get("train_rows", 0) and run.split("train").exists()
    if trained and stats.get("mix"):
        stats["mix"]["trained"] = mix_counts({"trained": read_jsonl(run.split("train"))[:kept]})["trained"]
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
    if trained:
        lines.append(f"| trained: the first train rows that fit training.time_budget_s | {kept} |")
    return lines + mix_lines(stats)


def test_rows(results: dict[str, dict]) -> int:
    """Rows of the test split the fine-tuned models were scored on (the base may have fewer: eval.base_rows;
    an eval file's label has '@')."""
    return max((res.get("rows") or 0 for label, res in results.items() if "@" not in label), default=0)


def results_section(task: str, results: dict[str, dict]) -> list[str]:
    """Metrics, per-group accuracy, latency/tokens/cost and (Slipstream) token-reduction tables."""
    cols = task_type(task).metrics
    lines = ["| model | runner | " + " | ".join(n for _, n in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for label, res in results.items():
        lines.append(f"| {label} | {res.get('runner')} | " + " | ".join(pct(res.get(k)) for k, _ in cols) + " |")
    # Not every model sees the same rows: eval.base_rows cuts the base's, an eval file (label@file) has its own.
    lines += ["", "Rows scored: " + ", ".join(f"{label} {res.get('rows')}" for label, res in results.items())
              + " (a smaller count on the test split is its first rows)."]
    constrained = [label for label, res in results.items() if res.get("grammar_constrained")]
    if constrained:
        free = [label for label in results if label not in constrained]
        lines += ["", f"Grammar-constrained outputs: {', '.join(constrained)} answered under the task's GBNF answer "
                  "grammar (deploy.constrain_output: llama-server `--grammar-file answer-grammar.gbnf`, the rule the "
                  "deployment serves with)" + (f"; unconstrained: {', '.join(free)}." if free else ".")]
    lines += ["", "![comparison](metrics/eval-chart.png)", "", "### Latency, tokens and cost", "",
              "| model | rows | failed calls | latency p50 / p95 (s) | requests/s | tokens/s | prompt tok/req "
              "| completion tok/req | est. USD per 1k requests | price basis |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for label, res in results.items():
        cost = res.get("cost") or {}
        lines.append(f"| {label} | {res.get('rows')} | {res.get('failed_calls', 0)} | "
                     f"{_num(res.get('latency_p50_s'))} / {_num(res.get('latency_p95_s'))} | "
                     f"{_num(res.get('requests_per_second'))} | {_num(res.get('tokens_per_second'))} | "
                     f"{_num(res.get('mean_prompt_tokens'))} | {_num(res.get('mean_completion_tokens'))} | "
                     f"{_num(cost.get('usd_per_1k_requests'), '${:.4f}')} | {cost.get('basis', '–')} |")
    return lines + task_type(task).report_sections(results)


def gates_section(gates: list[dict]) -> list[str]:
    lines = ["| gate | verdict | threshold | observed |", "|---|---|---|---|"]
    return lines + [f"| {g['name']} | {'PASS' if g['passed'] else '**FAIL**'} | {g['threshold']} | {g['observed']} |"
                    for g in gates]


def write_eval_json(run_dir: RunFolder | Path, results: dict[str, dict], task: str) -> None:
    """metrics/eval.json (every model's summary) and the chart."""
    run = RunFolder(run_dir)
    atomic_write_json(run.eval_summary, results)
    plot_comparison(results, run.eval_chart, task)


def remote_training_lines(training: dict) -> list[str]:
    """Rows for a remote (Together) run: the job, the price estimate before, the billed tokens after."""
    remote = training.get("remote")
    if not remote:
        return []
    estimate = remote.get("estimate") or {}
    price = (f"${estimate['estimated_total_price']:.4f} for {estimate.get('estimated_train_token_count')} tokens"
             if estimate.get("estimation_available") else "not available")
    return [f"| engine | Together job `{remote['job_id']}` on `{remote['model']}` → `{remote.get('output_name')}` |",
            f"| cost | estimate before: {price}; billed after: {remote.get('billed_tokens')} tokens, total_price "
            f"{remote.get('total_price')} (as the API reports it) |",
            f"| remote wall time | {remote.get('wall_seconds')} s, job created to finished (a local run's time is "
            "its `train` stage below) |"]


def time_budget_lines(budget: dict | None, seconds: float | None) -> list[str]:
    """training.time_budget_s: how many rows this machine had time for, and how close the prediction was."""
    if not budget:
        return []
    stopped = budget.get("stopped_at_step")
    shrunk = (f" (shrunk from {budget['shrunk_from_s']:g} s: the stages after training are slower here too)"
              if budget.get("shrunk_from_s") else "")
    return [f"| time budget | {budget['budget_s']:g} s{shrunk}: {budget['probe_step_s']} s a probed step here, so "
            f"{budget['rows_kept']} of {budget['rows_available']} training rows (predicted "
            f"{budget['predicted_train_s']:g} s, took {seconds} s"
            + (f"; the budget stopped training at step {stopped}, the rest of the schedule's tail not trained"
               if stopped else "") + ") |"]


def render_report(recipe: Recipe, run_dir: RunFolder | Path, results: dict[str, dict], gates: list[dict],
                  training: dict, timings: dict, manifest: dict) -> str:
    """The finetune run's Markdown report; every number comes from the run folder's metrics."""
    verdict = "PASSED" if all(g["passed"] for g in gates) else "FAILED"
    lines = [f"# Slipway run `{run_dir.name}` — gates {verdict}", "",
             f"Recipe **{recipe.name}** ({recipe.task}) · base model **{recipe.model.name}** · "
             f"{training.get('train_rows')} training rows · test rows: "
             f"{test_rows(results)} · primary metric `{primary_metric(recipe)}` · finished "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "",
             "## Results on the test split", ""]
    lines += results_section(recipe.task, results)
    lines += ["", "## Gates", ""] + gates_section(gates)
    lines += _data_lines(run_dir, training.get("time_budget"))
    lines += [""] + export_report_sections(run_dir)  # parity, template check, deployment (tasks/release/deploy.py)
    mask = training.get("mask", {})
    lines += ["", "## Training", "",
              "| setting | value |", "|---|---|",
              f"| LoRA | r={recipe.lora.r}, alpha={recipe.lora.alpha}, dropout={recipe.lora.dropout}, "
              f"{len(recipe.lora.target_modules)} target modules"
              + (f" in the last {recipe.lora.last_layers} layers" if recipe.lora.last_layers else "") + " |",
              f"| schedule | {training.get('steps')} steps, {recipe.training.epochs} epochs, "
              f"lr {recipe.training.learning_rate} {recipe.training.lr_scheduler}"
              + (f" (LoRA+: B matrices ×{recipe.training.loraplus_lr_ratio:g})"
                 if recipe.training.loraplus_lr_ratio else "")
              + (", weights averaged over steps {from_step}-{to_step}".format(**training["tail_average"])
                 if training.get("tail_average") else "")
              + f", batch {recipe.training.batch_size}×{recipe.training.grad_accum}, "
              f"loss {recipe.training.loss_type or 'TRL default'} |",
              f"| loss | {training.get('first_loss')} → {training.get('final_loss')} "
              f"(val {training.get('eval_loss')}) |",
              f"| mask | {mask.get('label_tokens')} of {mask.get('tokens')} tokens trained on "
              f"({pct(mask.get('label_token_share'))}); assistant share of labels "
              f"{pct(mask.get('assistant_share_of_labels'))} |",
              f"| device | {training.get('device')} ({training.get('mixed_precision')}), "
              f"world size {training.get('world_size')}"
              + (f", malloc {training['allocator']}" if training.get("allocator") else "")
              + (f", {training['compiled_layers']} decoder layers compiled" if training.get("compiled_layers") else "")
              + " |",
              f"| adapter tensors changed | {training.get('trainable_tensors_changed')} / "
              f"{training.get('trainable_tensors')} |",
              *time_budget_lines(training.get("time_budget"), training.get("seconds")), "",
              *remote_training_lines(training), "",
              "![loss curve](metrics/loss-curve.png)", "", "## Stage timings", "",
              "| stage | seconds | status |", "|---|---|---|"]
    lines += [f"| {stage} | {t['seconds']} | {t['status']} |" for stage, t in timings.items()]
    lines += [f"| **total** | {sum(t['seconds'] for t in timings.values()):.1f} | |", "",
              "## Artifacts", "", "| artifact | path | size | sha256 |", "|---|---|---|---|"]
    lines += [f"| {name} | `{a['path']}` | {a['bytes'] / 1e6:.1f} MB | {(a['sha256'] or '(folder)')[:16]} |"
              for name, a in manifest.items()]
    lines += ["", "Per-row predictions: `metrics/predictions-<model>.jsonl`; numbers: `metrics/eval.json`.", ""]
    return "\n".join(lines)


_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def embed_images(markdown: str, root: Path) -> str:
    """The report's relative image links (`metrics/loss-curve.png`) as data URIs: the Prefect UI shows a
    Markdown artifact without the run folder, where relative links are broken. Missing files stay links."""
    def inline(match: re.Match) -> str:
        path = root / match[2]
        if not path.is_file():
            return match[0]
        return f"![{match[1]}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    return _IMAGE.sub(inline, markdown)


def _tables(recipe: Recipe, results: dict[str, dict], gates: list[dict] | None) -> None:
    """Results (every model's task metrics, failed calls, latency) and gates as Prefect table artifacts."""
    cols = task_type(recipe.task).metrics
    create_table_artifact(key=artifact_key("results", recipe.name), description=f"{recipe.name}: results per model",
                          table=[{"model": label, "runner": r.get("runner"), "rows": r.get("rows"),
                                  "failed calls": r.get("failed_calls", 0),
                                  **{name: r.get(key) for key, name in cols},
                                  "latency p50 (s)": r.get("latency_p50_s")} for label, r in results.items()])
    if gates:
        create_table_artifact(key=artifact_key("gates", recipe.name), description=f"{recipe.name}: gates",
                              table=[{"gate": g["name"], "verdict": "PASS" if g["passed"] else "FAIL",
                                      "threshold": g["threshold"], "observed": g["observed"]} for g in gates])


def _publish(recipe: Recipe, run: RunFolder, markdown: str, kind: str) -> Path:
    """report.md (relative image links, beside the files) and the Markdown artifact (images embedded)."""
    report = atomic_write_text(run.report_md, markdown)
    create_markdown_artifact(key=artifact_key(kind, recipe.name), markdown=embed_images(markdown, run.root),
                             description=f"Slipway {kind} for {run.name}")
    return report


@task(name="write-report")
def write_report(recipe: Recipe, run_dir: RunFolder | Path, results: dict[str, dict], gates: list[dict],
                 training: dict) -> Path:
    """report.md, metrics/eval.json, the chart, a Prefect Markdown artifact, then the COMPLETE marker; returns
    the report's path."""
    run = RunFolder(run_dir)
    write_eval_json(run, results, recipe.task)
    timings = read_json(run.timings)
    manifest = read_json(run.gguf_manifest, missing_ok=True) or {}
    markdown = render_report(recipe, run, results, gates, training, timings, manifest)
    report = _publish(recipe, run, markdown, "report")
    _tables(recipe, results, gates)
    mark_complete(run, {"report": str(report), "gates": gates})
    return report


def render_eval_report(recipe: Recipe, run_dir: RunFolder | Path, results: dict[str, dict], decisions: list[dict],
                       finetune: dict | None, source: str) -> str:
    """The evaluate (Fledgling) run's Markdown report: the comparison and the decision trail."""
    final = decisions[-1]
    lines = [f"# Slipway evaluation `{run_dir.name}` — decision: **{final['action']}**", "",
             f"Recipe **{recipe.name}** · task **{recipe.task}** · test rows: {next(iter(results.values()))['rows']} "
             f"from `{source}` · primary metric `{final['metric']}` · swap margin {final['margin']:.2f} · finished "
             f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}", "", "## Decision", "",
             "| step | decision | reason |", "|---|---|---|"]
    lines += [f"| {i + 1} | {d['action']} | {d['reason']} |" for i, d in enumerate(decisions)]
    if finetune:
        verdict = {True: "gates passed", False: "gates FAILED", None: "no gate verdicts recorded"}[finetune["gates_passed"]]
        lines += ["", f"Fine-tuned model: `{finetune['run_dir']}` (flow state {finetune['state']}, {verdict})."]
        if finetune.get("gates"):
            lines += ["", "### Fine-tune gates", ""] + gates_section(finetune["gates"])
    lines += ["", "## Results", ""] + results_section(recipe.task, results)
    lines += ["", "Per-row predictions: `metrics/predictions-<model>.jsonl`; numbers: `metrics/eval.json`; "
              "the decision: `metrics/decision.json`.", ""]
    return "\n".join(lines)


@task(name="write-eval-report")
def write_eval_report(recipe: Recipe, run_dir: RunFolder | Path, results: dict[str, dict], decisions: list[dict],
                      finetune: dict | None = None, source: str = "") -> Path:
    """report.md, metrics/eval.json, metrics/decision.json, the chart, a Prefect artifact, the COMPLETE marker;
    returns the report's path."""
    run = RunFolder(run_dir)
    write_eval_json(run, results, recipe.task)
    atomic_write_json(run.decision, {"decisions": decisions, "finetune": finetune})
    report = _publish(recipe, run, render_eval_report(recipe, run, results, decisions, finetune, source),
                      "evaluation")
    _tables(recipe, results, (finetune or {}).get("gates"))
    mark_complete(run, {"report": str(report), "decision": decisions[-1]["action"]})
    return report
