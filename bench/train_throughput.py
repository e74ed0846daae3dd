"""Benchmark: LoRA training throughput of the same workload through five trainers, and on 1 and 2 GPUs.

    python bench/train_throughput.py                      # GPU: Llama-3-8B shape, SmolLM2 vocabulary
    python bench/train_throughput.py --tiny               # CPU: a 2-layer shape, to check the script runs

Workload (the issue's): random-init weights of the Llama-3-8B shape with SmolLM2's vocabulary (49,152), the
first 1,024 Slipstream rows with the recipe's one-line system prompt (~133 tokens a row), loss on the
answer only, LoRA r16/alpha32 on all 7 linear projections, bf16 weights, one epoch. Variants, each in its
own process (fresh GPU memory, and Unsloth patches transformers on import):
    hf              plain transformers Trainer + PEFT, padded batches of 8 rows (the reference, ratio 1.0)
    slipway-padded  Slipway's `train()`, engine trl, padded batches of 8 (today's path)
    slipway-trl     Slipway's `train()`, engine trl, packed (--tokens-per-step per optimizer step)
    slipway-trl-flex   ... packed, training.attention flex_attention (document mask: only each row's block)
    slipway-trl-liger  ... packed, training.liger_kernel (fused RMSNorm/SwiGLU/RoPE/linear+cross-entropy)
    slipway-trl-fast   ... packed, both
    slipway-unsloth Slipway's `train()`, engine unsloth, packed
    unsloth-direct  Unsloth as its docs show: FastLanguageModel + get_peft_model(use_gradient_checkpointing=
                    "unsloth") + SFTTrainer on prompt/completion rows, batch 8 (its auto padding-free on)
    ddp-N, zero2-N  slipway-trl through Slipway's launcher (`accelerate launch`, one process per GPU) on N GPUs
Prints real tokens/s (tokens of the rows, not of padding or filler, over the trainer.train() wall time,
first step included), MFU (4·N FLOPs per token, N = the base's parameters, against 989 TFLOP/s dense bf16),
peak GPU memory, the GPU busy share (NVML utilisation sampled every 0.1 s over the training window), and
each variant's ratio to `hf`. Not a test: timings are figures. Compare variants inside one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PEAK_BF16_FLOPS = 989e12     # H100/H200 SXM dense bf16, the MFU denominator
SYSTEM_PROMPT = "You are a Slipstream agent. Answer with THOUGHT, QUANTIZE and SLIP lines."
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SINGLE = ["hf", "slipway-padded", "slipway-trl", "slipway-trl-flex", "slipway-trl-liger", "slipway-trl-fast", "slipway-qlora",
          "slipway-unsloth", "unsloth-direct"]
MULTI = ["ddp-2", "zero2-2", "zero2-1"]


def llama_shape(tiny: bool) -> dict:
    if tiny:
        return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    return dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, rope_theta=500000.0)   # Llama-3-8B


def build_base(out: Path, tokenizer_dir: Path, tiny: bool) -> Path:
    """Random-init weights of the shape, bf16, saved as an HF folder with SmolLM2's tokenizer (once)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").exists():
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **llama_shape(tiny))
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def load_rows(source: Path, n: int) -> list[dict]:
    """The first n rows as chat rows with the recipe's system prompt (the dataset's own long prompt is
    dropped, as the recipes do)."""
    roles = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
    rows = []
    for line in source.open():
        turns = json.loads(line)["conversations"]
        msgs = [{"role": roles[t["from"]], "content": t["value"].strip()} for t in turns]
        msgs = [m for m in msgs if m["role"] != "system"]
        rows.append({"messages": [{"role": "system", "content": SYSTEM_PROMPT}, *msgs[-2:]]})
        if len(rows) == n:
            break
    return rows


def recipe_for(variant: str, args):
    from tasks.recipe import Recipe

    recipe = Recipe(name=f"bench-{variant}")
    recipe.model.source = "hf"
    recipe.model.dtype = "bfloat16"
    recipe.lora.r, recipe.lora.alpha, recipe.lora.dropout = 16, 32, 0.0
    t = recipe.training
    t.epochs, t.learning_rate, t.lr_scheduler, t.warmup_ratio = 1, 2e-4, "constant", 0.0
    t.batch_size, t.max_length, t.logging_steps, t.save_steps = 8, 512, 10, 100000
    t.mixed_precision = "bf16" if not args.tiny else "no"
    if variant != "slipway-padded":
        t.packing, t.tokens_per_step, t.pack_length = True, args.tokens_per_step, args.pack_length
    if variant in ("slipway-unsloth", "slipway-qlora"):
        t.engine = "unsloth"
    if variant == "slipway-qlora":   # Unsloth's 4-bit path (bitsandbytes NF4 base)
        recipe.model.load_in_4bit = True
    # slipway-trl-flex / -liger / -fast (both): the packed trl path with FlexAttention's document mask and/or
    # Liger's fused kernels.
    if variant in ("slipway-trl-flex", "slipway-trl-fast"):
        t.attention = "flex_attention"
    if variant in ("slipway-trl-liger", "slipway-trl-fast"):
        t.liger_kernel = True
    if variant.startswith(("ddp", "zero2")):
        t.accelerate_config = variant.split("-")[0]
    return recipe


def slipway_run_dir(variant: str, args, rows: list[dict]) -> Path:
    from tasks.run import atomic_write_jsonl

    run_dir = args.work / "runs" / variant
    if run_dir.exists():
        import shutil
        shutil.rmtree(run_dir)
    (run_dir / "data").mkdir(parents=True)
    (run_dir / "recipe.json").write_text(recipe_for(variant, args).model_dump_json())
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", rows)
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", [])
    return run_dir


def real_tokens(rows: list[dict], tokenizer_dir: Path) -> int:
    from transformers import AutoTokenizer

    from tasks.train.worker import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return sum(len(tokenize_row(r, tokenizer, 512)["input_ids"]) for r in rows)


# ---- the variants, each run in a child process: `--variant NAME`, prints one RESULT json line ----------

def run_slipway(variant: str, args, rows: list[dict]) -> dict:
    from tasks.recipe import Recipe
    from tasks.train.engines import import_engine

    run_dir = slipway_run_dir(variant, args, rows)
    recipe = Recipe.model_validate_json((run_dir / "recipe.json").read_text())
    import_engine(recipe.training.engine)       # what the worker's main() does first
    from tasks.train.worker import train

    end_wall = None
    stats = train(recipe, run_dir, args.base)
    end_wall = time.time()
    return {"seconds": stats["seconds"], "start": end_wall - stats["seconds"], "end": end_wall,
            "steps": stats["steps"], "final_loss": stats["final_loss"], "peak_gib": stats.get("peak_gpu_memory_gib"),
            "packing": stats.get("packing"), "first_step_s": stats.get("first_step_seconds"),
            "steady_s": stats.get("steady_seconds")}


def run_multi(variant: str, args, rows: list[dict]) -> dict:
    """Slipway's launcher as the flow uses it, on the first N GPUs."""
    from tasks.recipe import Recipe
    from tasks.train.command import training_command

    gpus = int(variant.split("-")[1])
    run_dir = slipway_run_dir(variant, args, rows)
    recipe = Recipe.model_validate_json((run_dir / "recipe.json").read_text())
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(gpus))}
    cmd = training_command(recipe, run_dir, args.base, gpus=gpus)
    log = open(args.work / f"{variant}.log", "w")
    subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    end_wall = time.time()
    stats = json.loads((run_dir / "metrics" / "training-stats.json").read_text())
    return {"seconds": stats["seconds"], "start": end_wall - stats["seconds"], "end": end_wall, "gpus": gpus,
            "steps": stats["steps"], "final_loss": stats["final_loss"], "peak_gib": stats.get("peak_gpu_memory_gib"),
            "world_size": stats["world_size"], "first_step_s": stats.get("first_step_seconds"),
            "steady_s": stats.get("steady_seconds")}


def run_hf(args, rows: list[dict]) -> dict:
    """Plain transformers + PEFT: padded batches of 8, labels -100 outside the answer."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from tasks.train.worker import tokenize_row

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    data = []
    for r in rows:
        t = tokenize_row(r, tokenizer, 512)
        data.append({"input_ids": t["input_ids"],
                     "labels": [i if m else -100 for i, m in zip(t["input_ids"], t["completion_mask"])]})

    def collate(batch):
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), tokenizer.pad_token_id)
        labels = torch.full((len(batch), n), -100)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k], labels[i, :k], mask[i, :k] = torch.tensor(b["input_ids"]), torch.tensor(b["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    model = AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, task_type="CAUSAL_LM"))
    targs = TrainingArguments(output_dir=str(args.work / "hf-out"), per_device_train_batch_size=8, num_train_epochs=1,
                              learning_rate=2e-4, bf16=not args.tiny, logging_steps=10, save_strategy="no",
                              report_to=[], remove_unused_columns=False, disable_tqdm=True,
                              use_cpu=args.tiny)
    trainer = Trainer(model=model, args=targs, train_dataset=data, data_collator=collate)
    start = time.time()
    out = trainer.train()
    end = time.time()
    return {"seconds": end - start, "start": start, "end": end, "steps": trainer.state.global_step,
            "final_loss": out.training_loss, "peak_gib": _peak_gib()}


def run_unsloth_direct(args, rows: list[dict]) -> dict:
    """Unsloth as its fine-tuning guide shows it (FastLanguageModel, LoRA with its gradient checkpointing,
    SFTTrainer), on prompt/completion rows so the loss is on the answer only, batch 8, one epoch."""
    import unsloth  # noqa: F401  (first, as its docs say)
    from unsloth import FastLanguageModel
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(args.base), max_seq_length=512,
                                                         dtype=torch.bfloat16, load_in_4bit=False)
    model = FastLanguageModel.get_peft_model(model, r=16, target_modules=TARGETS, lora_alpha=32, lora_dropout=0,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=3407)
    data = Dataset.from_list([{"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in rows])
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=data, args=SFTConfig(
        per_device_train_batch_size=8, gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=2e-4,
        logging_steps=10, optim="adamw_8bit" if not args.tiny else "adamw_torch", weight_decay=0.01,
        lr_scheduler_type="linear", seed=3407, output_dir=str(args.work / "unsloth-direct-out"), report_to=[],
        max_length=512, save_strategy="no", bf16=not args.tiny, disable_tqdm=True))
    start = time.time()
    out = trainer.train()
    end = time.time()
    return {"seconds": end - start, "start": start, "end": end, "steps": trainer.state.global_step,
            "final_loss": out.training_loss, "peak_gib": _peak_gib()}


def _peak_gib():
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def child(args) -> None:
    rows = load_rows(args.data, args.rows)
    if args.variant == "hf":
        result = run_hf(args, rows)
    elif args.variant == "unsloth-direct":
        result = run_unsloth_direct(args, rows)
    elif args.variant.startswith(("ddp", "zero2")):
        result = run_multi(args.variant, args, rows)
    else:
        result = run_slipway(args.variant, args, rows)
    print("RESULT " + json.dumps(result), flush=True)


# ---- the parent: build the base once, run each variant in its own process, sample the GPUs, print ------

class GpuSampler:
    """NVML utilisation of every GPU every 0.1 s, so a training window's busy share can be read later."""

    def __init__(self):
        self.samples: list[tuple[float, list[int]]] = []
        self.stop = threading.Event()
        try:
            import pynvml
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.nvml = pynvml
        except Exception:   # no GPU / no NVML: no busy share
            self.handles = []
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while self.handles and not self.stop.wait(0.1):
            self.samples.append((time.time(), [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]))

    def busy(self, start: float, end: float, gpus: int) -> float | None:
        window = [s[:gpus] for t, s in self.samples if start <= t <= end]
        if not window:
            return None
        return round(sum(sum(s) / len(s) for s in window) / len(window) / 100, 3)


def parameters(base: Path) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base))
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="2-layer shape, 64 rows: CPU check of the script")
    parser.add_argument("--rows", type=int, default=None, help="first N Slipstream rows (default 1024; tiny 64)")
    parser.add_argument("--tokens-per-step", type=int, default=8192, help="packed variants: tokens per step")
    parser.add_argument("--pack-length", type=int, default=1024, help="packed variants: tokens per sequence")
    parser.add_argument("--variants", default=",".join(SINGLE + MULTI))
    parser.add_argument("--tokenizer", type=Path, default=None, help="SmolLM2 tokenizer folder (default: the "
                        "bootstrapped base model)")
    parser.add_argument("--data", type=Path, default=REPO / "data" / "slipstream-tqt.jsonl")
    parser.add_argument("--work", type=Path, default=Path("/tmp/slipway-bench"))
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--budget", type=int, default=0, help="seconds for the whole run: variants that would "
                        "start later are skipped (0 = no limit), so the table always prints")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.rows = args.rows or (64 if args.tiny else 1024)
    if args.tiny and args.tokens_per_step == 8192:
        args.tokens_per_step, args.pack_length = 1024, 512
    args.work.mkdir(parents=True, exist_ok=True)
    if args.variant:
        return child(args)

    import torch

    if args.tokenizer is None:
        from tasks.models.bootstrap import resolve_base_model
        from tasks.recipe import ModelConfig
        args.tokenizer = resolve_base_model(ModelConfig())
    t0 = time.time()
    base = build_base(args.work / ("base-tiny" if args.tiny else "base-8b"), args.tokenizer, args.tiny)
    n_params = parameters(base)
    rows = load_rows(args.data, args.rows)
    tokens = real_tokens(rows, args.tokenizer)
    gpus = torch.cuda.device_count()
    print(f"base {base} ({n_params / 1e9:.2f} B parameters) built/loaded in {time.time() - t0:.0f}s; {len(rows)} rows, "
          f"{tokens} real tokens ({tokens / len(rows):.0f} a row); {gpus} GPU(s)", flush=True)
    sampler = GpuSampler()
    results = {}
    for variant in args.variants.split(","):
        need = int(variant.split("-")[1]) if variant.startswith(("ddp", "zero2")) else 1
        if need > (gpus if gpus or not args.tiny else 1) or (variant.startswith(("ddp", "zero2")) and not gpus):
            results[variant] = {"skipped": f"needs {need} GPU(s)"}
            continue
        left = args.budget - (time.time() - t0) if args.budget else args.timeout
        if left < 30:
            results[variant] = {"skipped": "out of --budget"}
            continue
        cmd = [sys.executable, __file__, "--variant", variant, "--base", str(base), "--work", str(args.work),
               "--rows", str(args.rows), "--tokens-per-step", str(args.tokens_per_step), "--pack-length",
               str(args.pack_length), "--data", str(args.data)] + (["--tiny"] if args.tiny else [])
        t = time.time()
        try:
            # A single-GPU variant sees one GPU: with two visible, the HF Trainer would wrap the model in
            # nn.DataParallel (seen on 2026-11-30: `hf` ran on both GPUs, 16 rows a step).
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0"} if gpus and need == 1 else None
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=min(args.timeout, left),
                                  env=env)
        except subprocess.TimeoutExpired as exc:
            results[variant] = {"skipped": f"timed out after {min(args.timeout, left):.0f}s"}
            (args.work / f"{variant}.out").write_text(str(exc.stdout or "") + str(exc.stderr or ""))
            continue
        (args.work / f"{variant}.out").write_text(proc.stdout + proc.stderr)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
            results[variant] = {"skipped": f"failed (exit {proc.returncode}): {' | '.join(tail)[-300:]}"}
            print(f"{variant}: FAILED\n" + "\n".join((proc.stdout + proc.stderr).splitlines()[-25:]), flush=True)
            continue
        r = json.loads(line[len("RESULT "):])
        r["gpus"] = need
        r["tokens_per_s"] = tokens / r["seconds"]
        r["tokens_per_s_per_gpu"] = r["tokens_per_s"] / need
        # Steady state: steps 2..N (every packed step holds the same token budget), without the first
        # step's warm-up and the engine's set-up; what a longer run converges to.
        if r.get("steady_s") and r["steps"] > 1:
            r["steady_tokens_per_s"] = tokens * (r["steps"] - 1) / r["steps"] / r["steady_s"]
        r["mfu"] = 4 * n_params * r["tokens_per_s_per_gpu"] / PEAK_BF16_FLOPS
        r["busy"] = sampler.busy(r["start"], r["end"], need)
        r["process_s"] = round(time.time() - t, 1)
        results[variant] = r
        if args.json:   # as we go: a run cut short still leaves its figures
            args.json.write_text(json.dumps({"parameters": n_params, "tokens": tokens, "results": results}, indent=1))
        print(f"{variant}: {r['tokens_per_s']:.0f} tokens/s in {r['seconds']:.1f}s "
              f"(process {r['process_s']}s, peak {r.get('peak_gib')} GiB, busy {r['busy']})", flush=True)
    sampler.stop.set()
    print_table(results, n_params, tokens, args)
    if args.json:
        args.json.write_text(json.dumps({"parameters": n_params, "tokens": tokens, "rows": len(rows),
                                         "results": results}, indent=1))


def print_table(results: dict, n_params: int, tokens: int, args) -> None:
    ref = results.get("hf", {}).get("tokens_per_s")
    print(f"\n{len(results)} variants, {tokens} real tokens, {n_params / 1e9:.2f} B parameters, "
          f"packed: {args.tokens_per_step} tokens/step in {args.pack_length}-token sequences")
    print("| variant | GPUs | real tokens/s | tokens/s per GPU | MFU | steady tokens/s (steps 2..N) | steady per GPU "
          "| first step s | peak GiB | GPU busy | vs hf | steps | final loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if "skipped" in r:
            print(f"| {name} | | {r['skipped']} | | | | | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / ref:.2f}" if ref else ""
        busy = f"{r['busy']:.0%}" if r.get("busy") is not None else ""
        loss = f"{r['final_loss']:.3f}" if r.get("final_loss") is not None else ""
        steady = r.get("steady_tokens_per_s")
        steady_cols = (f"{steady:,.0f} | {steady / r['gpus']:,.0f}" if steady else " | ")
        print(f"| {name} | {r['gpus']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
              f"{steady_cols} | {r.get('first_step_s') or ''} | {r.get('peak_gib') or ''} | {busy} | {ratio} | "
              f"{r['steps']} | {loss} |")
    single = results.get("slipway-trl", {}).get("tokens_per_s_per_gpu")
    for name in ("ddp-2", "zero2-2"):
        r = results.get(name, {})
        if single and "tokens_per_s_per_gpu" in r:
            print(f"{name}: per-GPU efficiency vs slipway-trl on 1 GPU: {r['tokens_per_s_per_gpu'] / single:.0%}")
    steady_single = results.get("slipway-trl", {}).get("steady_tokens_per_s")
    for name in ("ddp-2", "zero2-2"):
        steady = results.get(name, {}).get("steady_tokens_per_s")
        if steady_single and steady:
            print(f"{name}: steady per-GPU efficiency vs slipway-trl on 1 GPU: {steady / 2 / steady_single:.0%}")
    ddp, zero2 = results.get("ddp-2", {}), results.get("zero2-2", {})
    if "tokens_per_s" in ddp and "tokens_per_s" in zero2:
        print(f"zero2-2 vs ddp-2: {zero2['tokens_per_s'] / ddp['tokens_per_s']:.0%}"
              + (f" (steady: {zero2['steady_tokens_per_s'] / ddp['steady_tokens_per_s']:.0%})"
                 if zero2.get("steady_tokens_per_s") and ddp.get("steady_tokens_per_s") else ""))


if __name__ == "__main__":
    main()
