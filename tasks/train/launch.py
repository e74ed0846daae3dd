"""The Prefect side of training: run the worker's command, stream its progress into the log.

Training runs in its own process (tasks/train/worker.py), plain or under `accelerate launch` (DDP /
DeepSpeed ZeRO-2), so that the CPU default, one GPU and several GPUs share one code path and the worker
needs no Prefect. The command and its process group live in tasks/train/command.py (no Prefect either).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Iterator

from prefect import task
from prefect.logging import get_run_logger

from tasks.recipe import REPO_ROOT, Recipe
from tasks.run import RunFolder, resumable_stage, rotate_log, stage_timer
from tasks.timeouts import StageTimeout
from tasks.train.command import (ACCELERATE_DIR, distributed_type, process_group,  # noqa: F401  (re-exported)
                                 resolve_accelerate_config, training_command, training_env, visible_gpus)
from tasks.train.status import TrainingStatus


@task(name="train-adapter")  # no retries: a failed training step is a bug or a bad config, not bad luck
@resumable_stage("train")
def train_adapter(recipe: Recipe, run_dir: Path, base_dir: Path) -> dict:
    """Run training in its own process, streaming its progress lines into the Prefect log, a progress
    artifact and metrics/training-status.json; returns the training stats the worker wrote.

    Raises:
        StageTimeout: the process ran past training.timeout_s and was killed (its checkpoints stay).
        RuntimeError: the process failed (exit code and the tail of its log).
    """
    logger = get_run_logger()
    run = RunFolder(run_dir)
    cmd = training_command(recipe, run, base_dir)
    env = training_env(recipe)
    logger.info("training: %s", " ".join(cmd))
    if kept := rotate_log(run.train_log):   # an earlier (crashed) attempt's log stays, as train.<n>.log
        logger.info("earlier attempt's log kept as %s", kept)
    status = TrainingStatus(run, recipe.training.epochs)
    with stage_timer(run, "train"), open(run.train_log, "w") as log:
        with process_group(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO_ROOT, env=env) as proc, \
                kill_at_deadline(proc, recipe.training.timeout_s) as timed_out:
            for line in proc.stdout:
                log.write(line)
                if line.startswith("[train]"):
                    logger.info(line.rstrip())
                    status.line(line)
            proc.wait()
        error = training_error(run, proc.returncode, timed_out.is_set(), recipe.training.timeout_s, status)
        status.finish(str(error) if error else None)
        if error:
            raise error
    return json.loads(run.training_stats.read_text())


@contextlib.contextmanager
def kill_at_deadline(proc: subprocess.Popen, seconds: float) -> Iterator[threading.Event]:
    """Kill the process group of `proc` after `seconds` (the event says whether it was); the reader of
    its output then sees EOF and the caller goes on."""
    timed_out = threading.Event()

    def kill():
        if proc.poll() is None:
            timed_out.set()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(seconds, kill)
    timer.daemon = True
    timer.start()
    try:
        yield timed_out
    finally:
        timer.cancel()


def training_error(run: RunFolder, returncode: int, timed_out: bool, timeout_s: float,
                   status: TrainingStatus) -> Exception | None:
    """Why training failed, naming the stage, the step reached and the log; None when it succeeded."""
    if timed_out:
        return StageTimeout("train", timeout_s, "training.timeout_s",
                            f"the training process was killed at step {status.status['step']}/"
                            f"{status.status['total_steps']}; checkpoints in {run.checkpoints_dir}; log {run.train_log}")
    if returncode != 0:
        tail = "\n".join(run.train_log.read_text().splitlines()[-15:])
        return RuntimeError(f"training failed (exit {returncode}); log {run.train_log}:\n{tail}")
    return None
