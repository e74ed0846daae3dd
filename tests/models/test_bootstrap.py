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


GEMMA_SAMPLES = SAMPLES + ["<bos><start_of_turn>user\nYou are X.\n\nTranslate: bonjour  à   l'école\t tab<end_of_turn>\n"
                           "<start_of_turn>model\n", "   leading spaces and 🤖 emoji ß ǅ 中文字符", "a\n\n\n  b\t\tc  \n d"]


@pytest.fixture(scope="module")
def gemma_dir():
    from tasks.models.bootstrap import resolve_base_model
    from tasks.recipe import ModelConfig

    return resolve_base_model(ModelConfig(source="gemma3-270m", name="gemma-3-270m"))


def test_gemma_base_tokenizes_and_answers_like_its_gguf(gemma_dir, tmp_path):
    """The second embedded base: its SentencePiece vocabulary rebuilt from the GGUF tokenizes exactly like
    llama.cpp, the upstream gemma-3 template is in the tokenizer, and greedy answers agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.models.chat_templates import NAMED_TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
    assert tokenizer.chat_template == NAMED_TEMPLATES["gemma-3"].jinja and tokenizer.eos_token == "<end_of_turn>"
    assert (gemma_dir / "tokenizer.model").exists()   # what llama.cpp's converter reads back at export
    assert json.loads((gemma_dir / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(gemma_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\nWhat is")   # system folded into the user turn
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    hf_answer = tokenizer.decode(model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:])
    with llama_server(embedded_gguf_path("gemma3-270m"), tmp_path / "server.log", parallel=1) as server:
        base = f"http://127.0.0.1:{server.port}"
        for text in GEMMA_SAMPLES:
            body = json.dumps({"content": text, "add_special": False, "parse_special": True}).encode()
            request = urllib.request.Request(base + "/tokenize", data=body, headers={"Content-Type": "application/json"})
            assert tokenizer(text, add_special_tokens=False)["input_ids"] == json.load(
                urllib.request.urlopen(request, timeout=30))["tokens"], text
        body = json.dumps({"prompt": prompt.removeprefix("<bos>"), "n_predict": 8, "temperature": 0}).encode()
        request = urllib.request.Request(base + "/completion", data=body, headers={"Content-Type": "application/json"})
        assert json.load(urllib.request.urlopen(request, timeout=60))["content"] == hf_answer
