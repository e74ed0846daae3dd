"""Run folders and atomic writes.

Every run writes into its own folder `runs/<recipe>-<timestamp>/`; a file appears under its final name
only when complete (write to a temp name, fsync, rename), and `COMPLETE` is written last, so a crashed
run never looks complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from prefect import task

RUN_SUBDIRS = ("data", "checkpoints", "lora", "merged", "gguf", "metrics")
COMPLETE_MARKER = "COMPLETE"


def slipway_home() -> Path:
    """Where cached artifacts (the converted base model, llama.cpp tools) live across runs."""
    home = Path(os.environ.get("SLIPWAY_HOME", Path.home() / ".cache" / "slipway"))
    home.mkdir(parents=True, exist_ok=True)
    return home


def new_run_dir(output_root: str | Path, recipe_name: str, run_name: str | None = None) -> Path:
    """Create an isolated run folder with the standard sub-folders; never reuse an existing one."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = Path(output_root) / (run_name or f"{recipe_name}-{stamp}")
    run_dir, n = base, 1
    while run_dir.exists():
        n += 1
        run_dir = base.with_name(f"{base.name}-{n}")
    for sub in RUN_SUBDIRS:
        (run_dir / sub).mkdir(parents=True)
    return run_dir


def atomic_write_text(path: Path, text: str) -> Path:
    """Write text so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_write_jsonl(path: Path, rows) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside `target`; rename it to `target` only if the block succeeds."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def mark_complete(run_dir: Path, summary: dict) -> None:
    """Written last: its presence means every stage finished (gates may still have failed)."""
    atomic_write_json(Path(run_dir) / COMPLETE_MARKER, summary)


def is_complete(run_dir: Path) -> bool:
    return (Path(run_dir) / COMPLETE_MARKER).exists()


@contextlib.contextmanager
def stage_timer(run_dir: Path, stage: str) -> Iterator[None]:
    """Record how long a stage took in metrics/timings.json (the report's timing table)."""
    import time

    start = time.time()
    status = "failed"
    try:
        yield
        status = "ok"
    finally:
        path = Path(run_dir) / "metrics" / "timings.json"
        timings = json.loads(path.read_text()) if path.exists() else {}
        timings[stage] = {"seconds": round(time.time() - start, 1), "status": status}
        atomic_write_json(path, timings)



@task(name="create-run-folder")
def create_run_folder(output_root: str, recipe, run_name: str | None = None, resume_from: str | None = None) -> Path:
    """A fresh, isolated run folder holding the fully resolved recipe (what the trainer will read), or
    an earlier run that did not complete, to resume (training restarts from its last checkpoint).

    Raises:
        ValueError: the folder to resume is complete, missing, or was made with another recipe.
    """
    if resume_from:
        run_dir = Path(resume_from).resolve()
        if not (run_dir / "recipe.json").exists():
            raise ValueError(f"resume_from {run_dir}: not a run folder (no recipe.json)")
        if is_complete(run_dir):
            raise ValueError(f"resume_from {run_dir}: that run completed; start a new one")
        if (run_dir / "recipe.json").read_text() != recipe.model_dump_json(indent=2):
            raise ValueError(f"resume_from {run_dir}: made with a different recipe; resume with the same one")
        return run_dir
    run_dir = new_run_dir(output_root, recipe.name, run_name)
    atomic_write_text(run_dir / "recipe.json", recipe.model_dump_json(indent=2))
    return run_dir.resolve()
