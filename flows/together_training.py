"""`remote-training`: the Together leg of the finetune flow (training.engine: together), a subflow that
only wires tasks/together/engine.py: files → upload → job → wait → adapter. It returns the training stats
a local run's train_adapter returns, and leaves the same lora/ and metrics/ behind, so everything after
training (merge, export, evaluation, gates, deployment) is the same for both engines.

Cancelling the flow run cancels the remote job (the wait task on a stop signal, and the on_cancellation
hook for a run a worker kills); a crash does not: re-running with resume_from re-attaches to the job.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tasks.recipe import Recipe
from tasks.together.engine import (download_adapter, submit_job, upload_training_files, wait_for_job,
                                   write_together_files)
from tasks.together.hooks import cancel_remote_job


@flow(name="remote-training", on_cancellation=[cancel_remote_job])
def remote_training(recipe: Recipe, run_dir: Path, base_dir: Path) -> dict:
    """Train the recipe's LoRA on Together and bring the adapter home; returns the training stats."""
    files = write_together_files(run_dir, recipe)
    uploaded = upload_training_files(run_dir, recipe, files)
    job = submit_job(run_dir, recipe, uploaded)
    finished = wait_for_job(run_dir, recipe, job)
    return download_adapter(run_dir, recipe, base_dir, finished)
