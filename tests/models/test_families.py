"""Per-family pieces without training: answers of a template with no end-of-turn token end with EOS, the
template's end-of-turn becomes the stop token, the architecture guard reads llama.cpp's registry, and the
Data Factory format (seed 002) loads as ShareGPT training rows."""

import json

import pytest

from tasks.data.prepare import DatasetError, load_datafactory_examples, load_examples
from tasks.export.convert import ExportError
from tasks.export.guard import check_architectures, gguf_architectures
from tasks.models.chat_templates import NAMED_TEMPLATES
from tasks.recipe import DeployConfig, ModelConfig, Recipe, repo_path
from tasks.train.worker import prepare_tokenizer, tokenize_row

ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell bob to review."},
                    {"role": "assistant", "content": "SLIP v1 me bob RequestReview"}]}


@pytest.fixture
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


def test_an_answer_without_an_end_of_turn_token_is_ended_with_eos(tokenizer):
    # A GLM-4-shaped template: an assistant turn ends where the next role tag begins, nothing closes it.
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}{% endfor %}"
                               "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}")
    tok = tokenize_row(ROW, tokenizer, 512)
    trained = [i for i, m in zip(tok["input_ids"], tok["completion_mask"]) if m]
    assert trained[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(trained[:-1]).strip() == ROW["messages"][-1]["content"]
    # A template that closes the turn itself gets nothing extra.
    prepare_tokenizer(tokenizer, ModelConfig(chat_template="chatml"))
    tok = tokenize_row(ROW, tokenizer, 512)
    trained = [i for i, m in zip(tok["input_ids"], tok["completion_mask"]) if m]
    assert tokenizer.decode(trained) == ROW["messages"][-1]["content"] + "<|im_end|>\n"


def test_a_named_template_makes_its_end_of_turn_the_stop_token_unless_it_renders_eos(tokenizer):
    prepare_tokenizer(tokenizer, ModelConfig(chat_template="chatml"))
    assert tokenizer.eos_token == "<|im_end|>"
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|user|>", "<|assistant|>",
                                                                 "<|system|>"]})
    eos = tokenizer.eos_token
    prepare_tokenizer(tokenizer, ModelConfig(chat_template="phi-4-mini"))   # renders eos_token itself
    assert tokenizer.eos_token == eos
    with pytest.raises(ValueError, match=r"'gemma-3' ends a turn with '<end_of_turn>', which is not a token"):
        prepare_tokenizer(tokenizer, ModelConfig(chat_template="gemma-3"))


def test_the_guard_reads_the_converters_registry_for_every_seed_family():
    archs = gguf_architectures()
    assert {a: archs[a] for a in ["LlamaForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM", "Glm4ForCausalLM",
                                  "Phi3ForCausalLM", "MistralForCausalLM"]} == {
        "LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Gemma3ForCausalLM": "gemma3",
        "Glm4ForCausalLM": "glm4", "Phi3ForCausalLM": "phi3", "MistralForCausalLM": "llama"}
    merged = Recipe(name="x")
    assert check_architectures(["Glm4ForCausalLM"], merged) == {"architecture": "Glm4ForCausalLM",
                                                                 "gguf_architecture": "glm4"}
    with pytest.raises(ExportError, match=r"\['MambaVisionForImageClassification'\] is not supported by "
                                          r"llama.cpp's converter .* no GGUF could be exported after training"):
        check_architectures(["MambaVisionForImageClassification"], merged)
    adapter = Recipe(name="x", deploy=DeployConfig(artifact="adapter"))
    assert check_architectures(["Qwen2ForCausalLM"], adapter)["gguf_architecture"] == "qwen2"
    with pytest.raises(ExportError, match=r"GGUF architecture 'gemma3'\): Ollama runs this architecture on its own "
                                          r"engine, which does not apply LoRA adapters"):
        check_architectures(["Gemma3ForCausalLM"], adapter)


def test_datafactory_rows_load_as_the_same_examples_as_their_sharegpt_source(tmp_path):
    factory = load_datafactory_examples(repo_path("data/slipstream-datafactory.jsonl"))
    source = load_examples(repo_path("data/slipstream-tqt.jsonl"))[:len(factory)]
    assert len(factory) == 800
    assert [(e.prompt, e.answer, e.anchor) for e in factory] == [(e.prompt, e.answer, e.anchor) for e in source]
    bad = tmp_path / "bad.jsonl"
    good = json.loads(repo_path("data/slipstream-datafactory.jsonl").read_text().splitlines()[0])
    bad.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "sys", "system": "x", "input": "hi", "output": "y"}) + "\n")
    with pytest.raises(DatasetError, match=r"bad.jsonl:2: datafactory.shape: 'system' is not a Data Factory field"):
        load_datafactory_examples(bad)


def test_every_built_in_template_names_its_turn_markers():
    for name, t in NAMED_TEMPLATES.items():
        assert t.end_of_turn and all(t.role_markers), name


def test_a_template_without_system_role_gets_a_modelfile_that_folds_the_system_prompt(tokenizer):
    from tasks.ollama.modelfile import build_modelfile
    from tasks.ollama.prompt import render_ollama_chat

    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>", "<bos>"]})
    tokenizer.bos_token = "<bos>"
    prepare_tokenizer(tokenizer, ModelConfig(chat_template="gemma-3"))
    mf = build_modelfile(tokenizer, "model.gguf", "You are terse.")
    assert mf.stop == ["<end_of_turn>", "<start_of_turn>"]
    for messages in (ROW["messages"][:2], ROW["messages"] + [{"role": "user", "content": "And alice?"}],
                     ROW["messages"][1:2]):
        want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert render_ollama_chat(mf.template, messages, system=None) == want
    # Without a system message Ollama prepends the Modelfile SYSTEM, folded like the recipe's prompt in training.
    assert render_ollama_chat(mf.template, ROW["messages"][1:2], system=mf.system).startswith(
        "<bos><start_of_turn>user\nYou are terse.\n\nTell bob")
    # A GGUF whose tokenizer adds BOS itself (Ollama's runner then adds it to every prompt): no BOS in TEMPLATE.
    bos_free = build_modelfile(tokenizer, "model.gguf", "You are terse.", gguf_adds_bos=True)
    assert bos_free.template == mf.template.removeprefix("<bos>")
    want = tokenizer.apply_chat_template(ROW["messages"][:2], tokenize=False, add_generation_prompt=True)
    assert "<bos>" + render_ollama_chat(bos_free.template, ROW["messages"][:2], system=None) == want
