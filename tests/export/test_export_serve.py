"""Real GGUF export with llama.cpp's converter and quantizer, loaded and answered from by llama-server."""

import json

import pytest

from tasks.eval.measure import run_and_score
from tasks.eval.runners import generate_openai, served_model_runner
from tasks.export.convert import (convert_hf_to_gguf, convert_lora_to_gguf, merge_adapter, quantize_gguf,
                          write_manifest)
from tasks.llamacpp.serve import llama_server

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def exported(trained_run, base_model_dir):
    run_dir, _ = trained_run
    merged = merge_adapter(base_model_dir, run_dir / "lora", run_dir / "merged")
    f16 = convert_hf_to_gguf(merged, run_dir / "gguf" / "model-f16.gguf", "f16")
    q8 = quantize_gguf(f16, run_dir / "gguf" / "model-q8_0.gguf", "q8_0")
    lora = convert_lora_to_gguf(run_dir / "lora", base_model_dir, run_dir / "gguf" / "lora-f16.gguf")
    base_f16 = convert_hf_to_gguf(base_model_dir, run_dir / "gguf" / "base-f16.gguf", "f16")
    return run_dir, {"f16": f16, "q8_0": q8, "lora": lora, "base_f16": base_f16}


def test_gguf_files_are_real_and_quantized_smaller(exported):
    run_dir, files = exported
    for path in files.values():
        assert path.read_bytes()[:4] == b"GGUF"
    assert files["q8_0"].stat().st_size < 0.6 * files["f16"].stat().st_size
    manifest = write_manifest(run_dir, {k: v for k, v in files.items()})
    assert manifest["q8_0"]["bytes"] == files["q8_0"].stat().st_size
    assert len(manifest["q8_0"]["sha256"]) == 64
    assert json.loads((run_dir / "gguf" / "manifest.json").read_text()) == manifest


def test_llama_server_answers_from_the_q8_0_gguf(exported, tiny_rows):
    run_dir, files = exported
    rows = tiny_rows[10:12]
    with llama_server(files["q8_0"], run_dir / "metrics" / "server-test.log", alias="ft") as server:
        summary, records = run_and_score(served_model_runner(server.base_url, server.model, 32), rows, "serve-test")
        process = server.process
    assert process.poll() is not None, "the server must be stopped when the block ends"
    assert summary["rows"] == 2 and summary["generated_tokens"] > 0 and len(records) == 2
    assert all(r["answer"].strip() for r in records)


def test_llama_server_applies_the_lora_gguf_to_the_base(exported, tiny_rows):
    run_dir, files = exported
    with llama_server(files["base_f16"], run_dir / "metrics" / "server-lora.log", lora_path=files["lora"]) as s:
        answers, tokens = generate_openai(s.base_url, s.model, tiny_rows[:1], max_new_tokens=16)
    assert tokens > 0 and answers[0].strip()
    assert "loaded" in (run_dir / "metrics" / "server-lora.log").read_text().lower()
