"""Architecture guard: before any training, check that what the run ends with can be made from this base.

  * llama.cpp's pinned converter (convert_hf_to_gguf.py of llama-cpp-python 0.3.36) registers the base's
    HF architecture (read from its own model registry, `@ModelBase.register(...)`, not a list kept here),
    so the GGUF export after training cannot fail on it;
  * for `deploy.artifact: adapter`, Ollama can apply a LoRA to that architecture: the converter's GGUF
    architecture name (`model_arch = gguf.MODEL_ARCH.X` in the registered class, named in gguf-py's
    constants) must not be one Ollama runs on its own engine (tasks.ollama.adapter_guard).
Each refusal is one `ExportError` naming the architecture and the way out, raised before an hour of training.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from prefect import task

from tasks.export.convert import ExportError, converter_architectures
from tasks.llamacpp import build as llamacpp
from tasks.ollama.adapter_guard import OLLAMA_NO_ADAPTER_ARCHS
from tasks.recipe import Recipe

@lru_cache(maxsize=1)
def gguf_architectures() -> dict[str, str]:
    """HF architecture -> GGUF `general.architecture` of the pinned converter (from its source, no import)."""
    src = llamacpp.source_dir()
    names = dict(re.findall(r"MODEL_ARCH\.(\w+):\s*\"([^\"]+)\"",
                            src.joinpath("gguf-py", "gguf", "constants.py").read_text()))
    out: dict[str, str] = {}
    for path in (src / "conversion").glob("*.py"):
        text = path.read_text()
        classes = {}
        for m in re.finditer(r"\nclass (\w+)\((\w+)\):(.*?)(?=\n(?:@|class )|\Z)", text, re.S):
            arch = re.search(r"^\s+model_arch = gguf\.MODEL_ARCH\.(\w+)", m.group(3), re.M)
            classes[m.group(1)] = (m.group(2), arch.group(1) if arch else None)
        for m in re.finditer(r"@ModelBase\.register\(([^)]*)\)[^\n]*\n(?:[ \t]*[@#][^\n]*\n)*class (\w+)\(", text):
            cls, arch = m.group(2), None
            while cls in classes and arch is None:      # model_arch inherited from a parent in the same file
                cls, arch = classes[cls][0], classes[cls][1]
            if arch in names:
                for hf in re.findall(r"\"([^\"]+)\"", m.group(1)):
                    out[hf] = names[arch]
    return out


def base_architectures(base_dir: Path) -> list[str]:
    return json.loads((Path(base_dir) / "config.json").read_text()).get("architectures") or []


def check_architecture(base_dir: Path, recipe: Recipe) -> dict:
    """{"architecture", "gguf_architecture"} of the base, or one ExportError saying why the run cannot end well.

    Raises:
        ExportError: the converter does not know the architecture, or the recipe deploys an adapter on an
            architecture Ollama cannot apply adapters to.
    """
    return check_architectures(base_architectures(base_dir), recipe)


def check_architectures(archs: list[str], recipe: Recipe) -> dict:
    """check_architecture for the `architectures` of a config.json (e.g. one read from the Hub by a dry run)."""
    known = converter_architectures()
    unknown = [a for a in archs if a not in known]
    if not archs or unknown:
        raise ExportError(f"base model {recipe.model.name!r}: architecture {archs or '(none in config.json)'} is not "
                          f"supported by llama.cpp's converter (llama-cpp-python {llamacpp.LLAMA_CPP_PYTHON_VERSION}, "
                          f"{len(known)} architectures registered), so no GGUF could be exported after training; "
                          "choose a base of a supported family (Llama, Qwen2, Gemma 3, GLM-4, Phi-3, ...)")
    gguf_arch = gguf_architectures().get(archs[0])
    if recipe.deploy.artifact == "adapter" and gguf_arch in OLLAMA_NO_ADAPTER_ARCHS:
        raise ExportError(f"base model {recipe.model.name!r} ({archs[0]}, GGUF architecture '{gguf_arch}'): Ollama runs "
                          "this architecture on its own engine, which does not apply LoRA adapters, so "
                          "deploy.artifact 'adapter' could never serve the trained model; set deploy.artifact: merged")
    return {"architecture": archs[0], "gguf_architecture": gguf_arch}


@task(name="check-architecture")
def guard_architecture(base_dir: Path, recipe: Recipe) -> dict:
    """Refuse, before training, a base whose GGUF export or adapter deployment cannot happen."""
    return check_architecture(base_dir, recipe)
