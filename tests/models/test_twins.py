"""Every seed family end to end on its tiny twin (tests/twins.py): train a few real LoRA steps with the family's
chat template and response-only mask -> merge -> GGUF (llama.cpp's converter) -> llama.cpp answers -> the
template-verified gate passes; and the same GGUF with another family's template fails the gate."""

import json
import shutil
import subprocess
import sys
import urllib.request

import pytest

from tasks.export.convert import convert_hf_to_gguf, merge_adapter
from tasks.export.template_check import check_run, gate
from tasks.llamacpp import build as llamacpp
from tasks.llamacpp.serve import llama_server
from tasks.models.chat_templates import NAMED_TEMPLATES
from tasks.ollama.modelfile import write_modelfile
from tasks.recipe import ExportConfig, LoraConfig, ModelConfig, Recipe
from tasks.run import RunFolder, atomic_write_jsonl, new_run_dir
from tasks.train.worker import train
from twins import FAMILIES, cached_twin

pytestmark = pytest.mark.integration

# The template each family's GGUF is re-labelled with to prove the gate catches a mismatch.
MISMATCH = {"llama": "chatml", "qwen2": "llama-3.1", "gemma3": "chatml", "glm4": "chatml", "phi3": "chatml"}


def _assistant_marker_ids(tokenizer, family) -> list[int]:
    """The tokens that open the assistant turn in this family's template (what the mask must start after)."""
    marker = NAMED_TEMPLATES[FAMILIES[family].template].role_markers[2]
    return tokenizer(marker.rstrip("\n") if family == "glm4" else marker, add_special_tokens=False)["input_ids"]


def _set_gguf_template(src, dst, template: str) -> None:
    """Copy a GGUF with another tokenizer.chat_template (llama.cpp's own gguf_new_metadata script)."""
    script = llamacpp.source_dir() / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"
    env = {"PYTHONPATH": str(llamacpp.source_dir() / "gguf-py"), "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, script, str(src), str(dst), "--chat-template", template, "--force"],
                   check=True, capture_output=True, env=env)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_twin_trains_exports_answers_and_passes_the_template_gate(family, tiny_rows, tmp_path):
    from transformers import AutoTokenizer

    twin = cached_twin(family)
    template = FAMILIES[family].template
    recipe = Recipe(name=f"twin-{family}", model=ModelConfig(source="local", name=str(twin), chat_template=template),
                    lora=LoraConfig(r=8, alpha=16, target_modules=list(FAMILIES[family].lora_targets)),
                    export=ExportConfig(gguf_types=["f16"], serve_type="f16", lora_gguf=False, parity_rows=0,
                                        template_samples=2))
    recipe.training.max_steps = 3
    recipe.training.batch_size = 4
    recipe.training.logging_steps = 1
    recipe.training.save_steps = 3
    recipe.training.max_length = 512
    run = RunFolder(new_run_dir(tmp_path, recipe.name))
    run.recipe_json.write_text(recipe.model_dump_json())
    atomic_write_jsonl(run.split("train"), tiny_rows[:8])
    atomic_write_jsonl(run.split("val"), [])
    atomic_write_jsonl(run.split("test"), tiny_rows[10:12])

    stats = train(recipe, run, twin)
    assert stats["steps"] == 3 and stats["trainable_tensors_changed"] == stats["trainable_tensors"]
    # Response-only loss: every trained token is the answer (or its end-of-turn), never the prompt.
    assert stats["mask"]["assistant_share_of_labels"] == 1.0 and 0 < stats["mask"]["label_token_share"] < 1
    tokenizer = AutoTokenizer.from_pretrained(run.lora_dir)
    assert tokenizer.chat_template == NAMED_TEMPLATES[template].jinja
    ids = tokenizer.apply_chat_template(tiny_rows[10]["messages"][:-1], add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    marker = _assistant_marker_ids(tokenizer, family)
    assert ids[-len(marker):] == marker, (family, tokenizer.convert_ids_to_tokens(ids[-6:]))
    if family == "gemma3":   # no system role: the system prompt is folded into the first user turn
        assert tokenizer.decode(ids).startswith(f"<bos><start_of_turn>user\n{tiny_rows[10]['messages'][0]['content']}\n\n")

    merge_adapter(twin, run.lora_dir, run.merged_dir)
    gguf = convert_hf_to_gguf(run.merged_dir, run.gguf("f16"), "f16")
    write_modelfile.fn(run, recipe, {"f16": str(gguf)})

    with llama_server(gguf, tmp_path / "answer.log", parallel=1) as server:
        body = json.dumps({"messages": tiny_rows[10]["messages"][:-1], "max_tokens": 4, "temperature": 0}).encode()
        answer = json.load(urllib.request.urlopen(urllib.request.Request(
            server.base_url + "/chat/completions", data=body, headers={"Content-Type": "application/json"}), timeout=60))
    assert answer["choices"][0]["finish_reason"] in ("stop", "length") and answer["usage"]["completion_tokens"] >= 1

    result = check_run(run, n_samples=2)
    assert result["passed"], (family, result["first_failure"])
    assert gate(result)["passed"]

    # The same model with another family's template embedded must fail the gate, naming the GGUF check.
    wrong = tmp_path / "wrong.gguf"
    _set_gguf_template(gguf, wrong, NAMED_TEMPLATES[MISMATCH[family]].jinja)
    shutil.move(wrong, gguf)
    failed = check_run(run, n_samples=2)
    assert not failed["passed"] and not gate(failed)["passed"]
    assert failed["first_failure"].startswith("gguf chat template"), failed["first_failure"]
