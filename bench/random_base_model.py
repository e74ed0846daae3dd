"""A random-init base model of a real model's shape, with that model's tokenizer, as a local HF folder.

For GPU machines that cannot download weights and cannot take the real ones along (the carry limit): the
tracks benchmark (bench/tracks_device.sh) trains the Fledgling tracks on SmolLM2-135M's exact shape and
tokenizer, so tokens/s and wall times are those of the real model; only the losses and gates differ.

    python bench/random_base_model.py SRC_DIR OUT_DIR [--dtype bfloat16]

SRC_DIR holds config.json and the tokenizer files (no weights needed); OUT_DIR gets the same plus
model.safetensors.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "generation_config.json")


def build(src: Path, out: Path, dtype: str = "bfloat16", seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(src)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args()
    out = build(args.src, args.out, args.dtype)
    params = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"random-init base model at {out} ({params / 1e6:.0f} MB of weights)")


if __name__ == "__main__":
    main()
