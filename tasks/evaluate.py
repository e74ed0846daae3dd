"""Evaluation: generate answers for the test split and score them with the strict protocol parser.

Two runners share one scorer:
  * HF (transformers, batched greedy generation) for the base and merged models;
  * any OpenAI-compatible endpoint through the official `openai` client (llama.cpp's server here),
    with greedy sampling set explicitly (temperature 0, top_k 1, repeat_penalty 1.0), because
    llama.cpp's default samplers change a tiny model's answers.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from prefect import task

from tasks.protocol import SlipParseError, extract_slip_loose, parse_tqt
from tasks.recipe import DeployConfig, EvalConfig
from tasks.runfs import atomic_write_json, atomic_write_jsonl, stage_timer
from tasks.serve import llama_server

METRIC_NAMES = {"parse": "strict_parse", "anchor": "anchor_accuracy", "src_dst": "src_dst_accuracy"}


def score_answer(answer: str, gold_answer: str) -> dict:
    """Per-row scores: strict TQT parse, exact anchor, exact src+dst (0 when the answer does not parse)."""
    gold = parse_tqt(gold_answer).slip
    try:
        slip = parse_tqt(answer).slip
        parsed = True
    except SlipParseError as exc:
        slip, parsed, error = None, False, str(exc)
    loose = slip or extract_slip_loose(answer)
    return {"strict_parse": float(parsed),
            "anchor_accuracy": float(parsed and slip.anchor == gold.anchor),
            "src_dst_accuracy": float(parsed and (slip.src, slip.dst) == (gold.src, gold.dst)),
            "anchor_loose": float(loose is not None and loose.anchor == gold.anchor),
            "predicted_anchor": slip.anchor if parsed else None, "gold_anchor": gold.anchor,
            "error": None if parsed else error}


def aggregate(scored: list[dict], seconds: float, tokens: int) -> dict:
    """Mean of each metric, per-anchor accuracy, and throughput."""
    n = len(scored)
    keys = ("strict_parse", "anchor_accuracy", "src_dst_accuracy", "anchor_loose")
    summary = {k: round(sum(s[k] for s in scored) / n, 4) for k in keys}
    per_anchor: dict[str, list[float]] = {}
    for s in scored:
        per_anchor.setdefault(s["gold_anchor"], []).append(s["anchor_accuracy"])
    summary["per_anchor"] = {a: round(sum(v) / len(v), 3) for a, v in sorted(per_anchor.items())}
    summary["errors"] = dict(Counter(s["error"].split(":")[0][:60] for s in scored if s["error"]).most_common(5))
    summary.update(rows=n, seconds=round(seconds, 1), generated_tokens=tokens,
                   tokens_per_second=round(tokens / seconds, 1) if seconds else None)
    return summary


def generate_hf(model_dir: Path, rows: list[dict], max_new_tokens: int, batch_size: int,
                adapter_dir: Path | None = None, progress: Callable[[int, int], None] | None = None
                ) -> tuple[list[str], int]:
    """Greedy, batched, left-padded generation with transformers; returns answers and generated tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    eos_ids = list({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
    # Sort by prompt length so each batch pads little; restore the order afterwards.
    prompts = [tokenizer.apply_chat_template(r["messages"][:-1], add_generation_prompt=True, tokenize=False)
               for r in rows]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[str] = [""] * len(rows)
    n_tokens = 0
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        for i, seq in zip(idx, new):
            kept = [t for t in seq.tolist() if t != tokenizer.pad_token_id and t not in eos_ids]
            n_tokens += len(kept)
            answers[i] = tokenizer.decode(kept, skip_special_tokens=True)
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return answers, n_tokens


def generate_openai(base_url: str, model: str, rows: list[dict], max_new_tokens: int, api_key: str = "none",
                    concurrency: int = 2, progress: Callable[[int, int], None] | None = None
                    ) -> tuple[list[str], int]:
    """Greedy chat completions from an OpenAI-compatible server; returns answers and completion tokens."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key, max_retries=3, timeout=120)
    done = 0

    def one(row: dict) -> tuple[str, int]:
        nonlocal done
        resp = client.chat.completions.create(
            model=model, messages=row["messages"][:-1], max_tokens=max_new_tokens, temperature=0.0, seed=0,
            # llama.cpp sampler settings (ignored by other servers): pure greedy, no repetition penalty.
            extra_body={"top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0})
        done += 1
        if progress:
            progress(done, len(rows))
        usage = resp.usage.completion_tokens if resp.usage else 0
        return resp.choices[0].message.content or "", usage

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, rows))
    return [r[0] for r in results], sum(r[1] for r in results)


def evaluate_answers(rows: list[dict], answers: list[str], seconds: float, tokens: int) -> tuple[dict, list[dict]]:
    """Score answers against the gold rows; returns (summary, per-row records)."""
    scored = [score_answer(a, r["messages"][-1]["content"]) for a, r in zip(answers, rows)]
    records = [{"prompt": r["messages"][-2]["content"], "answer": a, **s}
               for r, a, s in zip(rows, answers, scored)]
    return aggregate(scored, seconds, tokens), records


def timed(fn, *args, **kwargs):
    start = time.time()
    result = fn(*args, **kwargs)
    return result, time.time() - start


def _load_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in open(path) if line.strip()]


def _save_eval(run_dir: Path, label: str, summary: dict, records: list[dict]) -> dict:
    atomic_write_json(run_dir / "metrics" / f"eval-{label}.json", summary)
    atomic_write_jsonl(run_dir / "metrics" / f"predictions-{label}.jsonl", records)
    return summary


def _progress_logger(label: str):
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    step = {"next": 0}

    def report(done: int, total: int) -> None:
        # About ten lines per evaluation: enough to see it move, not enough to drown the log.
        if done >= step["next"] or done == total:
            logger.info("[eval %s] %d/%d", label, done, total)
            step["next"] = done + max(1, total // 10)

    return report


@task(name="evaluate-hf-model")
def evaluate_hf_model(run_dir: Path, label: str, model_dir: Path, cfg: EvalConfig,
                      adapter_dir: Path | None = None) -> dict:
    """Greedy HF generation on the test split, scored strictly; writes metrics/eval-<label>.json."""
    rows = _load_rows(run_dir / "data" / "test.jsonl")
    with stage_timer(run_dir, f"eval-{label}"):
        (answers, tokens), seconds = timed(generate_hf, model_dir, rows, cfg.max_new_tokens, cfg.batch_size,
                                           adapter_dir=adapter_dir, progress=_progress_logger(label))
        summary, records = evaluate_answers(rows, answers, seconds, tokens)
    return _save_eval(run_dir, label, {"model": label, "runner": "transformers", **summary}, records)


@task(name="serve-and-evaluate-gguf", retries=2, retry_delay_seconds=5)  # I/O: a server and HTTP calls
def serve_and_evaluate_gguf(run_dir: Path, label: str, gguf_path: Path, cfg: EvalConfig,
                            deploy: DeployConfig) -> dict:
    """Start llama.cpp's OpenAI-compatible server on the GGUF, evaluate through the `openai` client, stop it."""
    rows = _load_rows(run_dir / "data" / "test.jsonl")
    with stage_timer(run_dir, f"eval-{label}"), llama_server(
            Path(gguf_path), run_dir / "metrics" / f"llama-server-{label}.log", alias=label,
            host=deploy.host, port=deploy.port, parallel=deploy.parallel) as server:
        (answers, tokens), seconds = timed(generate_openai, server.base_url, server.model, rows,
                                           cfg.max_new_tokens, concurrency=deploy.parallel,
                                           progress=_progress_logger(label))
        summary, records = evaluate_answers(rows, answers, seconds, tokens)
    return _save_eval(run_dir, label, {"model": label, "runner": "llama.cpp server", **summary}, records)
