"""Quality of the GPU engines on SmolLM2 + Slipstream: each recipe trained through Slipway's launcher,
then the adapter's greedy answers on the test split scored with the project's metrics (strict parse,
anchor accuracy). Not a test: the figures go into bench/README.md.

    # here (CPU): the project's own splits of slipstream-gpu, and the base model's config + tokenizer
    python bench/train_quality.py prepare OUT_DIR
    # on the GPU machine: the base weights from the embedded GGUF, then every variant
    python bench/train_quality.py run OUT_DIR --gguf SmolLM2-135M-Instruct.Q4_1.gguf

Variants (recipes/slipstream-gpu*.yaml): `today` (padded batches of 8, float32 base + bf16 autocast: the
path before the fast path), `packed` (slipstream-gpu: packed, bf16 weights), `unsloth` (16-bit LoRA),
`qlora` (4-bit through Unsloth), `ddp` and `zero2` (2 GPUs). Same rows, epochs and learning rate for
each: the comparison is at equal tokens. It uses the training worker and the metrics module, which
need no Prefect; the finetune flow adds export, serving and gates around the same training process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {   # name: (recipe, overrides, GPUs)
    "today": ("slipstream-gpu", {"training.packing": False, "model.dtype": "float32"}, "0"),
    "packed": ("slipstream-gpu", {}, "0"),
    "unsloth": ("slipstream-gpu-unsloth", {}, "1"),
    "qlora": ("slipstream-gpu-qlora", {}, "1"),
    "ddp": ("slipstream-gpu-ddp", {}, "0,1"),
    "zero2": ("slipstream-gpu-zero2", {}, "0,1"),
}
META_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja")


def prepare(out: Path) -> None:
    """Splits exactly as the flow makes them for slipstream-gpu, and the bootstrapped base's small files."""
    from tasks.data.prepare import prepare_splits
    from tasks.models.bootstrap import resolve_base_model
    from tasks.recipe import load_recipe
    from tasks.run import atomic_write_jsonl

    recipe = load_recipe("slipstream-gpu")
    prepared = prepare_splits(recipe.data, recipe.model.system_prompt, recipe.task)
    for name, rows in prepared["rows"].items():
        atomic_write_jsonl(out / "splits" / f"{name}.jsonl", rows)
    base = resolve_base_model(recipe.model)
    (out / "base-meta").mkdir(parents=True, exist_ok=True)
    for name in META_FILES:
        if (base / name).exists():
            shutil.copy(base / name, out / "base-meta" / name)
    print(json.dumps({k: v for k, v in prepared["stats"].items() if k.endswith("_rows")}))


def build_base(out: Path, gguf: Path) -> Path:
    """The same fp32 HF folder the bootstrap makes: the GGUF dequantized by transformers, weights copied
    into a model built from the bootstrapped config (tokenizer files carried from there)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = out / "base"
    if (base / "model.safetensors").exists():
        return base
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out / "base-meta"), dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    model.tie_weights()
    model.save_pretrained(base)
    for name in META_FILES:
        if (out / "base-meta" / name).exists():
            shutil.copy(out / "base-meta" / name, base / name)
    return base


def train_variant(name: str, out: Path, base: Path) -> dict:
    from tasks.recipe import load_recipe
    from tasks.run import atomic_write_jsonl, read_jsonl
    from tasks.train.command import training_command

    recipe_name, overrides, gpus = VARIANTS[name]
    recipe = load_recipe(recipe_name, overrides)
    run_dir = out / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "recipe.json").write_text(recipe.model_dump_json())
    for split in ("train", "val"):
        atomic_write_jsonl(run_dir / "data" / f"{split}.jsonl", read_jsonl(out / "splits" / f"{split}.jsonl"))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpus}
    cmd = training_command(recipe, run_dir, base, gpus=len(gpus.split(",")))
    start = time.time()
    with open(out / f"train-{name}.log", "w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        return {"variant": name, "error": f"training exit {rc}", "log_tail": (out / f"train-{name}.log")
                .read_text().splitlines()[-12:]}
    stats = json.loads((run_dir / "metrics" / "training-stats.json").read_text())
    return {"variant": name, "recipe": recipe_name, "overrides": overrides, "gpus": gpus,
            "process_s": round(time.time() - start, 1), "train_s": stats["seconds"], "steps": stats["steps"],
            "first_loss": stats["first_loss"], "final_loss": stats["final_loss"], "eval_loss": stats["eval_loss"],
            "tokens_seen": stats["tokens_seen"], "world_size": stats["world_size"], "engine": stats.get("engine"),
            "packing": stats.get("packing"), "peak_gib": stats.get("peak_gpu_memory_gib"),
            "adapter": str(run_dir / "lora")}


def evaluate(label: str, base: Path, adapter: Path | None, rows: list[dict], device: str) -> dict:
    """Greedy answers (128 new tokens, batches of 64, left padding) scored by tasks.eval.metrics."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.eval import metrics
    from tasks.tasktypes import task_type

    tokenizer = AutoTokenizer.from_pretrained(adapter or base, padding_side="left")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    model = model.to(device).eval()
    start = time.time()
    answers = []
    for i in range(0, len(rows), 64):
        chunk = rows[i:i + 64]
        prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False)
                   for r in chunk]
        batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=128, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        answers += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    seconds = time.time() - start
    scored = [metrics.score_row(r, a) for r, a in zip(rows, answers)]
    calls = [{"latency_s": seconds / len(rows), "prompt_tokens": 0, "completion_tokens": 0} for _ in rows]
    summary = metrics.aggregate("slipstream", scored, calls, seconds)
    keys = list(task_type("slipstream").metric_keys)
    return {"label": label, **{k: summary[k] for k in keys}, "summary": summary, "examples": answers[:2]}


def run(out: Path, gguf: Path, variants: list[str]) -> None:
    from tasks.run import read_jsonl

    t0 = time.time()
    base = build_base(out, gguf)
    print(f"base ready in {time.time() - t0:.0f}s", flush=True)
    # Two lanes in parallel: single-GPU variants on GPU 0/1, then the 2-GPU ones (small model: the GPUs
    # have room for both; these are quality figures, not timings).
    lanes = [[v for v in variants if VARIANTS[v][2] in ("0",)], [v for v in variants if VARIANTS[v][2] == "1"],
             [v for v in variants if "," in VARIANTS[v][2]]]
    results = {}

    def lane(names):
        for name in names:
            results[name] = train_variant(name, out, base)
            print(json.dumps({k: v for k, v in results[name].items() if k != "adapter"}), flush=True)

    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lane, lanes))
    test = read_jsonl(out / "splits" / "test.jsonl")
    evals = {"base": evaluate("base", base, None, test, "cuda:0")}
    for name in variants:
        if "adapter" in results.get(name, {}):
            evals[name] = evaluate(name, base, Path(results[name]["adapter"]), test, "cuda:0")
            print(json.dumps({k: v for k, v in evals[name].items() if k != "summary"}), flush=True)
    (out / "quality.json").write_text(json.dumps({"train": results, "eval": evals}, indent=1))
    print(f"\n{len(test)} test rows; total {time.time() - t0:.0f}s")
    print("| variant | GPUs | steps | train s | first → final loss | eval loss | peak GiB | metrics |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| base | | | | | | | {_metrics(evals['base'])} |")
    for name in variants:
        r = results.get(name, {})
        if "error" in r:
            print(f"| {name} | | FAILED: {r['error']} {' / '.join(r['log_tail'][-3:])[-300:]} | | | | | |")
            continue
        loss = f"{r['first_loss']:.3f} → {r['final_loss']:.3f}" if r.get("final_loss") else ""
        print(f"| {name} | {r['gpus']} | {r['steps']} | {r['train_s']} | {loss} | {r['eval_loss']} | "
              f"{r['peak_gib']} | {_metrics(evals.get(name, {}))} |")


def _metrics(e: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in e.items() if isinstance(v, float))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["prepare", "run"])
    parser.add_argument("out", type=Path)
    parser.add_argument("--gguf", type=Path)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.mode == "prepare":
        prepare(args.out)
    else:
        run(args.out, args.gguf, args.variants.split(","))


if __name__ == "__main__":
    main()
