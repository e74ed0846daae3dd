"""The Prefect side of training: build the worker's command, run it, stream its progress into the log.

Training runs in its own process (tasks/train/worker.py), plain or under `accelerate launch` (DDP /
DeepSpeed ZeRO-2), so that the CPU default, one GPU and several GPUs share one code path and the worker
needs no Prefect.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from tasks.recipe import REPO_ROOT, Recipe
from tasks.run import RunFolder, resumable_stage, rotate_log, stage_timer
from tasks.train import worker

ACCELERATE_DIR = REPO_ROOT / "accelerate_config"


def resolve_accelerate_config(name_or_path: str) -> Path:
    """'ddp' -> accelerate_config/ddp.yaml; a path is returned as is.

    Raises:
        ValueError: neither a known name nor an existing file, listing the known names.
    """
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    candidate = ACCELERATE_DIR / f"{name_or_path}.yaml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in ACCELERATE_DIR.glob("*.yaml"))
    raise ValueError(f"training.accelerate_config {name_or_path!r}: not a file and not one of {known}")


def training_command(recipe: Recipe, run_dir: Path | RunFolder, base_dir: Path) -> list[str]:
    """The process that trains: plain Python, or `accelerate launch` (DDP / DeepSpeed ZeRO-2)."""
    args = ["-m", worker.__name__, str(run_dir), "--base", str(base_dir)]
    if recipe.training.accelerate_config:
        config = resolve_accelerate_config(recipe.training.accelerate_config)
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), *args]
    return [sys.executable, *args]


@task(name="train-adapter")  # no retries: a failed training step is a bug or a bad config, not bad luck
@resumable_stage("train")
def train_adapter(recipe: Recipe, run_dir: Path, base_dir: Path) -> dict:
    """Run training in its own process, streaming its progress lines into the Prefect log; returns the
    training stats the worker wrote."""
    logger = get_run_logger()
    run = RunFolder(run_dir)
    cmd = training_command(recipe, run, base_dir)
    logger.info("training: %s", " ".join(cmd))
    if kept := rotate_log(run.train_log):   # an earlier (crashed) attempt's log stays, as train.<n>.log
        logger.info("earlier attempt's log kept as %s", kept)
    with stage_timer(run, "train"), open(run.train_log, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT)
        for line in proc.stdout:
            log.write(line)
            if line.startswith("[train]"):
                logger.info(line.rstrip())
        if proc.wait() != 0:
            tail = "\n".join(run.train_log.read_text().splitlines()[-15:])
            raise RuntimeError(f"training failed (exit {proc.returncode}); log {run.train_log}:\n{tail}")
    return json.loads(run.training_stats.read_text())
