"""The tracks report: one table of the tracks of a layout (devices, run time, training tokens/s per GPU,
gates), its wall time, and, when given the report of the other layout, the two side by side.

`tracks-report.json` holds every number; `tracks-report.md` (also a Prefect Markdown artifact) shows them.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact

from tasks.markdown import cell
from tasks.run import TracksFolder, atomic_write_json, atomic_write_text, read_json


def training_tokens(training: dict, batch: dict) -> tuple[int | None, bool]:
    """Tokens the training run processed (every process together), and whether that is an estimate.

    In order: the worker's own count (`tokens_seen`); TRL's running `num_tokens` in the log history (gathered
    over processes; scaled to the last step when the last log came earlier); else optimizer steps × rows
    per step (batch × accumulation × processes) × the mean tokens of a training row (its mask check)."""
    if training.get("tokens_seen"):
        return int(training["tokens_seen"]), False
    steps = training.get("steps")
    logged = [h for h in training.get("history", []) if h.get("num_tokens") and h.get("step")]
    if logged and steps:
        last = logged[-1]
        return round(last["num_tokens"] * steps / last["step"]), last["step"] != steps
    mask = training.get("mask") or {}
    if not (mask.get("rows") and mask.get("tokens") and steps and batch.get("batch_size")):
        return None, False
    rows_per_step = batch["batch_size"] * (batch.get("grad_accum") or 1) * (training.get("world_size") or 1)
    return round(steps * rows_per_step * mask["tokens"] / mask["rows"]), True


def track_figures(result: dict) -> dict:
    """One track's row: devices seen, training processes, run and training seconds, tokens/s (per GPU)."""
    devices, training = result.get("devices") or {}, result.get("training") or {}
    processes = training.get("world_size") or 1
    tokens, estimated = training_tokens(training, result.get("batch") or {})
    seconds = training.get("seconds")
    rate = tokens / seconds if tokens and seconds else None
    run_seconds = (result["end"] - result["start"]
                   if result.get("start") is not None and result.get("end") is not None else None)
    return {"track": result["run_name"], "recipe": result["recipe"], "deployment": result["deployment"],
            "work_pool": result["work_pool"], "state": result["state"], "flow_run": result["flow_run"],
            "cuda_visible_devices": devices.get("cuda_visible_devices"),
            "gpus_seen": devices.get("cuda_device_count"), "gpu_names": devices.get("gpu_names", []),
            "device": training.get("device"), "processes": processes, "run_seconds": run_seconds,
            "train_seconds": seconds, "tokens": tokens, "tokens_estimated": estimated,
            "tokens_per_second": rate, "tokens_per_second_per_process": rate / processes if rate else None,
            "gates": result.get("gates", []),
            "gates_passed": all(g["passed"] for g in result["gates"]) if result.get("gates") else None,
            "run_dir": result["run_dir"], "start": result.get("start"), "end": result.get("end")}


def summarize(layout: str, results: list[dict]) -> dict:
    """The layout's figures: per track, and its wall time (first track start to last track end, on the
    server's clock) against the sum of the tracks' own run times."""
    tracks = [track_figures(r) for r in results]
    starts = [t["start"] for t in tracks if t["start"] is not None]
    ends = [t["end"] for t in tracks if t["end"] is not None]
    rates = [t["tokens_per_second_per_process"] for t in tracks if t["tokens_per_second_per_process"]]
    return {"layout": layout, "track_flows": sorted({t["deployment"].split("/")[0] for t in tracks}), "tracks": tracks,
            "wall_seconds": max(ends) - min(starts) if len(starts) == len(ends) == len(tracks) else None,
            "sum_run_seconds": sum(t["run_seconds"] for t in tracks if t["run_seconds"] is not None),
            "mean_tokens_per_second_per_process": sum(rates) / len(rates) if rates else None,
            "all_finished": all(r["complete"] for r in results),
            "all_gates_passed": all(t["gates_passed"] for t in tracks)}


FLOW_STAGES = {"finetune": "data, training, export, evaluation, gates", "train": "data, training, loss gate"}


def _secs(x: float | None) -> str:
    if x is None:
        return "–"
    return f"{x:.0f} s" if x < 120 else f"{int(x // 60)} min {x % 60:.0f} s"


def _rate(x: float | None, estimated: bool = False) -> str:
    return "–" if x is None else f"{'≈' if estimated else ''}{x:,.0f}"


def _gates(gates: list[dict]) -> str:
    return ", ".join(f"{g['name']} {'PASS' if g['passed'] else '**FAIL**'}" for g in gates) or "none recorded"


def render_tracks_report(name: str, summary: dict, other: dict | None) -> str:
    tracks = summary["tracks"]
    lines = [f"# Tracks `{name}` — {summary['layout']}, {len(tracks)} tracks, wall time "
             f"{_secs(summary['wall_seconds'])}", "",
             f"Finished {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
             + ("Every track ran at once, each on its own work pool." if summary["layout"] == "parallel" else
                "The tracks ran one after the other, each on the work pool of every GPU."), "",
             "| track | work pool | CUDA_VISIBLE_DEVICES | GPUs seen | training processes | state | run time | "
             "training | tokens/s | tokens/s per GPU (process) | gates |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in tracks:
        lines.append(f"| {t['track']} | {t['work_pool']} | `{t['cuda_visible_devices']}` | {t['gpus_seen']} | "
                     f"{t['processes']} ({t['device'] or '–'}) | {t['state']} | {_secs(t['run_seconds'])} | "
                     f"{_secs(t['train_seconds'])} | {_rate(t['tokens_per_second'], t['tokens_estimated'])} | "
                     f"{_rate(t['tokens_per_second_per_process'], t['tokens_estimated'])} | "
                     f"{cell(_gates(t['gates']))} |")
    lines += ["", f"Wall time: **{_secs(summary['wall_seconds'])}** (first track start → last track end); the "
              f"tracks' own run times add up to {_secs(summary['sum_run_seconds'])}. Run time is the track's flow run "
              f"({' / '.join(f'`{f}`: {FLOW_STAGES.get(f, f)}' for f in summary['track_flows'])}); training is the "
              "training process alone.",
              "≈: tokens estimated (from an earlier logged count, or steps × rows per step × mean row tokens)."
              if any(t["tokens_estimated"] for t in tracks) else ""]
    if other:
        lines += ["", "## Layouts compared", "",
                  "| layout | track flow | tracks | wall time | sum of run times | mean tokens/s per GPU (process) |",
                  "|---|---|---|---|---|---|"]
        for s in (summary, other):
            lines.append(f"| {s['layout']} | {', '.join(s.get('track_flows', []))} | {len(s['tracks'])} | "
                         f"{_secs(s['wall_seconds'])} | "
                         f"{_secs(s['sum_run_seconds'])} | {_rate(s['mean_tokens_per_second_per_process'])} |")
        if summary["wall_seconds"] and other["wall_seconds"]:   # both measured, neither zero
            lines += ["", f"{summary['layout']} / {other['layout']} wall time: "
                      f"**{summary['wall_seconds'] / other['wall_seconds']:.2f}×**"]
    lines += ["", "Each track's run folder (report, metrics/devices.json, metrics/training-stats.json):", ""]
    lines += [f"- {t['track']}: `{t['run_dir']}` (flow run {t['flow_run']})" for t in tracks]
    return "\n".join(lines) + "\n"


@task(name="write-tracks-report")
def write_tracks_report(tracks_dir: Path, layout: str, results: list[dict], compare_with: str | None = None) -> Path:
    """tracks-report.json and tracks-report.md in the tracks folder, and the Markdown as a Prefect artifact;
    `compare_with`: another tracks folder (the other layout) to put beside this one."""
    folder = TracksFolder(tracks_dir)
    summary = summarize(layout, results)
    other = read_json(TracksFolder(Path(compare_with)).report_json) if compare_with else None
    atomic_write_json(folder.report_json, {**summary, "compared_with": other})
    markdown = render_tracks_report(folder.root.name, summary, other)
    atomic_write_text(folder.report_md, markdown)
    create_markdown_artifact(key=f"tracks-{layout}", markdown=markdown, description=f"Slipway tracks {folder.root}")
    return folder.report_md
