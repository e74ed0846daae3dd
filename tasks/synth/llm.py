"""LLM-enhanced synthesis of Slipstream training records (the "Option B" path of the Data factory).

Like slipcore.finetune_llm, each request asks one LLM endpoint for a batch of scenarios as a JSON array.
Unlike it, every record is validated with the protocol parser and repaired or dropped with a reason
(tasks/synth/repair.py), and every requested record is accounted for:

    requested = kept + repaired + dropped[reason]

including records of batches that failed after all retries and records the model did not return.

Requests: one Prefect task run per batch, at most `concurrency` at a time. A transient failure (429,
5xx, timeout, connection) waits for max(Retry-After, exponential backoff) plus jitter and then fails the
attempt, so Prefect retries the task run: the UI shows each retry in the task run's state history and a
log line saying why and how long it waited. Batch answers are cached by what decides them (endpoint
without its key, prompt, batch, seed, sampling), so a re-run makes no request for a batch it already has.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from dataclasses import dataclass
from string import Template
from typing import Literal

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.futures import as_completed, wait
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks import tracing
from tasks.data.dedupe import NEAR_DUPLICATE_JACCARD
from tasks.llm_client import APIRequestError, LLMEndpoint, backoff_delay, complete, endpoint_identity
from tasks.progress import ProgressBar
from tasks.protocol import DATASET_ANCHORS
from tasks.recipe import repo_path

# Bump when the meaning of a cached batch answer changes (what the batch task returns).
CACHE_VERSION = 1
# Rough sizes for the cost estimate: ~4 characters per token in English prompts; one JSON record of the
# requested shape is ~70 tokens.
CHARS_PER_TOKEN = 4
TOKENS_PER_RECORD = 70
BLOCK_SLUGS = ("openai-compatible-endpoint", "azure-openai-endpoint")

# The anchors the published dataset uses, with slipcore's canonical glosses (tasks/protocol.py).
ANCHOR_GLOSSES = {
    "RequestTask": "ask another agent to do a task", "RequestReview": "ask for a review of work",
    "RequestHelp": "ask for assistance", "RequestPlan": "ask for a plan",
    "InformComplete": "report that a task is complete", "InformProgress": "share a progress update",
    "InformBlocked": "report being blocked on something", "InformStatus": "give a status update",
    "ProposePlan": "propose a plan", "ProposeChange": "propose a modification",
    "ProposeAlternative": "propose an alternative approach", "EvalApprove": "approve reviewed work",
    "EvalReject": "reject reviewed work", "EvalNeedsWork": "reviewed work needs revision",
    "Accept": "accept a proposal or request", "Reject": "decline a proposal or request",
    "MetaAck": "acknowledge receipt", "MetaHandoff": "hand off responsibility",
    "Fallback": "nothing above fits; the payload summarises the message",
}
assert set(ANCHOR_GLOSSES) == set(DATASET_ANCHORS)
FOCUS_DOMAINS = ("software engineering", "data science", "DevOps and infrastructure", "product management",
                 "research", "creative work")

# $count, $anchors and $focus are filled per batch. string.Template, not str.format, so that the JSON
# example needs no escaped braces (custom templates are easier to write the same way).
PROMPT_TEMPLATE = """You are generating training data for the Slipstream protocol, a compact message format \
that AI agents use to coordinate.

Write $count different, realistic scenarios in which one AI agent sends a message to another. \
Each scenario is a JSON object with these fields:
- "instruction": what a user tells the agent to communicate, in plain English
- "thought": one sentence of the agent's reasoning about the message
- "src": the sending agent's name (lowercase letters, digits, underscores)
- "dst": the receiving agent's name
- "anchor": the intent, exactly one of the anchor names below
- "payload": a list of 0 to 4 short tokens (letters, digits, _ . -) with the key details

Anchors:
$anchors

Use many different anchors, including a few Fallback scenarios for messages no anchor fits. \
This batch is about $focus.

Answer with a JSON array only, like:
[{"instruction": "Ask the reviewer to check the auth module", "thought": "I need feedback on the auth \
code before merging", "src": "developer", "dst": "reviewer", "anchor": "RequestReview", \
"payload": ["auth_module"]}]
"""
TEMPLATE_FIELDS = {"count", "anchors", "focus"}


class SynthesisConfig(BaseModel):
    """One synthesis run: which endpoint, how many records, how to batch, retry and sample."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Literal["llm", "templates"] = Field(
        "llm", description="'llm': ask an LLM endpoint; 'templates': tasks/synth/templates.py (slot templates "
        "in data/slipstream-templates.yaml; no endpoint, no cost).")
    endpoint: str | None = Field(
        None, description="Prefect Block document of the endpoint, 'openai-compatible-endpoint/<name>' or "
        "'azure-openai-endpoint/<name>' (blocks/llm.py); method 'llm' needs it unless the flow is given "
        "a Block object.")
    n: int = Field(1000, gt=0, le=1_000_000, description="Records to request.")
    batch_size: int = Field(25, gt=0, le=200, description="Records asked for in one request.")
    concurrency: int = Field(4, gt=0, le=64, description="Requests in flight at once.")
    max_retries: int = Field(5, ge=0, le=50, description="Retries of one request on 429/5xx/timeouts.")
    backoff_base_s: float = Field(1.0, gt=0, description="First retry waits about this long (doubling).")
    backoff_max_s: float = Field(60.0, gt=0, description="Longest backoff (a longer Retry-After still wins).")
    backoff_jitter: float = Field(0.5, ge=0, le=1, description="Random extra wait, as a share of the backoff.")
    max_wait_s: float = Field(300.0, gt=0, description="A Retry-After longer than this fails the batch "
                              "instead of waiting.")
    seed: int = Field(42, description="Per-request seeds derive from it (providers that honour `seed`).")
    temperature: float = Field(0.8, ge=0, le=2)
    max_tokens: int = Field(4096, gt=0, description="Completion-token limit of one request.")
    prompt_template: str | None = Field(
        None, description="Path to a prompt template with $count (and optionally $anchors, $focus); "
        "default: the built-in one. Changing it invalidates cached answers.")
    max_cost_usd: float | None = Field(None, ge=0, description="Stop before the first request if the "
                                       "estimated cost is higher.")
    refresh_cache: bool = Field(False, description="Ask again even for batches answered before.")
    near_duplicate_jaccard: float = Field(
        NEAR_DUPLICATE_JACCARD, gt=0, le=1, description="A record whose prompt's word set has at least this "
        "Jaccard similarity with a kept one is dropped as a near duplicate (as tasks.data.dedupe does).")

    @model_validator(mode="after")
    def check_endpoint(self) -> "SynthesisConfig":
        if self.endpoint is not None:
            slug, _, name = self.endpoint.partition("/")
            if slug not in BLOCK_SLUGS or not name:
                raise ValueError(f"endpoint must be '<block-type>/<name>' with block type one of {BLOCK_SLUGS}, "
                                 f"got {self.endpoint!r}")
        return self

    @model_validator(mode="after")
    def check_prompt_template(self) -> "SynthesisConfig":
        if self.prompt_template is not None:
            read_template(self.prompt_template)
        return self


def read_template(path: str | None) -> str:
    """The prompt template text (built-in when path is None).

    Raises:
        ValueError: the file is missing, or uses a placeholder other than $count, $anchors, $focus.
    """
    if path is None:
        return PROMPT_TEMPLATE
    file = repo_path(path)
    if not file.is_file():
        raise ValueError(f"prompt_template {file}: file not found")
    text = file.read_text()
    template = Template(text)
    names = set(template.get_identifiers())
    if not template.is_valid() or "count" not in names or names - TEMPLATE_FIELDS:
        raise ValueError(f"prompt_template {file}: needs $count and may use only {sorted(TEMPLATE_FIELDS)} "
                         f"(write $$ for a literal $), found {sorted(names)}")
    return text


@dataclass(frozen=True)
class BatchSpec:
    """One request: which records (first = index of the first record) and the exact prompt."""

    index: int
    first: int
    count: int
    seed: int
    prompt: str


@task(name="plan-batches")
def plan_batches(cfg: SynthesisConfig) -> list[BatchSpec]:
    """Split n records into batches; each batch rotates the domain it focuses on (diversity)."""
    template = Template(read_template(cfg.prompt_template))
    anchors = "\n".join(f"- {a}: {gloss}" for a, gloss in ANCHOR_GLOSSES.items())
    specs = []
    for index in range(math.ceil(cfg.n / cfg.batch_size)):
        first = index * cfg.batch_size
        count = min(cfg.batch_size, cfg.n - first)
        prompt = template.substitute(count=count, anchors=anchors, focus=FOCUS_DOMAINS[index % len(FOCUS_DOMAINS)])
        specs.append(BatchSpec(index=index, first=first, count=count,
                               seed=(cfg.seed * 100_003 + index) % 2**31, prompt=prompt))
    return specs


@task(name="load-endpoint", cache_policy=NO_CACHE)  # no input/result hashing near a key
def load_endpoint(name: str | None, given: LLMEndpoint | None = None) -> LLMEndpoint:
    """The endpoint Block passed in, or the one saved under `name` ('<block-type>/<document>').

    Raises:
        ValueError: neither is given, or no such Block document exists.
    """
    from prefect.blocks.core import Block

    import blocks.llm  # noqa: F401  (registers the block types so Block.load can resolve their slugs)

    if given is not None:
        return given
    if name is None:
        raise ValueError("no endpoint: set config.endpoint to a saved Block or pass an endpoint Block")
    return Block.load(name)


@task(name="estimate-cost", cache_policy=NO_CACHE)
def estimate_cost(endpoint: LLMEndpoint, specs: list[BatchSpec], cfg: SynthesisConfig) -> dict:
    """Tokens and USD this run will cost at most once every batch is asked (cached batches cost nothing).

    Raises:
        ValueError: the estimate exceeds `cfg.max_cost_usd`.
    """
    prompt_tokens = sum(math.ceil(len(s.prompt) / CHARS_PER_TOKEN) for s in specs)
    completion_tokens = sum(min(cfg.max_tokens, s.count * TOKENS_PER_RECORD) for s in specs)
    usd = (prompt_tokens * endpoint.input_cost_per_mtok + completion_tokens * endpoint.output_cost_per_mtok) / 1e6
    ident = endpoint_identity(endpoint)
    estimate = {"batches": len(specs), "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "usd": round(usd, 4), "input_cost_per_mtok": endpoint.input_cost_per_mtok,
                "output_cost_per_mtok": endpoint.output_cost_per_mtok}
    get_run_logger().info(
        "Cost estimate for %d records from %s/%s: %d requests, ~%d prompt + ~%d completion tokens, ~$%.4f",
        cfg.n, ident["provider"], ident["model"], len(specs), prompt_tokens, completion_tokens, usd)
    if cfg.max_cost_usd is not None and usd > cfg.max_cost_usd:
        raise ValueError(f"estimated cost ${usd:.4f} exceeds max_cost_usd ${cfg.max_cost_usd:.4f}: "
                         "lower n or raise the limit")
    return estimate


def batch_cache_key(context, parameters) -> str:
    """Endpoint identity (never its key), the exact prompt, the batch and the sampling settings."""
    spec: BatchSpec = parameters["spec"]
    cfg: SynthesisConfig = parameters["cfg"]
    key = json.dumps({"v": CACHE_VERSION, "endpoint": endpoint_identity(parameters["endpoint"]),
                      "prompt": hashlib.sha256(spec.prompt.encode()).hexdigest(), "index": spec.index,
                      "count": spec.count, "seed": spec.seed, "temperature": cfg.temperature,
                      "max_tokens": cfg.max_tokens}, sort_keys=True)
    return "synth-batch-" + hashlib.sha256(key.encode()).hexdigest()


def _retry_if_transient(task, task_run, state) -> bool:
    """Prefect retries only what another attempt can fix: rate limits, server errors, timeouts."""
    try:
        state.result()
    except APIRequestError as exc:
        return exc.transient
    except Exception:
        return False
    return False


# Retry history of a task run across its attempts (Prefect re-calls the function for each attempt in
# this process); read back into the batch answer or the final error.
_RETRIES: dict = {}
_RETRIES_LOCK = threading.Lock()


@task(name="request-batch", task_run_name="request-batch-{spec.index}", cache_key_fn=batch_cache_key,
      persist_result=True, result_serializer="json", retry_condition_fn=_retry_if_transient)
def request_batch(spec: BatchSpec, endpoint: LLMEndpoint, cfg: SynthesisConfig, trace_name: str | None = None) -> dict:
    """Ask for one batch. Retries (set with `.with_options(retries=...)`) are Prefect task-run retries.
    Each attempt is a Langfuse generation in the trace of `trace_name` (the output folder's name) when
    tracing is on.

    Raises:
        APIRequestError: the request failed; `transient` failures are retried while retries are left.
    """
    ctx = TaskRunContext.get()
    run_id, attempt, retries = ctx.task_run.id, ctx.task_run.run_count, ctx.task.retries
    with _RETRIES_LOCK:
        history = _RETRIES.setdefault(run_id, [])
    will_retry = False
    messages = [{"role": "user", "content": spec.prompt}]
    generation = tracing.start_generation(
        "synthesize", endpoint.model, messages, run_name=trace_name or "synthesize",
        model_parameters={"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "seed": spec.seed},
        metadata={"batch": spec.index, "records": spec.count, "attempt": attempt})
    try:
        answer = complete(endpoint, messages, max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=spec.seed)
        generation.end(output=answer.text, usage={"input": answer.prompt_tokens, "output": answer.completion_tokens},
                       metadata={"finish_reason": answer.finish_reason, "latency_s": round(answer.latency_s, 3)})
    except APIRequestError as exc:
        generation.end(error=str(exc))   # the message is redacted (tasks/llm_client.py)
        done = attempt - 1  # retries already made before this attempt
        delay = backoff_delay(done + 1, exc.retry_after, cfg.backoff_base_s, cfg.backoff_max_s, cfg.backoff_jitter)
        will_retry = exc.transient and done < retries and delay <= cfg.max_wait_s
        if will_retry:
            history.append({"attempt": attempt, "cause": exc.kind, "retry_after": exc.retry_after,
                            "waited_s": round(delay, 2)})
            get_run_logger().warning(
                "batch %d: %s%s; retry %d/%d in %.1fs", spec.index, exc,
                f" (Retry-After {exc.retry_after:g}s)" if exc.retry_after is not None else "", done + 1, retries,
                delay)
            time.sleep(delay)  # waited here, so Prefect retries at once (its delay cannot read Retry-After)
            raise
        suffix = ("not retried" if not exc.transient else f"after {done} retries" if done >= retries
                  else f"Retry-After {exc.retry_after:g}s over max_wait_s")
        final = APIRequestError(f"{exc} ({suffix})", kind=exc.kind, status=exc.status, transient=False)
        final.summary, final.history = f"{exc.kind} {suffix}", history
        raise final from None
    finally:
        if not will_retry:
            with _RETRIES_LOCK:
                _RETRIES.pop(run_id, None)
    return {"index": spec.index, "text": answer.text, "finish_reason": answer.finish_reason,
            "prompt_tokens": answer.prompt_tokens or 0, "completion_tokens": answer.completion_tokens or 0,
            "retries": history}


def track_batches(futures: list, specs: list[BatchSpec], run_name: str) -> None:
    """Wait for the batches, moving a Prefect progress artifact (`synthesis-<run>`) as each one ends:
    batches done, records asked for so far, batches failed."""
    bar = ProgressBar("synthesis", run_name, len(futures), f"synthesis: 0/{len(futures)} batches")
    spec_of = {id(f): spec for f, spec in zip(futures, specs)}
    done = failed = records = 0
    for future in as_completed(futures):
        future.wait()
        done += 1
        failed += not future.state.is_completed()
        records += spec_of[id(future)].count
        bar.update(done, f"synthesis: {done}/{len(futures)} batches, {records} records asked for"
                         + (f", {failed} batches failed" if failed else ""))
    bar.close()


def request_all(specs: list[BatchSpec], endpoint: LLMEndpoint, cfg: SynthesisConfig,
                trace_name: str | None = None) -> list[dict]:
    """Run one `request-batch` task per spec, `cfg.concurrency` at a time; one outcome per spec (each
    request traced under `trace_name` when Langfuse is configured).

    A batch that failed after its retries becomes an outcome with `error`; any other exception is a bug
    and is raised.
    """
    from prefect.task_runners import ThreadPoolTaskRunner

    requester = request_batch.with_options(retries=cfg.max_retries, retry_delay_seconds=0,
                                           refresh_cache=cfg.refresh_cache)
    with ThreadPoolTaskRunner(max_workers=cfg.concurrency) as runner:
        futures = [runner.submit(requester, {"spec": s, "endpoint": endpoint, "cfg": cfg, "trace_name": trace_name})
                   for s in specs]
        track_batches(futures, specs, trace_name or "synthesize")
        wait(futures)   # every future's final state recorded before it is read below
    tracing.flush()
    outcomes = []
    for spec, state in zip(specs, (f.state for f in futures)):
        if state.is_completed():
            outcomes.append({**state.result(), "cached": state.name == "Cached"})
            continue
        exc = state.result(raise_on_failure=False)
        if not isinstance(exc, APIRequestError):
            raise RuntimeError(f"batch {spec.index} crashed: {state.message}")
        outcomes.append({"index": spec.index, "error": getattr(exc, "summary", exc.kind),
                         "retries": getattr(exc, "history", []), "prompt_tokens": 0, "completion_tokens": 0,
                         "cached": False})
    return outcomes
