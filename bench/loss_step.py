"""Benchmark: a training step with training.loss_type 'nll' against 'completion_nll', side by side.

    python bench/loss_step.py                     # recipes/slipstream.yaml's model, LoRA and training rows
    python bench/loss_step.py --recipe slipstream --batches 12 --repeat 2

Both steps are what the Trainer runs for one batch: forward, loss, backward, and TRL's per-step metrics
(entropy and token accuracy; over every position's logits for 'nll' as TRL computes them, over the label
tokens for 'completion_nll', as tasks/train/completion_loss.py does). The batches are pairs of training rows of
similar length (as training's length-grouped batches are), padded, labels on the answers only; each batch runs
once untimed per mode (a CPU's first pass at a new length builds its kernels), then timed, the modes
interleaved. Prints median and mean seconds a step per mode and their ratio, and the losses of one batch
(they must agree). Not a test: timings are figures; run it with nothing else on the machine.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="slipstream")
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)

    import torch
    from trl.trainer.utils import entropy_from_logits

    from tasks.data.prepare import prepare_splits
    from tasks.models.bootstrap import resolve_base_model
    from tasks.recipe import load_recipe
    from tasks.train.completion_loss import completion_nll
    from tasks.train.worker import load_model, resolve_mixed_precision, tokenize_row

    recipe = load_recipe(args.recipe)
    model, tokenizer = load_model(recipe, resolve_base_model(recipe.model))
    model.config.use_cache = False
    model.train()
    rows = dict(prepare_splits.fn(recipe.data, recipe.model.system_prompt or "", recipe.task)["rows"])["train"]
    tokenized = [tokenize_row(r, tokenizer, recipe.training.max_length) for r in rows]
    rng = random.Random(0)
    size = recipe.training.batch_size
    picked = sorted(rng.sample(tokenized, args.batches * size), key=lambda r: len(r["input_ids"]))
    batches = []
    for k in range(args.batches):
        group = picked[k * size:(k + 1) * size]
        width = max(len(r["input_ids"]) for r in group)
        ids = torch.full((size, width), tokenizer.pad_token_id)
        mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
        for j, r in enumerate(group):
            n = len(r["input_ids"])
            ids[j, :n], mask[j, :n] = torch.tensor(r["input_ids"]), 1
            labels[j, :n] = torch.where(torch.tensor(r["completion_mask"]) == 1, ids[j, :n], -100)
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    rng.shuffle(batches)
    bf16 = resolve_mixed_precision(recipe.training.mixed_precision) == "bf16"

    def nll_step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(**batch)
        out.loss.backward()
        with torch.no_grad():   # TRL's compute_loss, loss_type 'nll'
            logits = out.logits[..., :-1, :]
            entropy_from_logits(logits), logits.argmax(-1)
        return out.loss.item()

    def completion_step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss, logits, _ = completion_nll(model, batch)
        loss.backward()
        with torch.no_grad():   # CompletionNLLTrainer's metrics
            log_p = torch.log_softmax(logits, -1)
            -(log_p.exp() * log_p).sum(-1).mean(), logits.argmax(-1)
        return loss.item()

    modes = {"nll": nll_step, "completion_nll": completion_step}
    losses = {name: step(batches[0]) for name, step in modes.items()}
    model.zero_grad(set_to_none=True)
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeat):
        for batch in batches:
            for name, step in modes.items():
                step(batch)
                model.zero_grad(set_to_none=True)
                began = time.perf_counter()
                step(batch)
                times[name].append(time.perf_counter() - began)
                model.zero_grad(set_to_none=True)
    mean_len = statistics.mean(len(r["input_ids"]) for r in tokenized)
    answer_share = sum(sum(r["completion_mask"]) for r in tokenized) / sum(len(r["input_ids"]) for r in tokenized)
    print(f"recipe {recipe.name}: {recipe.model.name}, {recipe.model.dtype} weights, attention "
          f"{recipe.training.attention}, LoRA r{recipe.lora.r} on {recipe.lora.last_layers or 'all'} layers, "
          f"batch {size}, bf16 autocast {bf16}, {torch.get_num_threads()} threads; rows: {mean_len:.0f} tokens "
          f"on average, {answer_share:.0%} of them answer; {args.batches} batches x {args.repeat}")
    print("| loss_type | median s/step | mean s/step | vs nll (median) | loss, batch 1 |")
    print("|---|---|---|---|---|")
    base = statistics.median(times["nll"])
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.3f} | {statistics.mean(t):.3f} | "
              f"{statistics.median(t) / base:.2f}x | {losses[name]:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
