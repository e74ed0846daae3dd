"""LoRA / QLoRA training with TRL's SFTTrainer (PEFT) or Unsloth, loss on the assistant turn only.

Runs as its own process (`python -m tasks.train.worker RUN_DIR --base BASE_DIR`, or under `accelerate
launch` for DDP / DeepSpeed ZeRO-2) so that the CPU default, a single GPU and several GPUs share one code
path; tasks/train/launch.py starts it. It imports nothing of Prefect (tests/train/test_worker.py checks),
so a GPU machine needs the training stack (torch, transformers, trl, peft, datasets) and the few wheels
the recipe validates with, not the orchestration.
Reads RUN_DIR/recipe.json and RUN_DIR/data/{train,val}.jsonl. Writes:
    RUN_DIR/checkpoints/       Trainer checkpoints every `save_steps` (a crash loses at most that much)
    RUN_DIR/lora/              the final adapter (adapter_config.json, adapter_model.safetensors) and the
                               training tokenizer with the chat template it used (model.chat_template)
    RUN_DIR/metrics/training-stats.json, RUN_DIR/metrics/loss-curve.png, RUN_DIR/metrics/mask-check.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

from tasks.models.chat_templates import NAMED_TEMPLATES, apply_template
from tasks.train.allocator import loaded_allocator
from tasks.train.completion_loss import completion_nll_trainer
from tasks.train.engines import import_engine
from tasks.train.packing import PackedCollator, pack_rows, sequences_per_step
from tasks.recipe import ModelConfig, Recipe
from tasks.run import DEQUANTIZED_FROM, RunFolder, atomic_dir, atomic_write_json, read_json, read_jsonl

log = logging.getLogger("slipway.train")


class MaskError(RuntimeError):
    """The loss mask leaves nothing to learn, or covers tokens outside the assistant turn."""


def tokenize_row(row: dict, tokenizer, max_length: int) -> dict:
    """Tokenize one chat row; completion_mask marks the assistant answer and its end-of-turn token."""
    messages = row["messages"]
    prompt_ids = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    full_ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    if full_ids[:len(prompt_ids)] != prompt_ids:
        raise MaskError("the chat template renders the prompt differently with and without the answer; "
                        "cannot locate the assistant turn")
    if tokenizer.eos_token_id is not None and not set(full_ids[len(prompt_ids):]) & special_ids(tokenizer):
        # A template with no end-of-turn token (GLM-4: a turn ends where the next role tag begins) would
        # train answers that never stop; end them with EOS, which llama.cpp and Ollama stop on.
        full_ids = full_ids + [tokenizer.eos_token_id]
    mask = [0] * len(prompt_ids) + [1] * (len(full_ids) - len(prompt_ids))
    return {"input_ids": full_ids[:max_length], "completion_mask": mask[:max_length]}


def special_ids(tokenizer) -> set[int]:
    """Ids of the special tokens (the tokenizer's own and the added ones marked special)."""
    return set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def check_mask(tokenized: list[dict], rows: list[dict], tokenizer) -> dict:
    """Measure what the loss sees: share of tokens trained on, and that they are the assistant's.

    Raises:
        MaskError: zero trainable label tokens, or trained-on text that is not the assistant answer.
    """
    total = sum(len(t["input_ids"]) for t in tokenized)
    trained = sum(sum(t["completion_mask"]) for t in tokenized)
    if trained == 0:
        raise MaskError("zero trainable label tokens: every row was masked (prompt longer than max_length?)")
    in_answer, checked = 0, 0
    for tok, row in zip(tokenized[:50], rows[:50]):
        ids = [i for i, m in zip(tok["input_ids"], tok["completion_mask"]) if m]
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        answer = row["messages"][-1]["content"].strip()
        checked += 1
        in_answer += answer.startswith(text) or text.startswith(answer)
    share = in_answer / checked
    if share < 1.0:
        raise MaskError(f"only {share:.0%} of checked rows train on exactly the assistant answer")
    truncated = sum(1 for t, r in zip(tokenized, rows) if len(t["input_ids"]) < len(
        tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=False)))
    return {"rows": len(tokenized), "tokens": total, "label_tokens": trained,
            "label_token_share": round(trained / total, 4), "assistant_share_of_labels": share,
            "rows_truncated": truncated}


def prepare_tokenizer(tokenizer, model: ModelConfig):
    """The tokenizer as training uses it and saves it beside the adapter: the recipe's chat template
    (`model.chat_template`: the tokenizer's own, or a named built-in) and a pad token. Merge, GGUF export,
    the Modelfile and the template check all read the saved tokenizer, so they render what training saw.

    Raises:
        ValueError: a named template whose end-of-turn marker is not one token of this vocabulary (the
            model could not learn to stop), or a tokenizer with no template of its own and none named.
    """
    apply_template(tokenizer, model.chat_template)
    named = NAMED_TEMPLATES.get(model.chat_template)
    if named is not None:
        if named.end_of_turn not in tokenizer.get_vocab():
            raise ValueError(f"model.chat_template {model.chat_template!r} ends a turn with {named.end_of_turn!r}, "
                             "which is not a token of this model's vocabulary; use 'model' or this family's template")
        if named.end_of_turn != named.role_markers[1].strip() and "eos_token" not in named.jinja:
            # Generation must stop where a trained turn ends (Gemma: <end_of_turn>, not the tokenizer's <eos>).
            # Not for GLM-4 (no end-of-turn token: it stops on the next role tag) nor templates that render
            # eos_token themselves (Phi-4-mini), whose rendering would change.
            tokenizer.eos_token = named.end_of_turn
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(recipe: Recipe, base_dir: Path):
    """Base model + tokenizer with LoRA attached, through Unsloth or plain transformers + PEFT."""
    import torch

    dtype = getattr(torch, recipe.model.dtype)
    lora = recipe.lora
    if recipe.training.engine == "unsloth":
        import_engine(recipe.training.engine)
        from unsloth import FastLanguageModel

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=str(base_dir), max_seq_length=recipe.training.max_length, dtype=dtype,
            load_in_4bit=recipe.model.load_in_4bit)
        model = FastLanguageModel.get_peft_model(
            model, r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
            target_modules=lora.target_modules, layers_to_transform=adapted_layers(model.config, lora),
            bias="none", random_state=recipe.training.seed,
            use_gradient_checkpointing="unsloth" if recipe.training.gradient_checkpointing else False)
        return model, prepare_tokenizer(tokenizer, recipe.model)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    kwargs: dict = {"dtype": dtype, "attn_implementation": recipe.training.attention}
    if torch.cuda.is_available():
        # Straight onto this process's GPU: an 8B base loaded to host memory first and moved later costs
        # ~15 GB of copies, inside train() under DeepSpeed (which places the model itself).
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if recipe.model.load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if recipe.model.load_in_4bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.training.gradient_checkpointing)
    model = get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM",
                                             layers_to_transform=adapted_layers(model.config, lora)))
    return model, prepare_tokenizer(tokenizer, recipe.model)


def compile_decoder_layers(model) -> int:
    """training.compile_layers: torch.compile every decoder layer in place (nn.Module.compile, so parameter
    names and the saved adapter are unchanged); returns how many. Regional rather than whole-model: Dynamo
    inlines the layers' modules, so the layers share one graph per kind (with or without LoRA, training or
    evaluation) and compiling costs seconds instead of minutes. dynamic=True: every padded batch length reuses
    that graph instead of compiling a second, dynamic one after the first new length."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = causal_lm.get_decoder().layers
    for layer in layers:
        layer.compile(dynamic=True)
    return len(layers)


def evaluate_eagerly(trainer) -> None:
    """The validation pass of a trainer whose layers are compiled runs them uncompiled: evaluation (no grad,
    eval mode) would compile a second set of graphs, ~20 s on a 2-core CPU for a pass that takes ~7 s eager
    (61 rows; bench/allocator_step.py --compile), outside what the time budget set aside for it."""
    import torch

    evaluate = trainer.evaluate

    def evaluate_uncompiled(*args, **kwargs):
        with torch.compiler.set_stance("force_eager"):
            return evaluate(*args, **kwargs)

    trainer.evaluate = evaluate_uncompiled


def adapted_layers(config, lora) -> list[int] | None:
    """The decoder layers that get adapters: the last `lora.last_layers` of them, or None (all)."""
    if not lora.last_layers:
        return None
    total = config.get_text_config().num_hidden_layers
    if lora.last_layers > total:
        raise ValueError(f"lora.last_layers is {lora.last_layers}, but the model has {total} decoder layers")
    return list(range(total - lora.last_layers, total))


def save_dequantized_base(model, base_dir: Path, out_dir: Path) -> int:
    """QLoRA: write the base as the adapter saw it, every 4-bit (bitsandbytes) weight dequantized and the
    rest copied from `base_dir`; returns how many weights were replaced. The adapter learned against these
    weights, so merge and the adapter's GGUF use them (RunFolder.adapter_base), not the 16-bit originals.

    Raises:
        KeyError: a quantized module whose weight is not in the base folder (the names would not line up).
    """
    import shutil

    import bitsandbytes as bnb
    from bitsandbytes.functional import dequantize_4bit
    from safetensors.torch import load_file, save_file

    weights: dict = {}
    for shard in sorted(Path(base_dir).glob("*.safetensors")):
        weights.update(load_file(shard))
    replaced = 0
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        # PEFT names the wrapped layer base_model.model.<module>.base_layer
        key = name.removeprefix("base_model.model.").replace(".base_layer", "") + ".weight"
        if key not in weights:
            raise KeyError(f"quantized weight {key} is not in {base_dir}")
        dense = dequantize_4bit(module.weight.data, module.weight.quant_state)
        weights[key] = dense.to(device="cpu", dtype=weights[key].dtype).reshape(weights[key].shape).contiguous()
        replaced += 1
    with atomic_dir(out_dir) as tmp:
        for f in Path(base_dir).iterdir():
            if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
                shutil.copy2(f, tmp / f.name)
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # The adapter's config names base_dir; export accepts this folder for it because of this record.
        (tmp / DEQUANTIZED_FROM).write_text(json.dumps({"base": str(Path(base_dir).resolve()),
                                                        "dequantized_weights": replaced}))
    return replaced


def plot_loss(history: list[dict], path: Path) -> None:
    """Loss (and learning rate) against step: a person reads this faster than the JSON."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if points:
        ax.plot(*zip(*points), marker=".", label="train loss")
    if evals:
        ax.plot(*zip(*evals), marker="o", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    if points or evals:     # a one-step run may log no loss at all
        ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _progress_callback(mark_step: int | None = None):
    """The Trainer callback that prints progress and times steps; `mark_step`: also note when that step ends
    (`marked_step_end`), so a probe can time the steps after it."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One line per logging step with ETA, so long CPU runs show where they are."""

        # Throughput without the warm-up: the first step pays kernel selection and allocator growth.
        first_step_seconds: float | None = None   # from train begin to the end of the first step
        first_step_end = last_step_end = marked_step_end = None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()
            self.start_step = state.global_step   # a resumed run starts past 0

        def on_step_end(self, args, state, control, **kw):
            first = self.first_step_end is None and state.global_step > self.start_step
            marked = mark_step is not None and state.global_step == mark_step
            if first or marked or state.global_step == state.max_steps:
                # The host runs ahead of the GPU: wait for the step's kernels (a few times a run, not every step).
                _synchronize()
                now = time.time()
                if first:
                    self.first_step_end, self.first_step_seconds = now, now - self.start
                if marked:
                    self.marked_step_end = now
                self.last_step_end = now

        def steady_seconds(self) -> float | None:
            """Seconds from the end of the first step to the end of the last (None for a one-step run)."""
            if self.first_step_end is None or self.last_step_end == self.first_step_end:
                return None
            return round(self.last_step_end - self.first_step_end, 2)

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            elapsed = time.time() - self.start
            eta = elapsed / max(state.global_step, 1) * (state.max_steps - state.global_step)
            parts = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items())
            print(f"[train] step {state.global_step}/{state.max_steps} {parts} "
                  f"elapsed={elapsed:.0f}s eta={eta:.0f}s", flush=True)

        def on_save(self, args, state, control, **kw):
            if state.is_world_process_zero:   # read by tasks/train/status.py (checkpoint_at)
                print(f"[train] checkpoint step {state.global_step}/{state.max_steps}", flush=True)

    return Progress()


def _deadline_callback(seconds: float):
    """Stops training `seconds` after it begins (training.time_budget_s, what the probe and the validation pass
    left of it). The probe reads a step within ~10% (the first step at each new sequence length costs more; a
    machine may slow down); stopping at the deadline keeps the budget whatever the probe read. The schedule spans
    the planned steps, so a stop cuts only its tail, where the cosine learning rate is a few % of its peak."""
    from transformers import TrainerCallback

    class Deadline(TrainerCallback):
        stopped_at_step: int | None = None

        def on_train_begin(self, args, state, control, **kw):
            self.ends_at = time.time() + seconds

        def on_step_end(self, args, state, control, **kw):
            if time.time() >= self.ends_at and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_at_step = state.global_step
                print(f"[train] time budget reached: stopping at step {state.global_step}/{state.max_steps}",
                      flush=True)

    return Deadline()


def batching(recipe: Recipe, tokenized: list[dict], val_tok: list[dict], tokenizer) -> tuple[list, list, dict]:
    """The rows the trainer sees and the SFTConfig fields that go with them.

    Unpacked: one row per example, padded per batch (rows of similar length share a batch).
    Packed (training.packing): fixed-length bins of several rows, `sequences_per_step` of them per device
    batch; the collator passes position_ids and no attention mask (tasks/train/packing.py).
    """
    cfg = recipe.training
    if not cfg.packing:
        return tokenized, val_tok, {"per_device_batch": cfg.batch_size, "max_length": cfg.max_length,
                                    "train_sampling_strategy": "group_by_length"}
    pack_length = cfg.pack_length or cfg.max_length
    if pack_length < cfg.max_length:
        raise ValueError(f"training.pack_length {pack_length} is shorter than training.max_length {cfg.max_length}")
    pad_id = tokenizer.pad_token_id
    train_bins = pack_rows(tokenized, pack_length, pad_id)
    mean_row = sum(len(t["input_ids"]) for t in tokenized) / len(tokenized)
    per_device = sequences_per_step(cfg.tokens_per_step, pack_length, cfg.batch_size, mean_row)
    print(f"[train] packing: {len(tokenized)} rows into {len(train_bins)} sequences of {pack_length} tokens, "
          f"{per_device} per device batch", flush=True)
    return train_bins, pack_rows(val_tok, pack_length, pad_id) if val_tok else [], {
        "per_device_batch": per_device, "max_length": pack_length, "train_sampling_strategy": "random",
        # The collator needs position_ids, which TRL's signature columns would drop; TRL's own padding-free
        # mode must stay off (Unsloth turns it on by itself when the flag is left unset).
        "remove_unused_columns": False, "padding_free": False, "packing": False}


def packing_report(bins: list[dict], per_device: int) -> dict:
    """Share of real tokens in the packed sequences (the rest is filler, never trained on)."""
    total = sum(len(b["input_ids"]) for b in bins)
    real = sum(b["real_tokens"] for b in bins)
    return {"sequences": len(bins), "sequence_length": len(bins[0]["input_ids"]) if bins else 0,
            "sequences_per_device_batch": per_device, "real_token_share": round(real / max(total, 1), 4)}


def loraplus_optimizer(model, args, lr_ratio: float | None):
    """LoRA+ (arXiv 2402.12354): AdamW with the B matrices at `lr_ratio` x the learning rate, built by PEFT.
    None (no ratio): the Trainer builds its own optimizer from `args`. The Trainer still makes the schedule."""
    if lr_ratio is None:
        return None
    import torch
    from peft.optimizers import create_loraplus_optimizer
    return create_loraplus_optimizer(model, torch.optim.AdamW, lr=args.learning_rate, loraplus_lr_ratio=lr_ratio,
                                     weight_decay=args.weight_decay, betas=(args.adam_beta1, args.adam_beta2),
                                     eps=args.adam_epsilon)


PROBE_STEPS = 8            # distinct batches of the probe, each trained twice; only the second pass is timed
# A run's step costs more than the probe's repeated one: checkpoints, progress lines, the first step at each new
# sequence length. Measured on a 2-core Intel Xeon with mimalloc: 0.464 s trained / 0.406 s probed (make demo,
# 1,172 steps) and 0.479 / 0.438 (513 steps, the validation pass included).
RUN_OVER_PROBE = 1.12


def probe_rows(tokenized: list[dict], count: int) -> list[dict]:
    """`count` training rows spread evenly over the row lengths (shortest to longest), always the same ones:
    random rows made the probe swing with the lengths it happened to draw (0.47-0.67 s a step on one machine
    for a 0.6-0.7 s step)."""
    by_length = sorted(tokenized, key=lambda r: len(r["input_ids"]))
    count = min(count, len(by_length))
    return [by_length[int((k + 0.5) * len(by_length) / count)] for k in range(count)]


def probe_step_seconds(build, model, tokenized: list[dict], batch_size: int) -> float:
    """Seconds of one optimizer step on an average training batch, timed on the real Trainer: `build(rows,
    max_steps, progress, scratch_dir)` makes the same trainer training will use (collator, loss, mixed precision,
    optimizer, gradient clipping, metrics), here reading its rows in order. PROBE_STEPS batches of rows spread over
    the lengths are trained twice and the second pass is timed, scaled by the mean row length and RUN_OVER_PROBE: a
    first step at a new sequence length pays for kernel set-up (oneDNN primitives, allocator growth) that a long run
    pays once per length, and timing it read 0.551 s a step where the run then trained at 0.47 s. Timing a bare
    forward/backward instead missed ~1/4 of a real CPU step (0.48 s probed vs 0.63 s trained). The adapter's
    weights are put back afterwards: the probe trains nothing."""
    import tempfile

    import torch

    rows = probe_rows(tokenized, batch_size * PROBE_STEPS)
    steps = max(1, len(rows) // batch_size)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    progress = _progress_callback(mark_step=steps)
    with tempfile.TemporaryDirectory() as scratch:   # the probe saves nothing, but a Trainer wants a folder
        trainer = build(rows[:steps * batch_size] * 2, 2 * steps, progress, scratch)
        trainer.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in before:
                p.copy_(before[n])
    # Accelerate wrapped model.forward for mixed precision; the training trainer wraps it again otherwise.
    trainer.accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    step_s = (progress.last_step_end - progress.marked_step_end) / steps
    mean_all = sum(len(r["input_ids"]) for r in tokenized) / len(tokenized)
    mean_probe = sum(len(r["input_ids"]) for r in rows) / len(rows)
    return step_s * mean_all / mean_probe * RUN_OVER_PROBE


def rows_within_budget(budget_s: float, step_s: float, probe_s: float, rows: int, val_rows: int,
                       batch_size: int, grad_accum: int, epochs: float) -> dict:
    """How many training rows fit in `budget_s` seconds: batches at `step_s` each (grad_accum of them an
    optimizer step), after the probe's own time and the validation pass (`val_s`). At least one optimizer step's
    rows; never more than there are."""
    # Evaluation computes every position's logits (TRL's metrics): a validation batch cost 0.9x a training step
    # on a 2-core CPU (60 rows, 12.6 s at 0.47 s a step), not the third of one a forward pass alone would.
    val_s = math.ceil(val_rows / batch_size) * step_s * math.ceil(epochs)
    steps = max(1, int((budget_s - probe_s - val_s) / step_s / grad_accum))
    keep = min(rows, max(batch_size * grad_accum, int(steps * batch_size * grad_accum / epochs)))
    return {"budget_s": budget_s, "probe_step_s": round(step_s, 3), "probe_s": round(probe_s, 1),
            "predicted_train_s": round(probe_s + val_s + math.ceil(keep * epochs / (batch_size * grad_accum))
                                       * grad_accum * step_s, 1),
            "val_s": round(val_s, 1), "rows_available": rows, "rows_kept": keep}


def training_budget_s(cfg, step_s: float) -> float:
    """training.time_budget_s, shrunk on a slow machine so the flow's other stages still fit in
    training.flow_time_budget_s: they cost about `other_stages_steps` of this machine's probed steps. Never below
    training.min_time_budget_s."""
    if cfg.flow_time_budget_s is None:
        return cfg.time_budget_s
    shrunk = cfg.flow_time_budget_s - cfg.other_stages_steps * step_s
    return round(min(cfg.time_budget_s, max(cfg.min_time_budget_s, shrunk)), 1)


def apply_time_budget(run: RunFolder, cfg, model, tokenized: list[dict], val_rows: int,
                      build) -> tuple[list[dict], dict | None]:
    """training.time_budget_s: the first training rows that fit, decided once per run (a resumed run reads
    the decision back, so its checkpoints match the rows and the schedule)."""
    if cfg.time_budget_s is None:
        return tokenized, None
    if cfg.max_steps != -1:
        print(f"[train] time budget not applied: training.max_steps={cfg.max_steps} decides", flush=True)
        return tokenized, None
    decision = read_json(run.training_budget, missing_ok=True)
    if decision is None:
        began = time.perf_counter()
        step_s = probe_step_seconds(build, model, tokenized, cfg.batch_size)
        budget_s = training_budget_s(cfg, step_s)
        decision = rows_within_budget(budget_s, step_s, time.perf_counter() - began, len(tokenized),
                                      val_rows, cfg.batch_size, cfg.grad_accum, cfg.epochs)
        if budget_s < cfg.time_budget_s:
            decision["shrunk_from_s"] = cfg.time_budget_s   # the report says why the budget is shorter
            print(f"[train] time budget {cfg.time_budget_s:g}s shrunk to {budget_s:.0f}s: the other stages take "
                  f"~{cfg.other_stages_steps:g} steps of {step_s:.3f}s here (flow_time_budget_s "
                  f"{cfg.flow_time_budget_s:g})", flush=True)
        atomic_write_json(run.training_budget, decision)
    print(f"[train] time budget {decision['budget_s']:.0f}s: {decision['probe_step_s']}s a step here, "
          f"training {decision['rows_kept']} of {decision['rows_available']} rows "
          f"(~{decision['predicted_train_s']:.0f}s)", flush=True)
    return tokenized[:decision["rows_kept"]], decision


def resolve_mixed_precision(choice: str) -> str:
    """'auto' -> 'bf16' where the hardware computes it natively, else 'no'."""
    import torch

    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    flags = open("/proc/cpuinfo").read() if Path("/proc/cpuinfo").exists() else ""
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "no"


def build_trainer(recipe: Recipe, model, tokenizer, train_data: list[dict], val_data: list[dict], batch_extras: dict,
                  precision: str, progress, **overrides):
    """TRL's SFTTrainer (or CompletionNLLTrainer) as the recipe trains: the same for training and for the time
    budget's probe, which overrides output_dir, max_steps and saving."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    cfg = recipe.training
    extras = {k: v for k, v in batch_extras.items() if k not in ("per_device_batch", "max_length")}
    per_device = batch_extras["per_device_batch"]
    fields = dict(
        num_train_epochs=cfg.epochs, max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio
        per_device_train_batch_size=per_device, per_device_eval_batch_size=per_device,
        gradient_accumulation_steps=cfg.grad_accum, gradient_checkpointing=cfg.gradient_checkpointing,
        max_length=batch_extras["max_length"], seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps, save_total_limit=2, eval_strategy="epoch" if val_data else "no",
        bf16=precision == "bf16", fp16=precision == "fp16", use_cpu=not torch.cuda.is_available(),
        completion_only_loss=True, report_to=[], dataloader_num_workers=0, use_liger_kernel=cfg.liger_kernel,
        # completion_nll is TRL's nll with the projection done by CompletionNLLTrainer (evaluation: TRL's nll)
        loss_type="nll" if cfg.loss_type == "completion_nll" else cfg.loss_type,
        neftune_noise_alpha=cfg.neftune_noise_alpha,
        **extras,
        ddp_find_unused_parameters=False if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        disable_tqdm=True)
    args = SFTConfig(**{**fields, **overrides})
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 and args.n_gpu > 1:
        # One process seeing several GPUs would wrap the model in nn.DataParallel, which PEFT models do
        # not survive; train on the first GPU and say how to use them all.
        log.warning("%d GPUs visible to one process: training on the first only; set "
                    "training.accelerate_config: ddp to use all of them", args.n_gpu)
        args._n_gpu = 1
    collator = PackedCollator(flatten=cfg.engine == "unsloth") if cfg.packing else None
    trainer_class = completion_nll_trainer(SFTTrainer) if cfg.loss_type == "completion_nll" else SFTTrainer
    return trainer_class(model=model, args=args, processing_class=tokenizer, data_collator=collator,
                         optimizers=(loraplus_optimizer(model, args, cfg.loraplus_lr_ratio), None),
                         train_dataset=Dataset.from_list(train_data),
                         eval_dataset=Dataset.from_list(val_data) if val_data else None,
                         callbacks=[progress])


def train(recipe: Recipe, run_dir: Path | RunFolder, base_dir: Path) -> dict:
    """Fine-tune and save the adapter; returns the training stats written to metrics/."""
    import torch
    from transformers.trainer_utils import get_last_checkpoint

    run = RunFolder(run_dir)
    cfg = recipe.training
    on_gpu = torch.cuda.is_available()
    if not on_gpu and cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    if on_gpu:
        # cuDNN's SDPA builds a new graph for every new sequence length (one per padded batch length):
        # profiled at 50-75 ms a step on an H200; the mem-efficient kernel needs none (1.7-1.9x a step).
        torch.backends.cuda.enable_cudnn_sdp(False)
    precision = resolve_mixed_precision(cfg.mixed_precision)
    model, tokenizer = load_model(recipe, base_dir)
    compiled = 0
    if cfg.compile_layers:
        compiled = compile_decoder_layers(model)
        print(f"[train] torch.compile: {compiled} decoder layers, compiled on the first steps", flush=True)
    rows = read_jsonl(run.split("train"))
    val_rows = read_jsonl(run.split("val"))
    tokenized = [tokenize_row(r, tokenizer, cfg.max_length) for r in rows]
    mask_report = check_mask(tokenized, rows, tokenizer)
    log.info("mask check: %s", mask_report)
    print(f"[train] mask check: {mask_report}", flush=True)
    val_tok = [tokenize_row(r, tokenizer, cfg.max_length) for r in val_rows]
    # No KV cache while training: with one, transformers ignores packed position_ids when it builds the
    # attention mask (rows would attend across a packed sequence). TRL turns it off too, in compute_loss.
    model.config.use_cache = False

    def build_probe(rows: list[dict], steps: int, progress, scratch: str):
        probe_data, _, extras = batching(recipe, rows, [], tokenizer)
        return build_trainer(recipe, model, tokenizer, probe_data, [], extras, precision, progress,
                             output_dir=scratch, max_steps=steps, save_strategy="no", logging_steps=steps,
                             gradient_accumulation_steps=1,   # seconds a batch; optimizer steps counted as batches
                             train_sampling_strategy="sequential")   # the second pass repeats the first's batches

    resumed_budget = run.training_budget.exists()   # an earlier attempt decided; this one trains what is left
    tokenized, budget = apply_time_budget(run, cfg, model, tokenized, len(val_tok), build_probe)
    train_data, val_data, batch_extras = batching(recipe, tokenized, val_tok, tokenizer)
    per_device = batch_extras["per_device_batch"]
    progress = _progress_callback()
    trainer = build_trainer(recipe, model, tokenizer, train_data, val_data, batch_extras, precision, progress,
                            output_dir=str(run.checkpoints_dir))
    if compiled:
        evaluate_eagerly(trainer)
    deadline = None
    if budget and not resumed_budget:
        deadline = _deadline_callback(budget["budget_s"] - budget["probe_s"] - budget["val_s"])
        trainer.add_callback(deadline)
    averaging = None
    if cfg.average_tail:
        from tasks.train.averaging import TailAverage
        averaging = TailAverage(model, cfg.average_tail)   # after the deadline: it reads the deadline's stop
        trainer.add_callback(averaging)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    start = time.time()
    # A resumed run (flow parameter resume_from) picks up its optimizer, scheduler and data order here.
    last = get_last_checkpoint(str(run.checkpoints_dir)) if run.checkpoints_dir.is_dir() else None
    if last:
        print(f"[train] resuming from {last}", flush=True)
    result = trainer.train(resume_from_checkpoint=last)
    seconds = time.time() - start
    # DeepSpeed moves the model to the GPU inside train(): the snapshot may sit on another device.
    changed = sum(int(not torch.equal(lora_before[n].to(p.device), p.detach()))
                  for n, p in model.named_parameters() if n in lora_before)
    history = trainer.state.log_history
    losses = [h["loss"] for h in history if "loss" in h]
    if deadline:
        budget = {**budget, "stopped_at_step": deadline.stopped_at_step}
    stats = {"train_rows": len(tokenized), "time_budget": budget, "steps": trainer.state.global_step, "epochs": cfg.epochs,
             "seconds": round(seconds, 1), "first_step_seconds": progress.first_step_seconds and round(
                 progress.first_step_seconds, 2), "steady_seconds": progress.steady_seconds(), "train_loss": result.training_loss,
             "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
             "eval_loss": next((h["eval_loss"] for h in reversed(history) if "eval_loss" in h), None),
             "tokens_seen": sum(len(t["input_ids"]) for t in tokenized) * cfg.epochs if cfg.max_steps < 0 else None,
             "trainable_tensors_changed": changed, "trainable_tensors": len(lora_before),
             "trainable_params": sum(p.numel() for p in lora_before.values()),
             "mask": mask_report, "device": "cuda" if on_gpu else "cpu", "mixed_precision": precision,
             "allocator": loaded_allocator(), "compiled_layers": compiled,
             "tail_average": averaging.report() if averaging else None,
             "world_size": int(os.environ.get("WORLD_SIZE", "1")), "engine": cfg.engine,
             "packing": packing_report(train_data, per_device) if cfg.packing else None,
             "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None,
             "history": history}
    if trainer.is_world_process_zero():
        with atomic_dir(run.lora_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        if recipe.model.load_in_4bit:
            stats["dequantized_base_weights"] = save_dequantized_base(model, base_dir, run.quantized_base_dir)
        atomic_write_json(run.training_stats, stats)
        atomic_write_json(run.mask_check, mask_report)
        plot_loss(history, run.loss_curve)
    if stats["final_loss"] is not None and not math.isfinite(stats["final_loss"]):
        raise RuntimeError(f"training diverged: final loss {stats['final_loss']}")
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a LoRA adapter for a prepared Slipway run folder.")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--base", type=Path, required=True, help="local HF folder of the base model")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    recipe = Recipe.model_validate_json(RunFolder(args.run_dir).recipe_json.read_text())
    # Before anything imports transformers/trl/peft: Unsloth patches them at import time.
    import_engine(recipe.training.engine)
    train(recipe, args.run_dir, args.base)
    return 0


if __name__ == "__main__":
    sys.exit(main())

