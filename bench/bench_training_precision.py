"""Benchmark: LoRA training throughput of the CPU default in fp32 vs bf16 autocast, side by side in one run.

    .venv/bin/python bench/bench_training_precision.py [--steps 6] [--batch 4] [--seq 160]

Prints tokens/s for each precision (alternating, after a warm-up step each) and the bf16/fp32 ratio that
justifies `training.mixed_precision: auto` on CPUs with AVX512-BF16/AMX. Not a test: timings are figures.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.models.bootstrap import resolve_base_model  # noqa: E402  (after the repo root is on sys.path)
from tasks.recipe import ModelConfig, Recipe  # noqa: E402
from tasks.train.worker import resolve_mixed_precision  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=160)
    parser.add_argument("--rank", type=int, default=64)
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = resolve_base_model(ModelConfig())
    targets = Recipe(name="bench").lora.target_modules
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=targets,
                                             task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(100, 49000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    times = {"fp32": [], "bf16": []}
    step(False), step(True)   # warm-up: allocator, oneDNN kernel selection
    for _ in range(args.steps):   # alternate so drift from other load hits both equally
        times["fp32"].append(step(False))
        times["bf16"].append(step(True))
    tokens = args.batch * args.seq
    print(f"CPU threads: {torch.get_num_threads()}, auto precision here: {resolve_mixed_precision('auto')}")
    print(f"batch {args.batch} x {args.seq} tokens, LoRA r{args.rank}, {args.steps} steps each")
    rates = {}
    for name, values in times.items():
        rates[name] = tokens / statistics.median(values)
        print(f"{name}: median {statistics.median(values):.2f} s/step, {rates[name]:.0f} tokens/s")
    print(f"bf16 / fp32 throughput ratio: {rates['bf16'] / rates['fp32']:.2f}x")


if __name__ == "__main__":
    main()
