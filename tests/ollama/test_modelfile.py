"""Modelfiles derived from the training tokenizer, and the ADAPTER refusals, on real GGUFs."""

import copy
import json
import shutil

import pytest

from tasks.export.convert import convert_hf_to_gguf, convert_lora_to_gguf
from tasks.ollama.adapter_guard import (ModelfileRefused, base_identity, check_adapter_deployable, gguf_metadata,
                                        quantized_training_reason)
from tasks.ollama.modelfile import Modelfile, ModelfileError, build_modelfile, deployed_artifact, write_modelfile
from tasks.ollama.prompt import render_ollama_chat
from tasks.recipe import Recipe
from tasks.run import RunFolder
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


def test_derived_template_renders_every_conversation_like_the_jinja_template(tokenizer, tiny_rows):
    mf = build_modelfile(tokenizer, "./model.gguf", system=tiny_rows[0]["messages"][0]["content"])
    assert mf.stop == ["<|im_end|>", "<|im_start|>"]
    assert ("temperature", "0") in mf.parameters and ("repeat_penalty", "1") in mf.parameters
    for row in tiny_rows:
        prompt = row["messages"][:-1]
        want = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        assert render_ollama_chat(mf.template, prompt, mf.system) == want
        # Without a system message, Ollama fills in SYSTEM: the training prompt again.
        assert render_ollama_chat(mf.template, prompt[1:], mf.system) == want


def test_modelfile_round_trips_through_its_text(tokenizer):
    mf = build_modelfile(tokenizer, "../gguf/base-f16.gguf", system='Say "hi".', adapter="../gguf/lora-f16.gguf")
    text = mf.render("header line")
    assert text.startswith("# header line\nFROM ../gguf/base-f16.gguf\nADAPTER ../gguf/lora-f16.gguf\nTEMPLATE \"\"\"")
    back = Modelfile.parse(text)
    assert (back.from_, back.adapter, back.template, back.system, back.parameters) == \
        (mf.from_, mf.adapter, mf.template, mf.system, mf.parameters)
    with pytest.raises(ModelfileError, match="unknown instruction QUANTISE"):
        Modelfile.parse("FROM x\nQUANTISE q4\n")


def test_the_deployed_artifact_is_what_the_modelfile_names_relative_to_deploy(tmp_path):
    run = RunFolder(tmp_path)
    run.gguf_dir.mkdir()
    for path in (run.gguf("q8_0"), run.lora_gguf, run.base_gguf):
        path.touch()
    merged = Modelfile(from_=run.relative_to_deploy(run.gguf("q8_0")))
    assert merged.from_ == "../gguf/model-q8_0.gguf"
    assert deployed_artifact(run, merged) == (run.gguf("q8_0").resolve(), None)
    # FROM an Ollama model + ADAPTER: llama.cpp serves the exported base with the LoRA.
    registry = Modelfile(from_="smollm2:135m", adapter=run.relative_to_deploy(run.lora_gguf))
    assert deployed_artifact(run, registry) == (run.base_gguf, run.lora_gguf.resolve())
    with pytest.raises(ModelfileError, match="FROM 'smollm2:135m' is not a local GGUF"):
        deployed_artifact(run, Modelfile(from_="smollm2:135m"))


def test_a_template_that_merges_system_into_the_user_turn_is_refused(tokenizer):
    llama2 = copy.deepcopy(tokenizer)
    llama2.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}{% set sys = m['content'] %}"
                            "{% elif m['role'] == 'user' %}[INST] {% if loop.index0 == 1 %}<<SYS>>{{ messages[0]['content'] }}"
                            "<</SYS>> {% endif %}{{ m['content'] }} [/INST]{% else %} {{ m['content'] }}<|im_end|>"
                            "{% endif %}{% endfor %}")
    with pytest.raises(ModelfileError, match="Ollama TEMPLATE|cannot isolate|not followed by a plain user block"):
        build_modelfile(llama2, "./m.gguf", system="s")


def test_a_template_without_an_end_of_turn_token_is_refused(tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ModelfileError, match="not with a special token"):
        build_modelfile(plain, "./m.gguf", system="s")


# --------------------------------------------------------------------------- ADAPTER refusals (real GGUFs)

@pytest.mark.integration
def test_adapter_on_another_base_is_refused(exported_run, base_model_dir, tmp_path):
    run_dir, _, ggufs = exported_run
    trained = base_identity(gguf_metadata(run_dir / "gguf" / "base-f16.gguf")[0])
    other = convert_hf_to_gguf(tiny_model("llama", base_model_dir, tmp_path / "tiny"), tmp_path / "tiny.gguf", "f16")
    other_kv, other_tensors = gguf_metadata(other)
    with pytest.raises(ModelfileRefused, match=r"^ADAPTER refused: the adapter's base does not match FROM: general.size_label is '135M' for the "
                                                  r"base it was trained on, '[\d.]+M' for FROM$"):
        check_adapter_deployable(run_dir / "gguf" / "lora-f16.gguf", trained, base_identity(other_kv), other_tensors,
                                 None, False)
    # Same metadata but other weights' shapes (e.g. a renamed GGUF): the tensor check still refuses.
    with pytest.raises(ModelfileRefused, match=r"changes blk\.0\.\S+ of shape \(\d+, \d+\), FROM has \(\d+, \d+"):
        check_adapter_deployable(run_dir / "gguf" / "lora-f16.gguf", trained, trained, other_tensors, None, False)
    # The real base passes.
    base_kv, base_tensors = gguf_metadata(run_dir / "gguf" / "base-f16.gguf")
    check_adapter_deployable(run_dir / "gguf" / "lora-f16.gguf", trained, base_identity(base_kv), base_tensors, None, False)


@pytest.mark.integration
def test_qlora_adapter_is_refused_unless_the_recipe_says_so(exported_run):
    run_dir, _, ggufs = exported_run
    recipe = Recipe.model_validate({"name": "tiny", "model": {"load_in_4bit": True}, "deploy": {"artifact": "adapter"}})
    assert quantized_training_reason(recipe, run_dir / "lora") == "recipe model.load_in_4bit: true"
    before = (run_dir / "deploy" / "Modelfile").read_text()
    with pytest.raises(ModelfileRefused) as err:
        write_modelfile.fn(run_dir, recipe, ggufs)
    assert str(err.value).count("\n") == 0 and "trained on a quantized base" in str(err.value)
    assert "deploy.allow_qlora_adapter: true" in str(err.value)
    assert (run_dir / "deploy" / "Modelfile").read_text() == before, "a refused Modelfile is never written"
    # An unsloth-style 4-bit base named in the adapter config is recognised too.
    lora = run_dir.parent / "lora-bnb"
    shutil.copytree(run_dir / "lora", lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "unsloth/SmolLM2-135M-Instruct-bnb-4bit"
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    assert "bnb-4bit" in quantized_training_reason(Recipe(name="x"), lora)


@pytest.mark.integration
def test_adapter_for_an_architecture_ollama_runs_on_its_own_engine_is_refused(base_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = tiny_model("qwen3", base_model_dir, tmp_path / "qwen3")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft.save_pretrained(tmp_path / "lora")
    adapter = convert_lora_to_gguf(tmp_path / "lora", base, tmp_path / "lora.gguf")
    base_gguf = convert_hf_to_gguf(base, tmp_path / "qwen3.gguf", "f16")
    kv, tensors = gguf_metadata(base_gguf)
    assert gguf_metadata(adapter)[0]["general.architecture"] == "qwen3"
    with pytest.raises(ModelfileRefused, match="Ollama runs 'qwen3' models on its own engine.*deploy.artifact: merged"):
        check_adapter_deployable(adapter, base_identity(kv), base_identity(kv), tensors, None, False)
