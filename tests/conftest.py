"""Shared fixtures. Prefect state goes to a throwaway PREFECT_HOME so tests never touch the user's."""

import json
import os
import tempfile
from pathlib import Path

import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="slipway-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_UI_ENABLED", "false")
# The ephemeral API server starts in a subprocess; on a loaded 2-core machine 20 s (the default) is not enough.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent
ASSETS = Path(__file__).resolve().parent / "assets"


def gpu_test(n: int = 1):
    """Skip unless n CUDA GPUs are visible (CI has none)."""
    import torch

    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} CUDA GPU(s)")


@pytest.fixture(scope="session")
def base_model_dir() -> Path:
    from tasks.models.bootstrap import resolve_base_model
    from tasks.recipe import ModelConfig

    return resolve_base_model(ModelConfig())


@pytest.fixture(scope="session")
def tiny_rows() -> list[dict]:
    """Twelve real Slipstream rows (tests/assets/slipstream-tiny.jsonl) as chat rows."""
    from tasks.data.prepare import load_examples, to_messages
    from tasks.recipe import ModelConfig

    system = ModelConfig().system_prompt
    return [to_messages(ex, system) for ex in load_examples(ASSETS / "slipstream-tiny.jsonl")]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, base_model_dir, tiny_rows):
    """A run folder after a real 8-step LoRA training of SmolLM2 on 8 rows (one batch, seen 8 times)."""
    from tasks.recipe import Recipe
    from tasks.run import atomic_write_jsonl, new_run_dir
    from tasks.train.worker import train

    recipe = Recipe(name="tiny")
    recipe.training.epochs = 8
    recipe.training.batch_size = 8
    recipe.training.logging_steps = 1
    recipe.training.save_steps = 4
    recipe.training.warmup_ratio = 0.0
    recipe.training.lr_scheduler = "constant"
    run_dir = new_run_dir(tmp_path_factory.mktemp("runs"), "tiny")
    (run_dir / "recipe.json").write_text(recipe.model_dump_json())
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:8])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", tiny_rows[8:10])
    atomic_write_jsonl(run_dir / "data" / "test.jsonl", tiny_rows[10:12])
    stats = train(recipe, run_dir, base_model_dir)
    return run_dir, stats


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


@pytest.fixture(scope="session")
def exported_run(trained_run, base_model_dir, tmp_path_factory):
    """A copy of `trained_run` after the real export (merge, f16/q8_0/q4_k_m GGUF, LoRA + base GGUF, manifest)
    and its Modelfile: (run_dir, recipe, ggufs). A copy, so tests that rewrite a run's gguf/ never meet."""
    import shutil

    from tasks.export.convert import export_gguf, merge_lora_adapter
    from tasks.ollama.modelfile import write_modelfile
    from tasks.recipe import ExportConfig, Recipe
    from tasks.run import new_run_dir

    source, _ = trained_run
    run_dir = new_run_dir(tmp_path_factory.mktemp("exported"), "tiny")
    for sub in ("lora", "data"):
        shutil.copytree(source / sub, run_dir / sub, dirs_exist_ok=True)
    recipe = Recipe(name="tiny", export=ExportConfig(gguf_types=["f16", "q8_0", "q4_k_m"], parity_rows=2))
    (run_dir / "recipe.json").write_text(recipe.model_dump_json())
    merge_lora_adapter.fn(run_dir, base_model_dir)
    ggufs = export_gguf.fn(run_dir, base_model_dir, recipe.export)
    write_modelfile.fn(run_dir, recipe, ggufs)
    return run_dir, recipe, ggufs


@pytest.fixture
def langfuse_receiver(monkeypatch):
    """A local Langfuse ingestion receiver (tests/receivers.py), the LANGFUSE_* variables pointing the client
    at it, and the tracing module's cached client reset around the test."""
    from receivers import LangfuseReceiver
    from tasks import tracing

    with LangfuseReceiver() as rec:
        for key, value in rec.env().items():
            monkeypatch.setenv(key, value)
        tracing.reset()
        yield rec
    tracing.reset()
