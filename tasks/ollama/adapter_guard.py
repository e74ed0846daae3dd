"""Refuse an Ollama ADAPTER deployment (FROM a base + ADAPTER a LoRA GGUF) that would not behave like the
model that was trained and evaluated:
  * the adapter's base does not match FROM (architecture, size, dimensions, tensor shapes);
  * the adapter was trained on a 4-bit base (QLoRA) and the recipe does not say it accepts that;
  * Ollama runs the architecture on its own engine, which does not apply adapters.
Each refusal is one `ModelfileRefused` message naming the reason and the way out.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tasks.recipe import Recipe

# Architectures Ollama runs on its own Go engine (ollama fs/ggml/ggml.go, OllamaEngineRequired), whose
# runner answers "loras are not yet implemented": an ADAPTER line is accepted by `ollama create` and
# fails at the first chat. Everything else runs on Ollama's llama.cpp runner, which applies GGUF LoRAs.
OLLAMA_NO_ADAPTER_ARCHS = frozenset({
    "bert", "deepseek2", "deepseekocr", "gemma3", "gemma3n", "gemma4", "gptoss", "gpt-oss", "laguna",
    "llama4", "mistral3", "mllama", "nemotron_h", "nemotron_h_moe", "nemotron_h_omni", "nomic-bert",
    "olmo3", "qwen25vl", "qwen3", "qwen3moe", "qwen35", "qwen35moe", "qwen3next", "qwen3vl", "qwen3vlmoe",
    "glm4moelite", "glmocr", "lfm2", "lfm2moe"})
# Hyperparameters an adapter's base and the FROM base must share ({arch} is general.architecture).
BASE_IDENTITY_KEYS = ("general.architecture", "general.basename", "general.size_label", "{arch}.block_count",
                      "{arch}.embedding_length", "{arch}.feed_forward_length", "{arch}.attention.head_count",
                      "{arch}.attention.head_count_kv", "{arch}.vocab_size")
_QUANTIZED_NAME = re.compile(r"bnb|4bit|4-bit|int4|nf4|gptq|awq", re.I)


class ModelfileRefused(RuntimeError):
    """An ADAPTER deployment that would not behave like the trained model; the message says why and what to do."""


def gguf_metadata(path: Path) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """Scalar/string key-values (arrays left out) and tensor shapes of a GGUF file."""
    import gguf

    reader = gguf.GGUFReader(path)
    kv = {}
    for key, fld in reader.fields.items():
        if fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY:
            if key == "tokenizer.ggml.tokens":
                kv["tokenizer.ggml.token_count"] = len(fld.data)
            continue
        kv[key] = fld.contents()
    return kv, {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}


def base_identity(kv: dict) -> dict:
    """The identity fields of a model's GGUF metadata (or of Ollama's /api/show model_info)."""
    arch = kv.get("general.architecture", "?")
    out = {k.format(arch=arch): kv.get(k.format(arch=arch)) for k in BASE_IDENTITY_KEYS}
    if out.get(f"{arch}.vocab_size") is None and "tokenizer.ggml.token_count" in kv:
        out[f"{arch}.vocab_size"] = kv["tokenizer.ggml.token_count"]
    return {k: v for k, v in out.items() if v is not None}


def check_adapter_deployable(adapter_gguf: Path, trained_base: dict, from_base: dict,
                             from_tensors: dict[str, tuple[int, ...]] | None, quantized_training: str | None,
                             allow_qlora: bool) -> None:
    """Refuse an ADAPTER deployment that would not reproduce the trained model.

    Args:
        adapter_gguf: the LoRA GGUF.
        trained_base: identity (base_identity) of the base the adapter was trained on.
        from_base: identity of the model named in FROM (a local GGUF or Ollama's /api/show model_info).
        from_tensors: tensor shapes of the FROM GGUF, when it is a local file.
        quantized_training: why the adapter looks trained on a quantized base, or None.
        allow_qlora: the recipe accepts a QLoRA adapter on an unquantized base.

    Raises:
        ModelfileRefused: one message naming the reason and the way out.
    """
    kv, tensors = gguf_metadata(adapter_gguf)
    arch = kv.get("general.architecture")
    if kv.get("general.type") != "adapter" or kv.get("adapter.type") != "lora":
        raise ModelfileRefused(f"{adapter_gguf.name} is not a LoRA adapter GGUF (general.type="
                               f"{kv.get('general.type')!r}, adapter.type={kv.get('adapter.type')!r})")
    if arch in OLLAMA_NO_ADAPTER_ARCHS:
        raise ModelfileRefused(f"ADAPTER refused: Ollama runs '{arch}' models on its own engine, which does not "
                               "apply LoRA adapters (`ollama create` succeeds, then every chat fails with 'loras "
                               "are not yet implemented'); deploy the merged GGUF instead (deploy.artifact: merged)")
    if quantized_training and not allow_qlora:
        raise ModelfileRefused(f"ADAPTER refused: the adapter was trained on a quantized base ({quantized_training}) "
                               "and Ollama would apply it to an unquantized one, so the deployed model is not the "
                               "one that was evaluated; deploy the merged GGUF (deploy.artifact: merged) or accept "
                               "this with deploy.allow_qlora_adapter: true")
    for key, want in trained_base.items():
        got = from_base.get(key)
        if got is not None and got != want:
            raise ModelfileRefused(f"ADAPTER refused: the adapter's base does not match FROM: {key} is {want!r} "
                                   f"for the base it was trained on, {got!r} for FROM")
    for name, shape in sorted(tensors.items()):
        if from_tensors is None or not name.endswith(".lora_a"):
            continue
        target = name[:-len(".lora_a")]
        b_shape = tensors.get(target + ".lora_b")
        # GGUF shapes are (columns, rows): lora_a is (in, r), lora_b is (r, out), the base weight (in, out).
        want_shape = (shape[0], b_shape[1]) if b_shape else None
        if target not in from_tensors or from_tensors[target][:2] != want_shape:
            raise ModelfileRefused(f"ADAPTER refused: the adapter's base does not match FROM: the adapter changes "
                                   f"{target} of shape {want_shape}, FROM has "
                                   f"{from_tensors.get(target, 'no such tensor')}")


def quantized_training_reason(recipe: Recipe, adapter_dir: Path) -> str | None:
    """Why the adapter was trained on a quantized base (QLoRA), or None."""
    if recipe.model.load_in_4bit:
        return "recipe model.load_in_4bit: true"
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    base = str(cfg.get("base_model_name_or_path") or "")
    if _QUANTIZED_NAME.search(Path(base).name):
        return f"adapter_config base_model_name_or_path {base!r}"
    base_cfg = Path(base) / "config.json"
    if base_cfg.exists() and "quantization_config" in json.loads(base_cfg.read_text()):
        return f"{base_cfg} has a quantization_config"
    return None
