"""Ollama >= 0.34.1 refuses ADAPTER (ollama/ollama#14969): the deployment asks the server's version and,
for one that refuses, ships the base GGUF with the LoRA merged in by llama.cpp's llama-export-lora; an
older Ollama still gets FROM base + ADAPTER. Against the Ollama API double (tests/ollama_api_server.py)
playing each version, with the real exported GGUFs of a trained run."""

import json
import os
import shutil

import gguf
import pytest

from ollama_api_server import ollama_api_server
from tasks.eval.runners import generate_openai
from tasks.llamacpp.serve import ManagedLlamaServer
from tasks.ollama.modelfile import write_modelfile
from tasks.release.deploy import deploy_ollama

pytestmark = pytest.mark.integration


def _copy_run(run_dir, tmp_path):
    """data/ and lora/ linked, gguf/ a folder of links (the merged GGUF is written into the copy only)."""
    alt = tmp_path / "run"
    alt.mkdir()
    for sub in ("data", "lora"):
        os.symlink(run_dir / sub, alt / sub)
    (alt / "gguf").mkdir()
    for f in (run_dir / "gguf").iterdir():
        os.symlink(f, alt / "gguf" / f.name) if f.suffix == ".gguf" else shutil.copy(f, alt / "gguf" / f.name)
    (alt / "metrics").mkdir()
    (alt / "deploy").mkdir()
    return alt


@pytest.mark.parametrize("version, merged", [("0.34.1", True), ("0.33.0", False)])
def test_adapter_deploy_follows_what_the_ollama_version_accepts(exported_run, tmp_path, version, merged):
    run_dir, recipe, ggufs = exported_run
    alt = _copy_run(run_dir, tmp_path)
    with ManagedLlamaServer(ggufs["q8_0"], tmp_path / "up.log", parallel=1) as upstream, \
            ollama_api_server(upstream.root_url, version=version) as (url, state):
        adapter = recipe.model_copy(deep=True)
        adapter.deploy = adapter.deploy.model_copy(update={"target": "ollama", "ollama_host": url,
                                                           "artifact": "adapter"})
        write_modelfile.fn(alt, adapter, ggufs)
        record = deploy_ollama(alt, adapter, 8)
        stored = json.loads(json.dumps(state.models[record["model"] + ":latest"], default=str))
    assert record["ollama_version"] == version
    if not merged:
        assert record["path"] == "FROM base + ADAPTER" and set(record["adapters"]) == {"lora-f16.gguf"}
        assert not (alt / "gguf" / "model-lora-merged-f16.gguf").exists()
        return
    assert record["path"] == "merged by llama-export-lora (Ollama 0.34.1 refuses ADAPTER)"
    assert record["adapters"] == {} and set(record["files"]) == {"model-lora-merged-f16.gguf"}
    assert not stored["adapters"]
    merged_gguf = alt / "gguf" / "model-lora-merged-f16.gguf"
    reader = gguf.GGUFReader(merged_gguf)
    assert reader.fields["general.type"].contents() == "model"
    assert len(reader.tensors) == len(gguf.GGUFReader(ggufs["base"]).tensors)
    # The merged GGUF answers as base + LoRA does (greedy, llama.cpp on both sides).
    row = json.loads((run_dir / "data" / "test.jsonl").read_text().splitlines()[0])
    with ManagedLlamaServer(merged_gguf, tmp_path / "m.log", parallel=1) as one, \
            ManagedLlamaServer(ggufs["base"], tmp_path / "b.log", parallel=1, lora_path=ggufs["lora"]) as two:
        assert generate_openai(one.base_url, one.alias, [row], 24, 1)[0] == \
            generate_openai(two.base_url, two.alias, [row], 24, 1)[0]
