"""Export: merge the adapter into a 16-bit HF folder, convert to GGUF with llama.cpp's own converter,
quantize with llama.cpp's own quantizer, convert the adapter to a GGUF LoRA (and the base it applies to),
and write a manifest with the size and sha256 of every artifact.

Everything comes from the one pinned llama.cpp located by `tasks.llamacpp.build` (set up once by `make setup`;
nothing is fetched or built here). What llama.cpp cannot do is refused before it starts, with one
message: a missing tool, or an architecture its converter does not know.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

from prefect import task

from tasks.llamacpp import build as llamacpp
from tasks.recipe import ExportConfig
from tasks.run import (RunFolder, atomic_dir, atomic_output, atomic_write_json, cache_lock, resumable_stage,
                       slipway_home, stage_timer)
from tasks.timeouts import stage_deadline

# GGUF types produced by the converter directly vs. by llama-quantize from the f16 file.
CONVERTER_TYPES = {"f16", "bf16"}
QUANTIZE_TYPES = {"q8_0": "Q8_0", "q4_k_m": "Q4_K_M"}


class ExportError(RuntimeError):
    """A conversion step failed or cannot run; the message names the step and what to do."""


# tokenizer_config.json keys llama.cpp's converter reads and that saving a tokenizer with transformers 5 can drop
# or rewrite: add_bos_token (Phi-3 loses it, and the converter then adds a BOS training never saw) and
# tokenizer_class (saved as "TokenizersBackend"; the Phi3 converter takes Phi-4's GPT-2 vocabulary path only on
# "GPT2Tokenizer" and otherwise asks for a tokenizer.model Phi-4-mini does not have).
BASE_TOKENIZER_KEYS = ("add_bos_token", "add_eos_token", "tokenizer_class")


def keep_base_tokenizer_settings(base_dir: Path, merged_dir: Path) -> None:
    """Carry the base tokenizer_config.json's BASE_TOKENIZER_KEYS into the merged folder's, so the GGUF is
    converted the way the base model would be."""
    base_cfg, merged_cfg = base_dir / "tokenizer_config.json", merged_dir / "tokenizer_config.json"
    if not (base_cfg.exists() and merged_cfg.exists()):
        return
    base = json.loads(base_cfg.read_text())
    merged = json.loads(merged_cfg.read_text())
    kept = {key: base[key] for key in BASE_TOKENIZER_KEYS if base.get(key) is not None}
    if any(merged.get(key) != value for key, value in kept.items()):
        merged_cfg.write_text(json.dumps({**merged, **kept}, indent=2, ensure_ascii=False))


def merge_adapter(base_dir: Path, lora_dir: Path, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Fold the LoRA weights into the base and save a 16-bit HF folder (with the training tokenizer)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, lora_dir).merge_and_unload()
    merged = merged.to(getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(lora_dir)
    with atomic_dir(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # transformers saves only tokenizer.json; llama.cpp's converter reads a SentencePiece vocabulary
        # (Gemma, Phi-3, Llama-2) from tokenizer.model and would otherwise guess a byte-level BPE one.
        if (Path(base_dir) / "tokenizer.model").exists() and not (tmp / "tokenizer.model").exists():
            shutil.copy2(Path(base_dir) / "tokenizer.model", tmp / "tokenizer.model")
        keep_base_tokenizer_settings(Path(base_dir), tmp)
    return out_dir


@lru_cache(maxsize=1)
def converter_architectures() -> frozenset[str]:
    """HF architectures the pinned convert_hf_to_gguf.py registers (read from its source, no import)."""
    conversion = llamacpp.source_dir() / "conversion"
    if not conversion.is_dir():
        raise ExportError(f"llama.cpp's converter is not set up at {conversion.parent} (SLIPWAY_HOME): run "
                          "`make llama` (or `python -m tasks.llamacpp.build build`) first")
    names: set[str] = set()
    for path in conversion.glob("*.py"):
        for m in re.finditer(r"@ModelBase\.register\(([^)]*)\)", path.read_text()):
            names.update(re.findall(r"\"([^\"]+)\"", m.group(1)))
    return frozenset(names)


def preflight(hf_dir: Path, need_quantizer: bool) -> None:
    """Refuse, with one message, an export llama.cpp cannot do.

    Raises:
        ExportError: a converter or the quantizer is not set up, or the model's architecture is unknown
            to the pinned converter.
    """
    try:
        llamacpp.script("convert_hf_to_gguf.py")
        llamacpp.script("convert_lora_to_gguf.py")
        if need_quantizer:
            llamacpp.tool("llama-quantize")
    except llamacpp.LlamaCppMissing as exc:
        raise ExportError(f"llama.cpp {llamacpp.LLAMA_CPP_PYTHON_VERSION} is not set up: {exc}") from None
    archs = json.loads((hf_dir / "config.json").read_text()).get("architectures") or []
    unknown = [a for a in archs if a not in converter_architectures()]
    if not archs or unknown:
        raise ExportError(f"{hf_dir}: architecture {archs or '(none in config.json)'} is not supported by "
                          f"llama.cpp's converter (llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION}, "
                          f"{len(converter_architectures())} architectures known); no GGUF can be made")


def _run_tool(step: str, cmd: list[str], env: dict | None = None) -> None:
    """Run a llama.cpp tool; on failure raise one ExportError with the tail of its output."""
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        if "not supported" in tail.lower() and "architecture" in tail.lower():
            raise ExportError(f"{step}: llama.cpp does not support this model architecture:\n{tail}")
        raise ExportError(f"{step} failed (exit {proc.returncode}):\n{tail}")


def _converter_env() -> dict:
    # The converters import the `gguf` package that sits beside them (gguf-py), so the writer matches
    # the llama.cpp version that will read the file.
    env = dict(os.environ)
    env.pop("NO_LOCAL_GGUF", None)
    return env


def convert_hf_to_gguf(hf_dir: Path, out_file: Path, outtype: str) -> Path:
    """HF folder -> GGUF (f16/bf16) with llama.cpp's convert_hf_to_gguf.py; atomic.

    Raises:
        ExportError: the converter is missing, the architecture is unsupported, or conversion failed.
    """
    preflight(hf_dir, need_quantizer=False)
    with atomic_output(out_file) as tmp:
        _run_tool(f"convert_hf_to_gguf ({outtype})",
                  [sys.executable, llamacpp.script("convert_hf_to_gguf.py"), hf_dir, "--outfile", tmp,
                   "--outtype", outtype], env=_converter_env())
    return out_file


def quantize_gguf(src: Path, out_file: Path, qtype: str, threads: int | None = None) -> Path:
    """f16 GGUF -> quantized GGUF with llama-quantize; atomic."""
    try:
        quantizer = llamacpp.tool("llama-quantize")
    except llamacpp.LlamaCppMissing as exc:
        raise ExportError(str(exc)) from None
    with atomic_output(out_file) as tmp:
        _run_tool(f"llama-quantize ({qtype})",
                  [quantizer, src, tmp, QUANTIZE_TYPES[qtype], str(threads or os.cpu_count())])
    return out_file


def convert_lora_to_gguf(lora_dir: Path, base_dir: Path, out_file: Path) -> Path:
    """PEFT adapter -> GGUF LoRA (f16) with llama.cpp's convert_lora_to_gguf.py, offline via --base.

    Raises:
        ExportError: the adapter was trained on another base than `base_dir`, or conversion failed.
    """
    trained_on = json.loads((lora_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    # A QLoRA adapter names the 16-bit base; it applies to that base's dequantized 4-bit weights (lora-base/).
    accepted = {Path(base_dir).resolve()}
    if (source := RunFolder.dequantized_from(base_dir)) is not None:
        accepted.add(source.resolve())
    if trained_on and Path(trained_on).exists() and Path(trained_on).resolve() not in accepted:
        raise ExportError(f"{lora_dir} was trained on {trained_on}, not on {base_dir}: converting it against "
                          "another base would produce an adapter for the wrong model")
    preflight(base_dir, need_quantizer=False)
    with atomic_output(out_file) as tmp:
        _run_tool("convert_lora_to_gguf",
                  [sys.executable, llamacpp.script("convert_lora_to_gguf.py"), lora_dir, "--base", base_dir,
                   "--outfile", tmp, "--outtype", "f16"], env=_converter_env())
    return out_file


def merge_lora_gguf(base_gguf: Path, lora_gguf: Path, out_file: Path, threads: int | None = None) -> Path:
    """Base GGUF + GGUF LoRA -> one merged GGUF with llama.cpp's llama-export-lora (no HF weights needed).

    Raises:
        ExportError: the tool failed (its output's tail in the message).
    """
    tmp = out_file.with_name(out_file.name + ".part")
    _run_tool("llama-export-lora", [llamacpp.tool("llama-export-lora"), "-m", base_gguf, "--lora", lora_gguf,
                                    "-o", tmp, "-t", str(threads or os.cpu_count() or 2)])
    os.replace(tmp, out_file)
    return out_file


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(run_dir: RunFolder | Path, artifacts: dict[str, Path]) -> dict:
    """Size and sha256 of every exported artifact (each file of a folder), in gguf/manifest.json."""
    run = RunFolder(run_dir)
    manifest = {}
    for name, path in artifacts.items():
        path = Path(path)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        entry = {"path": run.relative(path), "bytes": sum(f.stat().st_size for f in files),
                 "sha256": sha256_file(files[0]) if not path.is_dir() else None,
                 "files": {run.relative(f): sha256_file(f) for f in files} if path.is_dir() else None}
        if path.suffix == ".gguf":
            # model-q8_0.gguf -> q8_0; every GGUF here was written by the one pinned llama.cpp
            entry.update(format="gguf", type=path.stem.split("-")[-1],
                         tool=f"llama.cpp (llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION})")
        manifest[name] = entry
    atomic_write_json(run.gguf_manifest, manifest)
    return manifest


def ensure_base_gguf(base_dir: Path) -> Path:
    """The base SLM as an f16 GGUF, converted once and cached beside the converted HF folder."""
    target = slipway_home() / "models" / f"{Path(base_dir).name}-f16.gguf"
    with cache_lock(target):   # one process converts; a concurrent run waits and reuses it
        return target if target.exists() else convert_hf_to_gguf(Path(base_dir), target, "f16")   # atomic


@task(name="base-model-gguf")
def base_model_gguf(base_dir: Path) -> Path:
    """The base SLM as a cached f16 GGUF, so its baseline is measured by llama.cpp like every other form."""
    return ensure_base_gguf(base_dir)


@task(name="merge-adapter")
@resumable_stage("merge")
def merge_lora_adapter(run_dir: RunFolder | Path, base_dir: Path) -> Path:
    """run/merged: base + adapter folded into one 16-bit HF model; returns that folder."""
    run = RunFolder(run_dir)
    with stage_timer(run, "merge"):
        # After QLoRA the adapter learned against the 4-bit weights: merging it into the 16-bit originals
        # gives another model (GPU run: anchor accuracy 25% merged that way vs 69% for the 16-bit run).
        return merge_adapter(run.adapter_base(base_dir), run.lora_dir, run.merged_dir)


@task(name="export-gguf")
@resumable_stage("export")
def export_gguf(run_dir: RunFolder | Path, base_dir: Path, cfg: ExportConfig) -> dict[str, str]:
    """run/gguf: the merged model in every requested GGUF type, the adapter as GGUF (plus the f16 base it
    applies to), and a manifest; returns {type or "lora"/"base": path}.

    Raises:
        ExportError: one message for a missing tool, an unsupported architecture or a failed step.
    """
    run = RunFolder(run_dir)
    with stage_timer(run, "export"), stage_deadline("export", cfg.timeout_s, "export.timeout_s"):
        preflight(run.merged_dir, need_quantizer=any(t in QUANTIZE_TYPES for t in cfg.gguf_types))
        files: dict[str, Path] = {}
        # f16 is the quantizer's input, so it is always made (and kept: it is the reference GGUF).
        for outtype in ["f16"] + [t for t in cfg.gguf_types if t == "bf16"]:
            files[outtype] = convert_hf_to_gguf(run.merged_dir, run.gguf(outtype), outtype)
        for qtype in (t for t in cfg.gguf_types if t in QUANTIZE_TYPES):
            files[qtype] = quantize_gguf(files["f16"], run.gguf(qtype), qtype)
        if cfg.lora_gguf:
            adapter_base = run.adapter_base(base_dir)
            files["lora"] = convert_lora_to_gguf(run.lora_dir, adapter_base, run.lora_gguf)
            # The ADAPTER deployment and the adapter's parity row need the base it applies to, as GGUF.
            files["base"] = convert_hf_to_gguf(adapter_base, run.base_gguf, "f16")
        write_manifest(run, {**files, "merged": run.merged_dir, "adapter": run.lora_dir})
    return {name: str(path) for name, path in files.items()}
