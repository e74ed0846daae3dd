"""Training progress a person can see: the worker's `[train]` lines (tasks/train/worker.py, Progress
callback) parsed into `metrics/training-status.json` and a Prefect progress artifact.

The status file has the fields the Forge web UI polls (seed 002: running, step, total_steps, epoch,
total_epochs, loss, learning_rate, eta_seconds, started_at, checkpoint_at, error) plus tokens_per_second;
it is rewritten atomically on every logging step, so a reader never sees half a file.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

from tasks.progress import ProgressBar, format_seconds
from tasks.run import RunFolder, atomic_write_json

_STEP = re.compile(r"^\[train\] step (\d+)/(\d+)\s*(.*)$")
_CHECKPOINT = re.compile(r"^\[train\] checkpoint step (\d+)")
_PAIR = re.compile(r"(\w+)=(\S+)")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_step_line(line: str) -> dict | None:
    """`[train] step 12/40 loss=1.9 learning_rate=0.001 num_tokens=4096 epoch=0.6 elapsed=31s eta=72s` ->
    {"step": 12, "total_steps": 40, "loss": 1.9, ...}; None for any other line."""
    match = _STEP.match(line.strip())
    if not match:
        return None
    values: dict = {"step": int(match[1]), "total_steps": int(match[2])}
    for key, raw in _PAIR.findall(match[3]):
        try:
            values[key] = float(raw.removesuffix("s")) if key in ("elapsed", "eta") else float(raw)
        except ValueError:
            values[key] = raw
    return values


class TrainingStatus:
    """Folds `[train]` lines into the status file and the progress bar of one run's training."""

    def __init__(self, run: RunFolder, total_epochs: float):
        self.run = run
        self.status = {"running": True, "step": 0, "total_steps": None, "epoch": 0.0, "total_epochs": total_epochs,
                       "loss": None, "learning_rate": None, "tokens_per_second": None, "eta_seconds": None,
                       "started_at": _now(), "checkpoint_at": None, "checkpoint_step": None, "error": None}
        self.bar: ProgressBar | None = None
        self._write()

    def _write(self) -> None:
        atomic_write_json(self.run.training_status, self.status)

    def line(self, line: str) -> None:
        """Take one line of the worker's output (anything else than a `[train]` step/checkpoint is ignored)."""
        checkpoint = _CHECKPOINT.match(line.strip())
        if checkpoint:
            self.status.update(checkpoint_at=_now(), checkpoint_step=int(checkpoint[1]))
            self._write()
            return
        values = parse_step_line(line)
        if values is None:
            return
        s = self.status
        s.update(step=values["step"], total_steps=values["total_steps"])
        for key in ("loss", "learning_rate", "epoch"):
            if isinstance(values.get(key), float):
                s[key] = values[key]
        if isinstance(values.get("eta"), float):
            s["eta_seconds"] = values["eta"]
        if isinstance(values.get("num_tokens"), float) and values.get("elapsed"):
            s["tokens_per_second"] = round(values["num_tokens"] / values["elapsed"], 1)
        self._write()
        if self.bar is None:
            self.bar = ProgressBar("training", self.run.name, values["total_steps"], "training")
        self.bar.update(s["step"], self.describe())

    def describe(self) -> str:
        s = self.status
        parts = [f"step {s['step']}/{s['total_steps']}"]
        if s["loss"] is not None:
            parts.append(f"loss {s['loss']:.4g}")
        if s["tokens_per_second"] is not None:
            parts.append(f"{s['tokens_per_second']:.0f} tokens/s")
        parts.append(f"ETA {format_seconds(s['eta_seconds'])}")
        return " · ".join(parts)

    def finish(self, error: str | None = None) -> None:
        """The process ended: `error` says why it failed (None: it succeeded)."""
        self.status.update(running=False, error=error)
        if error is None:
            self.status["eta_seconds"] = 0
        self._write()
        if self.bar is not None:
            self.bar.update(self.status["step"], ("FAILED: " + error[:200]) if error else self.describe(),
                            force=True)
            self.bar.close()
