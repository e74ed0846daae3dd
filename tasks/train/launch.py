"""The Prefect side of training: run the worker's command, stream its progress into the log.

Training runs in its own process (tasks/train/worker.py), plain or under `accelerate launch` (DDP /
DeepSpeed ZeRO-2), so that the CPU default, one GPU and several GPUs share one code path and the worker
needs no Prefect. The command and its process group live in tasks/train/command.py (no Prefect either).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from tasks.recipe import REPO_ROOT, Recipe
from tasks.run import RunFolder, stage_timer
from tasks.train.command import (ACCELERATE_DIR, distributed_type, process_group,  # noqa: F401  (re-exported)
                                 resolve_accelerate_config, training_command, visible_gpus)


@task(name="train-adapter")  # no retries: a failed training step is a bug or a bad config, not bad luck
def train_adapter(recipe: Recipe, run_dir: Path, base_dir: Path) -> dict:
    """Run training in its own process, streaming its progress lines into the Prefect log; returns the
    training stats the worker wrote."""
    logger = get_run_logger()
    run = RunFolder(run_dir)
    cmd = training_command(recipe, run, base_dir)
    logger.info("training: %s", " ".join(cmd))
    with stage_timer(run, "train"), open(run.train_log, "w") as log:
        with process_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT) as proc:
            for line in proc.stdout:
                log.write(line)
                if line.startswith("[train]"):
                    logger.info(line.rstrip())
            proc.wait()
        if proc.returncode != 0:
            tail = "\n".join(run.train_log.read_text().splitlines()[-15:])
            raise RuntimeError(f"training failed (exit {proc.returncode}); log {run.train_log}:\n{tail}")
    return json.loads(run.training_stats.read_text())
