"""The base model bootstrap: the HF folder must tokenize and answer like the GGUF it came from."""

import json
import urllib.request

import pytest

from tasks.models.bootstrap import embedded_gguf_path
from tasks.llamacpp.serve import llama_server

pytestmark = pytest.mark.integration

SAMPLES = ["Hello world 2024!\n  tabs\tand  spaces", "SLIP v1 ml_engineer executor RequestTask artifact: model_v2.4.1",
           "<|im_start|>user\nTell bob to review the auth code<|im_end|>\n<|im_start|>assistant\n", "ünïcödé — 12345"]


def test_hf_tokenizer_matches_llama_cpp_on_the_embedded_gguf(base_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|im_end|>"
    with llama_server(embedded_gguf_path(), tmp_path / "server.log", parallel=1) as server:
        for text in SAMPLES:
            body = json.dumps({"content": text, "add_special": False, "parse_special": True}).encode()
            request = urllib.request.Request(f"http://127.0.0.1:{server.port}/tokenize", data=body,
                                             headers={"Content-Type": "application/json"})
            llama_ids = json.load(urllib.request.urlopen(request, timeout=30))["tokens"]
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == llama_ids, text
            assert tokenizer.decode(llama_ids) == text


def test_bootstrapped_folder_is_a_plain_hf_model(base_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((base_model_dir / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    assert 130e6 < sum(p.numel() for p in model.parameters()) < 140e6
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
