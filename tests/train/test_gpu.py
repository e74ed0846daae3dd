"""GPU paths: bf16 training on one GPU, and DDP through `accelerate launch` on two. Skipped without CUDA
(CI has none); run on a GPU machine with `pytest tests/test_gpu.py`."""

import json
import subprocess

import pytest

from conftest import REPO, gpu_test
from tasks.recipe import Recipe
from tasks.run import atomic_write_jsonl, new_run_dir
from tasks.train.command import training_command

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def _prepare(tmp_path, tiny_rows, **training):
    recipe = Recipe(name="gpu")
    for key, value in {"epochs": 8, "batch_size": 4, "logging_steps": 1, "save_steps": 100,
                       "warmup_ratio": 0.0, "lr_scheduler": "constant", **training}.items():
        setattr(recipe.training, key, value)
    run_dir = new_run_dir(tmp_path, "gpu")
    (run_dir / "recipe.json").write_text(recipe.model_dump_json())
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:8])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", tiny_rows[8:10])
    return recipe, run_dir


def _run_training(recipe, run_dir, base_dir):
    proc = subprocess.run(training_command(recipe, run_dir, base_dir), cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "metrics" / "training-stats.json").read_text())


@gpu_test(1)
def test_single_gpu_bf16_training(tmp_path, tiny_rows, base_model_dir):
    recipe, run_dir = _prepare(tmp_path, tiny_rows)
    stats = _run_training(recipe, run_dir, base_model_dir)
    losses = [h["loss"] for h in stats["history"] if "loss" in h]
    assert stats["device"] == "cuda" and stats["mixed_precision"] == "bf16" and stats["world_size"] == 1
    assert stats["trainable_tensors_changed"] == stats["trainable_tensors"]
    assert losses[-1] < 0.7 * losses[0]


@gpu_test(2)
def test_ddp_on_two_gpus_through_accelerate(tmp_path, tiny_rows, base_model_dir):
    recipe, run_dir = _prepare(tmp_path, tiny_rows, accelerate_config="ddp")
    stats = _run_training(recipe, run_dir, base_model_dir)
    losses = [h["loss"] for h in stats["history"] if "loss" in h]
    assert stats["world_size"] == 2 and stats["device"] == "cuda"
    # 8 rows, batch 4 per GPU, 2 GPUs: one optimizer step per epoch.
    assert stats["steps"] == 8
    assert losses[-1] < losses[0]
    assert (run_dir / "lora" / "adapter_model.safetensors").exists()


@gpu_test(1)
@pytest.mark.parametrize("fields", [{"training.engine": "unsloth"},
                                    {"training.engine": "unsloth", "model.load_in_4bit": True},
                                    {"training.packing": True, "model.dtype": "bfloat16"}],
                         ids=["unsloth-16bit", "qlora", "trl-packed"])
def test_gpu_engines_train(tmp_path, tiny_rows, base_model_dir, fields):
    recipe, run_dir = _prepare(tmp_path, tiny_rows)
    for dotted, value in fields.items():
        section, key = dotted.split(".")
        setattr(getattr(recipe, section), key, value)
    (run_dir / "recipe.json").write_text(recipe.model_dump_json())
    stats = _run_training(recipe, run_dir, base_model_dir)
    losses = [h["loss"] for h in stats["history"] if "loss" in h]
    assert stats["engine"] == recipe.training.engine and stats["trainable_tensors_changed"] > 0
    assert losses[-1] < losses[0]


@gpu_test(2)
def test_zero2_on_two_gpus_through_accelerate(tmp_path, tiny_rows, base_model_dir):
    recipe, run_dir = _prepare(tmp_path, tiny_rows, accelerate_config="zero2")
    stats = _run_training(recipe, run_dir, base_model_dir)
    assert stats["world_size"] == 2 and stats["steps"] == 8
    assert stats["trainable_tensors_changed"] == stats["trainable_tensors"]
