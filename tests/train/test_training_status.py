"""Training progress a person can see (metrics/training-status.json, a Prefect progress artifact) and a
training process that runs past `training.timeout_s` is killed with a message naming the stage."""

import json

import pytest
from prefect import flow

from tasks.recipe import Recipe
from tasks.run import RunFolder, atomic_write_jsonl, new_run_dir
from tasks.timeouts import StageTimeout
from tasks.train.launch import train_adapter
from tasks.train.status import TrainingStatus, parse_step_line


def test_step_lines_become_the_status_file(tmp_path):
    run = RunFolder(new_run_dir(tmp_path, "status"))
    status = TrainingStatus(run, total_epochs=2.0)
    first = json.loads(run.training_status.read_text())
    assert first["running"] is True and first["step"] == 0 and first["started_at"].endswith("Z")
    assert parse_step_line("[train] mask check: {...}") is None
    status.line("[train] step 4/10 loss=2.5 grad_norm=1.2 learning_rate=0.001 num_tokens=2048 epoch=0.8 "
                "elapsed=8s eta=12s\n")
    status.line("[train] checkpoint step 4/10\n")
    now = json.loads(run.training_status.read_text())
    assert {k: now[k] for k in ("step", "total_steps", "loss", "learning_rate", "epoch", "eta_seconds",
                                "tokens_per_second", "checkpoint_step", "total_epochs")} == {
        "step": 4, "total_steps": 10, "loss": 2.5, "learning_rate": 0.001, "epoch": 0.8, "eta_seconds": 12.0,
        "tokens_per_second": 256.0, "checkpoint_step": 4, "total_epochs": 2.0}
    assert status.describe() == "step 4/10 · loss 2.5 · 256 tokens/s · ETA 12s"
    status.finish("boom")
    assert json.loads(run.training_status.read_text())["running"] is False


def _prepared_run(tmp_path, tiny_rows, **training) -> tuple[RunFolder, Recipe]:
    recipe = Recipe(name="tiny")
    for key, value in training.items():
        setattr(recipe.training, key, value)
    run = RunFolder(new_run_dir(tmp_path, "tiny"))
    run.recipe_json.write_text(recipe.model_dump_json(indent=2))
    for split, rows in (("train", tiny_rows[:8]), ("val", tiny_rows[8:10]), ("test", tiny_rows[10:12])):
        atomic_write_jsonl(run.split(split), rows)
    return run, recipe


@flow(name="train-only")
def train_only(recipe: Recipe, run_dir: str, base_dir: str):
    return train_adapter(recipe, run_dir, base_dir)


def test_a_training_process_past_its_timeout_is_killed_naming_the_stage(tmp_path, tiny_rows, base_model_dir):
    run, recipe = _prepared_run(tmp_path, tiny_rows, timeout_s=2)
    state = train_only(recipe, str(run), str(base_model_dir), return_state=True)
    assert state.is_failed()
    assert "stage 'train' timed out after 2s (training.timeout_s: 2): the training process was killed at step" \
        in state.message
    status = json.loads(run.training_status.read_text())
    assert status["running"] is False and "timed out" in status["error"]
    with pytest.raises(StageTimeout):
        state.result()


@pytest.mark.integration
def test_training_reports_progress_as_an_artifact_and_a_status_file(tmp_path, tiny_rows, base_model_dir):
    from prefect.client.orchestration import get_client

    run, recipe = _prepared_run(tmp_path, tiny_rows, max_steps=3, batch_size=4, logging_steps=1, save_steps=2)
    stats = train_only(recipe, str(run), str(base_model_dir))
    assert stats["steps"] == 3
    # training.allocator auto: mimalloc in a CPU process, the system's malloc in a GPU one (tasks/train/allocator.py)
    assert stats["allocator"] == ("mimalloc" if stats["device"] == "cpu" else "system")
    status = json.loads(run.training_status.read_text())
    assert status["running"] is False and status["error"] is None
    assert (status["step"], status["total_steps"]) == (3, 3) and status["checkpoint_step"] in (2, 3)
    assert status["checkpoint_at"].endswith("Z")
    assert status["loss"] > 0 and status["tokens_per_second"] > 0
    with get_client(sync_client=True) as client:
        [bar] = [a for a in client.read_artifacts() if a.key == f"training-{run.name}".replace("_", "-")]
    assert bar.type == "progress" and float(bar.data) == 100.0
    assert bar.description.startswith("step 3/3 · loss ")
