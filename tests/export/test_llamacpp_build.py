"""The pinned llama.cpp build: compiled for this CPU, without ggml's AMX kernels (they crash this llama.cpp)."""
from __future__ import annotations

import platform
import shutil
import subprocess

import pytest

from tasks.llamacpp import build as llamacpp


def test_x86_builds_turn_amx_off_for_c_and_cxx_and_other_machines_get_no_flags():
    flags = llamacpp.compiler_flags("x86_64")
    for lang in ("C", "CXX"):
        entry = next(f for f in flags if f.startswith(f"-DCMAKE_{lang}_FLAGS="))
        assert {"-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"} <= set(entry.split("=", 1)[1].split())
    assert llamacpp.compiler_flags("AMD64") == flags
    assert llamacpp.compiler_flags("aarch64") == []


def test_builds_with_other_flags_live_in_their_own_folder(monkeypatch):
    monkeypatch.delenv("SLIPWAY_LLAMA_CPP", raising=False)   # the default folder, not one named by the caller
    assert llamacpp.home().name.endswith(f"-b{llamacpp.BUILD_REVISION}")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("objdump") is None,
                    reason="x86-64 with objdump only")
def test_the_built_server_holds_no_amx_instruction():
    """On a Sapphire Rapids host -march=native alone compiled ggml's AMX kernels in, and llama-server died with
    SIGSEGV in ggml_backend_amx_mul_mat on its first q8_0 batch; the tile instructions must not be there at all."""
    server = llamacpp.tool("llama-server")
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(server)], capture_output=True, text=True,
                             check=True).stdout
    assert "vfmadd" in listing or "vaddps" in listing     # a real disassembly of vector code, not an empty one
    amx = [line for line in listing.splitlines() if any(op in line for op in ("tdpb", "tileloadd", "ldtilecfg"))]
    assert amx == []
