"""The command that trains and the process group it runs in: no Prefect, so a GPU machine's scripts
(bench/) and the Prefect task (launch.py) start training the same way.

`training_command` checks the recipe against the GPUs the process will see (engines.check_engine) and
gives `accelerate launch` one process per visible GPU; `training_env` is the environment it starts with
(the allocator of a CPU process); `process_group` ends the launcher and every rank it started when the
caller leaves its block (cancellation, timeout, error).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import yaml

from tasks.recipe import REPO_ROOT, Recipe
from tasks.run import RunFolder
from tasks.train import worker
from tasks.train.allocator import allocator_env
from tasks.train.engines import check_engine

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


def visible_gpus() -> int:
    """CUDA GPUs a training process started from here will see: CUDA_VISIBLE_DEVICES when set (a pool
    worker pinned to some GPUs), else every GPU torch finds."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [d.strip() for d in visible.split(",") if d.strip()]
        # CUDA stops at the first invalid id ("-1" hides every GPU).
        count = 0
        for d in ids:
            if d.startswith("-"):
                break
            count += 1
        return count
    import torch

    return torch.cuda.device_count()


def distributed_type(config: Path) -> str:
    """The accelerate config's distributed_type (NO, MULTI_GPU, DEEPSPEED, ...)."""
    return str((yaml.safe_load(config.read_text()) or {}).get("distributed_type", "NO"))


def training_command(recipe: Recipe, run_dir: Path | RunFolder, base_dir: Path, gpus: int | None = None) -> list[str]:
    """The process that trains: plain Python, or `accelerate launch` (DDP / DeepSpeed ZeRO-2) with one
    process per visible GPU (the config files leave the count to this: a pool worker may see 2 or 8).

    Raises:
        EngineError: the recipe's engine, precision or launcher cannot run with `gpus` GPUs (engines.py).
    """
    gpus = visible_gpus() if gpus is None else gpus
    args = ["-m", worker.__name__, str(run_dir), "--base", str(base_dir)]
    if not recipe.training.accelerate_config:
        check_engine(recipe, gpus, None)
        return [sys.executable, *args]
    config = resolve_accelerate_config(recipe.training.accelerate_config)
    kind = distributed_type(config)
    check_engine(recipe, gpus, kind)
    processes = 1 if kind == "NO" else gpus
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", str(processes), *args]


def training_env(recipe: Recipe, gpus: int | None = None) -> dict[str, str]:
    """The environment the training process starts with: this one, plus the recipe's allocator
    (training.allocator: mimalloc preloaded into a CPU process, allocator.py).

    Raises:
        AllocatorError: the recipe asks for an allocator this machine does not have.
    """
    gpus = visible_gpus() if gpus is None else gpus
    return allocator_env(recipe.training.allocator, on_cpu=gpus == 0)


@contextmanager
def process_group(cmd: list[str], **popen):
    """Start `cmd` as the leader of its own process group; on leaving the block for any reason (an error,
    a Prefect cancellation or timeout, Ctrl-C) the whole group is ended: `accelerate launch` and every
    rank it started, not only the launcher."""
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None or proc.returncode != 0:   # cancelled, timed out, or ranks outliving a failure
            end_process_group(proc)


def end_process_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM to the whole group (ranks save nothing on it, but exit cleanly), SIGKILL after `grace_s`."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)   # whatever of the group is still there
    except ProcessLookupError:
        pass
    proc.wait()
