"""Hub and local bases: the real huggingface_hub client against a local mirror speaking the Hub's HTTP API
(tests/hub_mirror.py), the standard HF cache, offline reuse, and one clear error for each way it can fail."""

import os
import subprocess
import sys
import time

import pytest

from hub_mirror import hub_mirror
from tasks.models.bootstrap import resolve_base_model
from tasks.models.hub import ModelSourceError, cached_snapshot, check_hub_model, fetch_hub_model
from tasks.recipe import REPO_ROOT, ModelConfig
from tiny_models import tiny_model


@pytest.fixture(autouse=True)
def hub_online(monkeypatch):
    """tests/conftest.py sets HF_HUB_OFFLINE=1 for every other test; these talk to a local mirror."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def tiny_repo(base_model_dir, tmp_path_factory):
    return tiny_model("llama", base_model_dir, tmp_path_factory.mktemp("repo"))


def test_hub_model_is_downloaded_once_then_used_offline(tiny_repo, tmp_path):
    cache = tmp_path / "hf-cache"
    with hub_mirror({"acme/tiny-llama": tiny_repo}) as (endpoint, mirror):
        folder = fetch_hub_model("acme/tiny-llama", "main", endpoint=endpoint, cache_dir=cache)
        downloads = [p for m, p in mirror.requests if m == "GET" and "/resolve/" in p]
        assert {p.rsplit("/", 1)[1] for p in downloads} >= {"config.json", "model.safetensors", "tokenizer.json"}
        # In the standard cache layout, at the mirror's commit.
        assert folder.parent.parent.name == "models--acme--tiny-llama" and folder.name == mirror.commit[
            "acme/tiny-llama"]
        assert (folder / "model.safetensors").read_bytes() == (tiny_repo / "model.safetensors").read_bytes()
        # A second run downloads nothing.
        mirror.requests.clear()
        assert fetch_hub_model("acme/tiny-llama", "main", endpoint=endpoint, cache_dir=cache) == folder
        assert not [p for m, p in mirror.requests if m == "GET" and "/resolve/" in p]
    # With the Hub gone, the cached snapshot is used: the check passes and the fetch returns it.
    assert cached_snapshot("acme/tiny-llama", "main", cache) == folder
    assert check_hub_model("acme/tiny-llama", "main", endpoint=endpoint, cache_dir=cache) == []
    assert fetch_hub_model("acme/tiny-llama", "main", endpoint=endpoint, cache_dir=cache) == folder


def test_gated_missing_and_unknown_revision_are_one_clear_error_each(tiny_repo, tmp_path):
    with hub_mirror({"acme/tiny-llama": tiny_repo, "acme/gated": tiny_repo}, gated={"acme/gated"}) as (endpoint, _):
        with pytest.raises(ModelSourceError, match=r"model 'acme/gated' is gated on http://127\.0\.0\.1:\d+: accept "
                                                   r"its licence .* token"):
            fetch_hub_model("acme/gated", "main", endpoint=endpoint, cache_dir=tmp_path)
        with pytest.raises(ModelSourceError, match=r"model 'acme/gated' is gated"):
            check_hub_model("acme/gated", "main", endpoint=endpoint, cache_dir=tmp_path)
        with pytest.raises(ModelSourceError, match=r"model 'acme/missing' was not found on .*check model\.name"):
            check_hub_model("acme/missing", "main", endpoint=endpoint, cache_dir=tmp_path)
        with pytest.raises(ModelSourceError, match=r"model 'acme/tiny-llama' has no revision 'v9' .*model\.revision"):
            fetch_hub_model("acme/tiny-llama", "v9", endpoint=endpoint, cache_dir=tmp_path)


def test_an_unreachable_hub_fails_the_cli_in_seconds_with_one_message(tmp_path):
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "slipstream", "--set", "model.source=hf",
                           "--set", "model.name=acme/not-cached", "--set", "model.revision=v1"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode == 2 and elapsed < 60, (proc.returncode, elapsed, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line]
    assert lines == [f"model 'acme/not-cached' (revision 'v1') could not be fetched: http://127.0.0.1:9 is "
                     "unreachable and the HF cache has no copy; run once with network access (or copy the model "
                     "into the HF cache / a folder with model.source: local)"], proc.stderr[-2000:]


def test_cached_hub_model_resolves_offline_through_the_recipe(tiny_repo, tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    with hub_mirror({"acme/tiny-llama": tiny_repo}) as (endpoint, _):
        folder = fetch_hub_model("acme/tiny-llama", "main", endpoint=endpoint, cache_dir=cache)
    # The run's own path (resolve_base_model, as the bootstrap task calls it), with the Hub unreachable.
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "http://127.0.0.1:9")
    assert resolve_base_model(ModelConfig(source="hf", name="acme/tiny-llama")) == folder


def test_local_source_needs_a_model_folder(tiny_repo, tmp_path):
    assert resolve_base_model(ModelConfig(source="local", name=str(tiny_repo))) == tiny_repo
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match=r"is not a local HF model folder \(no config\.json\)"):
        resolve_base_model(ModelConfig(source="local", name=str(tmp_path / "empty")))


def test_dry_run_lists_downloads_memory_and_template_from_the_hub(tiny_repo, tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    with hub_mirror({"acme/tiny-llama": tiny_repo}) as (endpoint, mirror):
        proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "slipstream", "--dry-run", "--set",
                               "model.source=hf", "--set", "model.name=acme/tiny-llama", "--set",
                               "model.chat_template=chatml"], cwd=REPO_ROOT, env={**env, "HF_ENDPOINT": endpoint},
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    size = (tiny_repo / "model.safetensors").stat().st_size
    assert "base model:    acme/tiny-llama (source hf, revision main)" in out
    assert "architecture:  LlamaForCausalLM -> GGUF 'llama'" in out
    assert f"model.safetensors" in out and f"{size / 2**20:10.1f} MiB" in out
    assert "would download 6 of 6 files" in out or "would download 5 of 6 files" in out   # config.json may be cached
    assert "memory:        ~" in out and "GiB peak for training" in out
    assert "chat template: chatml (model.chat_template, built-in)" in out
    # Nothing but the config (for the estimate) was fetched: no weights.
    assert not [p for m, p in mirror.requests if m == "GET" and p.endswith(".safetensors")]
