"""Locate (and, at set-up time, build) one pinned llama.cpp: converters, quantizer and server.

llama.cpp comes from the llama-cpp-python sdist on PyPI (a package registry, so it works offline from
the hubs): its `vendor/llama.cpp/` holds `convert_hf_to_gguf.py` (+ `conversion/`, `gguf-py/`),
`convert_lora_to_gguf.py`, and the sources of `llama-quantize` and `llama-server`. The llama-cpp-python
wheel ships none of those, so `python -m tasks.llamacpp.build build` (run by `make setup`) extracts the sdist
and compiles just the tools it needs (TOOLS) into `$SLIPWAY_HOME/llama.cpp-<version>/`; a tool added to TOOLS
later is compiled alone from the extracted sources, without building the others again. Nothing is built at
run time.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tasks.run import cache_lock, slipway_home

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # vendors ggml-org/llama.cpp@0c1e57098
# llama-export-lora merges a GGUF LoRA into its base GGUF: the deployment fallback for an Ollama that
# refuses ADAPTER (>= 0.34.1, ollama/ollama#14969), made without the HF weights.
TOOLS = ("llama-server", "llama-quantize", "llama-export-lora")
# Part of the build folder's name: a build made with other compiler flags is never reused. 2: no AMX.
BUILD_REVISION = 2
# ggml's AMX kernels (picked by -march=native on Sapphire Rapids and later) crash this llama.cpp: llama-server
# died with SIGSEGV in ggml_backend_amx_mul_mat on its first q8_0/q4_K_M batch (Intel Xeon with amx_int8,
# 2026-12-02; f16 and --no-repack ran). GCC keeps -mno-* flags given explicitly over what -march=native implies,
# so the rest of the native instruction set (AVX-512, VNNI, BF16) stays.
NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


class LlamaCppMissing(FileNotFoundError):
    """The pinned llama.cpp tools are not set up; the message says how to set them up."""


def home() -> Path:
    return Path(os.environ.get("SLIPWAY_LLAMA_CPP",
                               slipway_home() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}-b{BUILD_REVISION}"))


def source_dir() -> Path:
    return home() / "src"


def _ready(path: Path) -> bool:
    """Whether a file of the tools exists, once no other process is building them (held for a moment)."""
    with cache_lock(home()):
        return path.exists()


def tool(name: str) -> Path:
    """Path of a built llama.cpp binary.

    Raises:
        LlamaCppMissing: not built yet.
    """
    path = home() / "bin" / name
    if not _ready(path):
        raise LlamaCppMissing(f"{name} not found at {path}: run `make setup` "
                              f"(python -m tasks.llamacpp.build build) once")
    return path


def script(name: str) -> Path:
    """Path of one of llama.cpp's Python converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py)."""
    path = source_dir() / name
    if not _ready(path):
        raise LlamaCppMissing(f"{name} not found at {path}: run `make setup` (python -m tasks.llamacpp.build build)")
    return path


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def build(jobs: int | None = None) -> Path:
    """Download the pinned sdist from PyPI, extract vendor/llama.cpp, compile the missing tools; idempotent.
    One process builds at a time (a lock beside the folder); the others wait, then find it built."""
    with cache_lock(home()):
        return _build(home(), jobs)


def _build(target: Path, jobs: int | None) -> Path:
    missing = [t for t in TOOLS if not (target / "bin" / t).exists()]
    have_sources = (target / "src" / "convert_hf_to_gguf.py").exists()
    if not missing and have_sources:
        print(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} already built at {target}")
        return target
    target.mkdir(parents=True, exist_ok=True)
    if not have_sources:
        _extract_sources(target)
    _compile(target, missing, jobs)
    print(f"llama.cpp {LLAMA_CPP_PYTHON_VERSION} built at {target}")
    return target


def _extract_sources(target: Path) -> None:
    """vendor/llama.cpp of the pinned sdist (PyPI) into target/src."""
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q",
              f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(tmp)])
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        vendored = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
        if (target / "src").exists():
            shutil.rmtree(target / "src")
        shutil.move(str(vendored), target / "src")


def compiler_flags(machine: str | None = None) -> list[str]:
    """CMake arguments for the C/C++ flags of this machine's build: no AMX on x86-64 (see NO_AMX_FLAGS)."""
    if (machine or platform.machine()).lower() not in ("x86_64", "amd64"):
        return []
    return [f"-DCMAKE_C_FLAGS={NO_AMX_FLAGS}", f"-DCMAKE_CXX_FLAGS={NO_AMX_FLAGS}"]


def _compile(target: Path, tools: list[str], jobs: int | None) -> None:
    """Configure once and build only `tools` (and what they link), then keep just the static binaries."""
    build_dir = target / "build"
    _run(["cmake", "-S", str(target / "src"), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
          "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
          # The web UI would be fetched from the network; the OpenAI-compatible API does not need it.
          "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF", *compiler_flags()], stdout=subprocess.DEVNULL)
    _run(["cmake", "--build", str(build_dir), "-j", str(jobs or os.cpu_count() or 2), "--target", *tools])
    (target / "bin").mkdir(exist_ok=True)
    for name in tools:   # copied under a unique temp name, then renamed: never a half-copied binary
        fd, tmp_bin = tempfile.mkstemp(dir=target / "bin", prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        shutil.copy2(build_dir / "bin" / name, tmp_bin)
        os.replace(tmp_bin, target / "bin" / name)
    shutil.rmtree(build_dir, ignore_errors=True)  # ~400 MB of objects; the static binaries are enough


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Set up the pinned llama.cpp tools.")
    parser.add_argument("command", choices=["build", "where"])
    args = parser.parse_args(argv)
    if args.command == "build":
        build()
    else:
        print(home())
    return 0


if __name__ == "__main__":
    sys.exit(main())
