"""Measure one model on the run's test rows: run it through a runner, score every answer, trace every call.

`run_and_score` is the one evaluation path: the baseline and merged evaluations, the served GGUF, the LLM
baseline, the Fledgling SLM evaluations and the parity table all go through it. The measuring tasks write
`metrics/eval-<label>.json` (the summary) and `metrics/predictions-<label>.jsonl` (one record per row)
in the run folder, and, when tracing is on, one span per model with a generation per call and the row's
metric scores on it, the aggregate metrics as scores on the span.

    measure_hf_model        the base or fine-tuned SLM with transformers (batched greedy generation)
    serve_and_measure_gguf  an exported GGUF through llama.cpp's server
    measure_llm_baseline    the recipe's LLM baseline: a saved endpoint Block, or a local GGUF stand-in
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Callable

from prefect import task
from prefect.blocks.core import Block
from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger

import blocks.llm  # noqa: F401  (registers OpenAICompatibleEndpoint and AzureOpenAIEndpoint for Block.load)
from tasks import tracing
from tasks.models.bootstrap import baseline_gguf
from tasks.eval import metrics
from tasks.eval.runners import (EndpointConfigError, EndpointRunner, FailedCalls, HFRunner, Request, Runner,
                                check_failed_calls, llama_cpp_runner, requests_from_rows)
from tasks.llamacpp.serve import answer_grammar
from tasks.tasktypes import task_of
from tasks.tasktypes.base import TokenCounter
from tasks.recipe import DeployConfig, EvalConfig, Recipe
from tasks.progress import ProgressBar
from tasks.run import RunFolder, atomic_write_json, atomic_write_jsonl, read_jsonl, resumable_stage, stage_timer
from tasks.timeouts import StageTimeout, stage_deadline


@functools.lru_cache(maxsize=4)
def token_counter(tokenizer_dir: str) -> TokenCounter:
    """Token counts with the SLM's own tokenizer (no special tokens): the unit the SLIP comparison uses."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


class TracingObserver:
    """Opens a Langfuse generation per call under the model's span; remembers ids for the scores."""

    def __init__(self, parent: tracing.SpanRef, label: str, model: str, runner_kind: str, max_tokens: int,
                 prices: tuple[float | None, float | None]):
        self.parent, self.label, self.model, self.kind = parent, label, model, runner_kind
        self.params = {"temperature": 0.0, "max_tokens": max_tokens}
        self.prices = prices
        self.generation_ids: dict[str, str | None] = {}

    def start(self, request: Request):
        payload = {"messages": request.messages}
        if request.tools:
            payload["tools"] = request.tools
        return tracing.start_generation(self.label, self.model, payload, parent=self.parent,
                                        model_parameters=self.params,
                                        metadata={"row_id": request.row_id, "runner": self.kind})

    def end(self, handle, request, completion) -> None:
        cost = None
        if self.prices[0] is not None and completion.prompt_tokens is not None:
            cost = {"input": completion.prompt_tokens * self.prices[0] / 1e6,
                    "output": (completion.completion_tokens or 0) * (self.prices[1] or 0) / 1e6}
        output = completion.text if not completion.tool_calls else {"content": completion.text,
                                                                     "tool_calls": completion.tool_calls}
        handle.end(output=output, usage={"input": completion.prompt_tokens, "output": completion.completion_tokens},
                   cost=cost, metadata={"latency_s": round(completion.latency_s, 4)}, error=completion.error)
        self.generation_ids[request.row_id] = handle.id


def run_and_score(runner: Runner, rows: list[dict], run_name: str, count_tokens: TokenCounter | None = None,
                  prices: tuple[float | None, float | None] = (None, None), usd_per_hour: float | None = None,
                  progress: Callable[[int, int], None] | None = None) -> tuple[dict, list[dict]]:
    """Generate, score and trace one model on the rows; returns (summary, per-row records)."""
    kind = task_of(rows[0])
    requests = requests_from_rows(rows)
    with tracing.span(run_name, f"eval {runner.label}", input={"rows": len(rows), "task": kind.name},
                      metadata={"model": runner.model, "runner": runner.kind}) as parent:
        observer = TracingObserver(parent, runner.label, runner.model, runner.kind,
                                   getattr(runner, "max_new_tokens", 0), prices)
        began = time.perf_counter()
        completions = runner.run(requests, observer=observer, progress=progress)
        seconds = time.perf_counter() - began
        scored = [metrics.score_row(r, c.text, count_tokens, c.tool_calls) for r, c in zip(rows, completions)]
        summary = metrics.aggregate(kind.name, scored, [c.as_call() for c in completions], seconds)
        for req, s in zip(requests, scored):
            for key in (k for k in kind.metric_keys if s[k] is not None):   # None: not this row's metric
                tracing.score(key, s[key], trace_id=parent.trace_id, observation_id=observer.generation_ids.get(
                    req.row_id))
        for key in (k for k in kind.metric_keys if summary[k] is not None):
            tracing.score(key, summary[key], trace_id=parent.trace_id, observation_id=parent.span_id,
                          comment=f"{runner.label}: mean over {len(rows)} rows")
    cost = metrics.cost_per_1k_requests(summary, prices[0], prices[1], usd_per_hour)
    summary = {"model": runner.label, "model_name": runner.model, "runner": runner.kind, "task": kind.name,
               **summary, "cost": cost}
    # `call_error`: the call failed (no answer); a scorer's `error` says what was wrong with an answer.
    records = [{"id": req.row_id, "prompt": req.messages[-1]["content"], "answer": c.text,
                **({"tool_calls": c.tool_calls} if c.tool_calls else {}),
                **{k: v for k, v in c.as_call().items() if k != "error"}, "call_error": c.error, **s}
               for req, c, s in zip(requests, completions, scored)]
    return summary, records


def _save_eval(run: RunFolder, label: str, summary: dict, records: list[dict], cfg: EvalConfig) -> dict:
    """Write the summary and predictions, then refuse the evaluation if too many calls failed (the files
    stay, so the failed calls can be read).

    Raises:
        FailedCalls: more failed calls than `eval.max_failed_calls`, naming the count.
    """
    atomic_write_json(run.eval_metrics(label), summary)
    atomic_write_jsonl(run.predictions(label), records)
    check_failed_calls(label, [r.get("call_error") for r in records], cfg.max_failed_calls,
                       f"eval.max_failed_calls is {cfg.max_failed_calls}; every call in {run.predictions(label)}")
    return summary


def _progress_logger(label: str, run_name: str, total: int):
    """Rows done per model: about ten log lines, and a Prefect progress artifact `eval-<label>-<run>`."""
    try:
        logger = get_run_logger()
    except MissingContextError:   # called outside a flow (tests, notebooks)
        logger = logging.getLogger("slipway.measure")
    bar = ProgressBar(f"eval-{label}", run_name, total, f"eval {label}: 0/{total} rows")
    step = {"next": 0}

    def report(done: int, total: int) -> None:
        # About ten lines per evaluation: enough to see it move, not enough to drown the log.
        if done >= step["next"] or done == total:
            logger.info("[eval %s] %d/%d", label, done, total)
            step["next"] = done + max(1, total // 10)
        bar.update(done, f"eval {label}: {done}/{total} rows")
        if done == total:
            bar.close()

    return report


def _deadline(label: str, cfg: EvalConfig):
    return stage_deadline(f"eval-{label}", cfg.timeout_s, "eval.timeout_s")


def _counter_for(rows: list[dict], tokenizer_dir: Path | None) -> TokenCounter | None:
    return token_counter(str(tokenizer_dir)) if tokenizer_dir and task_of(rows[0]).counts_tokens else None


def measure_hf(run_dir: Path, label: str, model_dir: Path, cfg: EvalConfig, adapter_dir: Path | None = None,
               tokenizer_dir: Path | None = None) -> dict:
    """Greedy HF generation on the run's test rows, scored for the rows' task; writes metrics/eval-<label>.json."""
    run = RunFolder(run_dir)
    rows = read_jsonl(run.split("test"))
    runner = HFRunner(Path(model_dir), label, cfg.max_new_tokens, cfg.batch_size, adapter_dir=adapter_dir)
    with stage_timer(run, f"eval-{label}"), _deadline(label, cfg):
        summary, records = run_and_score(runner, rows, run.name, _counter_for(rows, tokenizer_dir or model_dir),
                                         usd_per_hour=cfg.slm_usd_per_hour,
                                         progress=_progress_logger(label, run.name, len(rows)))
    tracing.flush()
    return _save_eval(run, label, summary, records, cfg)


def measure_gguf(run_dir: Path, label: str, gguf_path: Path, cfg: EvalConfig, deploy: DeployConfig,
                 tokenizer_dir: Path | None = None, lora_path: Path | None = None, split: str = "test",
                 max_rows: int = 0) -> dict:
    """llama.cpp's server on the GGUF (plus a GGUF LoRA), measured through the `openai` client, then stopped.

    Greedy like every runner here (temperature 0, top_k 1, repeat_penalty 1.0: runners.LLAMA_CPP_GREEDY).
    `split` names the run's row file: the test split, or an eval file's rows (write_eval_file_split);
    `max_rows` > 0 measures only its first rows (the summary's `rows` says how many).
    """
    run = RunFolder(run_dir)
    rows = read_jsonl(run.split(split))
    rows = rows[:max_rows] if max_rows else rows
    grammar = answer_grammar(run, deploy, task_of(rows[0]).name) if rows else None
    with stage_timer(run, f"eval-{label}"), _deadline(label, cfg), llama_cpp_runner(
            gguf_path, run.server_log(label), label, cfg.max_new_tokens, parallel=deploy.parallel,
            lora_path=lora_path, request_timeout_s=cfg.request_timeout_s, grammar_file=grammar) as runner:
        summary, records = run_and_score(runner, rows, run.name, _counter_for(rows, tokenizer_dir),
                                         usd_per_hour=cfg.slm_usd_per_hour,
                                         progress=_progress_logger(label, run.name, len(rows)))
    summary["grammar_constrained"] = grammar is not None
    tracing.flush()
    return _save_eval(run, label, summary, records, cfg)


@task(name="measure-hf-model")
@resumable_stage(lambda args: f"eval-{args['label']}")
def measure_hf_model(run_dir: Path, label: str, model_dir: Path, cfg: EvalConfig,
                     adapter_dir: Path | None = None, tokenizer_dir: Path | None = None) -> dict:
    """Greedy HF generation on the run's test rows, scored for the rows' task; writes metrics/eval-<label>.json."""
    return measure_hf(run_dir, label, model_dir, cfg, adapter_dir, tokenizer_dir)


def _retry_unless_refused(task, task_run, state) -> bool:
    """Retry transient I/O failures; a refused configuration (401, 404, ...) fails at once, and so do calls
    that still failed after their own retries (another pass would only repeat them), and a stage that ran
    out of its time."""
    try:
        state.result()
    except (EndpointConfigError, FailedCalls, StageTimeout):
        return False
    except Exception:
        return True
    return False


@task(name="serve-and-measure-gguf", retries=2, retry_delay_seconds=5,  # I/O: a server and HTTP calls
      retry_condition_fn=_retry_unless_refused)
@resumable_stage(lambda args: f"eval-{args['label']}")
def serve_and_measure_gguf(run_dir: Path, label: str, gguf_path: Path, cfg: EvalConfig,
                           deploy: DeployConfig, tokenizer_dir: Path | None = None, split: str = "test",
                           max_rows: int = 0) -> dict:
    """Start llama.cpp's OpenAI-compatible server on the GGUF, measure through the `openai` client, stop it.

    The finetune flow measures base (its cached f16 GGUF), merged (the run's f16 GGUF) and the served
    quantization this way; the parity table keeps the one transformers-vs-llama.cpp comparison."""
    return measure_gguf(run_dir, label, gguf_path, cfg, deploy, tokenizer_dir, split=split, max_rows=max_rows)


def load_endpoint_block(ref: str):
    """Load a saved endpoint Block by '<block-type-slug>/<name>'."""
    return Block.load(ref)


@task(name="measure-llm-baseline", retries=2, retry_delay_seconds=10,   # I/O: a remote API or a local server
      retry_condition_fn=_retry_unless_refused)
@resumable_stage(lambda args: f"baseline-{args['recipe'].baseline.label}")
def measure_llm_baseline(run_dir: Path, recipe: Recipe, tokenizer_dir: Path | None = None) -> dict:
    """The recipe's LLM baseline on the same rows and prompts: a saved endpoint Block (Azure OpenAI, any
    OpenAI-compatible URL) or, for offline demos and tests, a local GGUF served by llama.cpp."""
    cfg, ev, run = recipe.baseline, recipe.eval, RunFolder(run_dir)
    rows = read_jsonl(run.split("test"))
    options = {"structured_output": cfg.structured_output, "tool_calling": cfg.tool_calling}
    label = cfg.label
    grammar = None   # an endpoint Block is asked as it is; a local GGUF is served under the run's rule
    with contextlib.ExitStack() as stack, stage_timer(run, f"eval-{label}"), _deadline(label, ev):
        if cfg.source == "block":
            endpoint = load_endpoint_block(cfg.block)
            runner = EndpointRunner(endpoint, label, ev.max_new_tokens, cfg.concurrency, **options)
            prices = (cfg.input_usd_per_mtok if cfg.input_usd_per_mtok is not None else endpoint.input_cost_per_mtok,
                      cfg.output_usd_per_mtok if cfg.output_usd_per_mtok is not None else endpoint.output_cost_per_mtok)
        else:
            grammar = answer_grammar(run, recipe.deploy, recipe.task)
            runner = stack.enter_context(llama_cpp_runner(
                baseline_gguf(cfg), run.server_log(label), label, ev.max_new_tokens,
                parallel=cfg.concurrency, request_timeout_s=ev.request_timeout_s, grammar_file=grammar, **options))
            prices = (cfg.input_usd_per_mtok, cfg.output_usd_per_mtok)   # None: not priced
        summary, records = run_and_score(runner, rows, run.name, _counter_for(rows, tokenizer_dir), prices=prices,
                                         progress=_progress_logger(label, run.name, len(rows)))
    summary["grammar_constrained"] = grammar is not None
    tracing.flush()
    return _save_eval(run, label, summary, records, ev)

