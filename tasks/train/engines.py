"""Which local training engine a recipe runs, and the rules that decide early whether it can run here.

Engines (recipe `training.engine`, formerly `training.backend`):
    trl      TRL's SFTTrainer + PEFT LoRA: the portable path, CPU included.
    unsloth  Unsloth's FastLanguageModel: 16-bit LoRA, or 4-bit QLoRA with `model.load_in_4bit`, its
             gradient checkpointing and kernels. GPU only. Unsloth patches transformers, trl and peft when
             it is imported, so the training process imports it before any of them (`import_engine`).
Either runs as one plain process or under `accelerate launch` with a config of accelerate_config/
(single GPU, DDP over every visible GPU, DeepSpeed ZeRO-2). This module imports nothing heavy: the Prefect
side (launch.py) checks a recipe with it before starting a process, the worker before loading a model.
"""

from __future__ import annotations

import sys

ENGINES = ("trl", "unsloth")
# Imported after Unsloth in the training process, never before (Unsloth patches them on import).
PATCHED_BY_UNSLOTH = ("transformers", "trl", "peft")


class EngineError(ValueError):
    """A recipe asks for an engine / precision / launcher combination this machine or engine cannot run."""


def import_engine(engine: str) -> None:
    """Import the engine's own package first where it must come first (Unsloth).

    Raises:
        EngineError: Unsloth asked for after transformers/trl/peft were already imported in this process
            (its patches would not apply), or Unsloth not installed.
    """
    if engine != "unsloth" or "unsloth" in sys.modules:
        return
    early = [name for name in PATCHED_BY_UNSLOTH if name in sys.modules]
    if early:
        raise EngineError(f"training.engine 'unsloth' must be imported before {early}, which this process "
                          "already imported; run training in its own process (python -m tasks.train.worker)")
    try:
        import unsloth  # noqa: F401
    except ImportError as exc:
        raise EngineError("training.engine 'unsloth' needs the gpu extra (`pip install -e .[gpu]`) on a "
                          f"CUDA machine: {exc}") from exc


def check_engine(recipe, gpus: int, distributed_type: str | None) -> None:
    """Refuse, before any process starts, what cannot run: names the field and the way out.

    Args:
        recipe: the validated Recipe.
        gpus: CUDA GPUs the training process will see.
        distributed_type: the accelerate config's `distributed_type` (NO, MULTI_GPU, DEEPSPEED), or None
            for a plain process.

    Raises:
        EngineError: unsloth, 4-bit, Liger or FlexAttention without a GPU; unsloth under DeepSpeed or with another
            attention; an accelerate launch with no GPU; a packed sequence shorter than max_length.
    """
    cfg, model = recipe.training, recipe.model
    if cfg.engine == "unsloth" and gpus < 1:
        raise EngineError("training.engine 'unsloth' needs a CUDA GPU and none is visible; use engine 'trl' "
                          "on this machine")
    if model.load_in_4bit and gpus < 1:
        raise EngineError("model.load_in_4bit (QLoRA, bitsandbytes) needs a CUDA GPU and none is visible")
    if distributed_type == "DEEPSPEED" and cfg.engine == "unsloth":
        raise EngineError("training.engine 'unsloth' does not run under DeepSpeed (training.accelerate_config "
                          f"{cfg.accelerate_config!r}); use accelerate_config 'ddp' with unsloth, or engine "
                          "'trl' with ZeRO-2")
    if distributed_type is not None and gpus < 1:
        raise EngineError(f"training.accelerate_config {cfg.accelerate_config!r} launches one process per GPU "
                          "and no CUDA GPU is visible; leave it unset on a CPU machine")
    if cfg.liger_kernel and gpus < 1:
        raise EngineError("training.liger_kernel needs a CUDA GPU (Liger's kernels are Triton) and none is "
                          "visible; leave it off on this machine")
    if cfg.attention == "flex_attention" and gpus < 1:
        raise EngineError("training.attention 'flex_attention' needs a CUDA GPU to train (PyTorch has no "
                          "FlexAttention backward on CPU); use attention 'sdpa' on this machine")
    if cfg.engine == "unsloth" and cfg.attention != "sdpa":
        raise EngineError(f"training.attention {cfg.attention!r} applies to engine 'trl'; engine 'unsloth' "
                          "picks its own attention kernels (leave attention: sdpa)")
    if cfg.packing and cfg.pack_length and cfg.pack_length < cfg.max_length:
        raise EngineError(f"training.pack_length {cfg.pack_length} is shorter than training.max_length "
                          f"{cfg.max_length}: a row would not fit in a packed sequence")
