"""Langfuse tracing (SDK v5): every model call as a generation, every metric as a score, one trace per run.

Off unless keys are configured: `LANGFUSE_PUBLIC_KEY` and `LANGFUSE_SECRET_KEY` in the environment (with
`LANGFUSE_BASE_URL`), or a saved `LangfuseCredentials` block passed to `configure()`. Without keys no Langfuse
client is built, nothing is sent and every function here is a cheap no-op.

Every observation carries the Prefect flow run it came from (`prefect_flow_run_id`, `prefect_flow_run_url`,
as observation and trace metadata), so a bad score leads back to its run. The trace id is derived from the
run's name, so every task of a run (and a helper in another process) lands
in the same trace without passing span objects around; the parent is passed explicitly because generations
run in worker threads, where OpenTelemetry's implicit context does not follow.

API for other flows (synthesis uses it):

    from tasks import tracing
    with tracing.traced_generation("synthesize", model="gpt-4o-mini", input=messages, run_name=run_dir.name) as gen:
        reply = client.chat.completions.create(...)
        gen.end(output=reply.choices[0].message.content,
                usage={"input": reply.usage.prompt_tokens, "output": reply.usage.completion_tokens})
    tracing.score(run_name=run_dir.name, name="rows_accepted", value=0.93)
    tracing.flush()
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

log = logging.getLogger("slipway.tracing")

_lock = threading.Lock()
_client = None          # the Langfuse client, or None when tracing is off
_configured = False


def _build_client(public_key: str, secret_key: str, base_url: str | None, span_exporter=None):
    from langfuse import Langfuse
    from opentelemetry.sdk.trace import TracerProvider

    # A private TracerProvider: Langfuse spans never mix with other OpenTelemetry users in the process.
    return Langfuse(public_key=public_key, secret_key=secret_key, base_url=base_url,
                    tracer_provider=TracerProvider(), span_exporter=span_exporter)


def configure(block=None, span_exporter=None) -> bool:
    """(Re)configure tracing from a `LangfuseCredentials` block, else from the environment.

    Returns:
        True when tracing is on.
    """
    global _client, _configured
    with _lock:
        if _client is not None:
            _client.flush()
        _client = None
        if block is not None:
            _client = _build_client(block.public_key, block.secret_key.get_secret_value(), block.base_url,
                                    span_exporter)
        else:
            pk, sk = os.environ.get("LANGFUSE_PUBLIC_KEY"), os.environ.get("LANGFUSE_SECRET_KEY")
            enabled = os.environ.get("LANGFUSE_TRACING_ENABLED", "true").lower() != "false"
            if pk and sk and enabled:
                _client = _build_client(pk, sk, os.environ.get("LANGFUSE_BASE_URL") or os.environ.get(
                    "LANGFUSE_HOST"), span_exporter)
        _configured = True
        return _client is not None


def client():
    """The Langfuse client, or None when tracing is off (configured from the environment on first use)."""
    if not _configured:
        configure()
    return _client


def enabled() -> bool:
    return client() is not None


def reset() -> None:
    """Forget the client and Langfuse's per-key singletons (tests; a process that changes keys)."""
    global _client, _configured
    with _lock:
        if _client is not None:
            _client.flush()
            from langfuse._client.resource_manager import LangfuseResourceManager
            LangfuseResourceManager.reset()
        _client, _configured = None, False


def trace_id_for(run_name: str) -> str:
    """Deterministic 32-hex trace id for a run: every task of the run groups under it."""
    from langfuse import Langfuse

    return Langfuse.create_trace_id(seed=f"slipway:{run_name}")


def prefect_run_link() -> dict:
    """The Prefect flow run this process works for, as trace metadata: its id and its UI link (empty outside
    a flow run). Read where the observation starts; worker threads get it from their parent `SpanRef`."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    run_id = flow_run.id
    if not run_id:
        return {}
    ui = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api") or None
    link = {"prefect_flow_run_id": str(run_id), "prefect_flow_run_name": flow_run.name}
    if ui:
        link["prefect_flow_run_url"] = f"{ui.rstrip('/')}/runs/flow-run/{run_id}"
    return link


@contextlib.contextmanager
def _trace_attributes(link: dict) -> Iterator[None]:
    """Trace-level metadata (Langfuse's propagated attributes) on the observations started inside."""
    if not link:
        yield
        return
    from langfuse import propagate_attributes

    with propagate_attributes(metadata={k: str(v)[:200] for k, v in link.items()}):
        yield


@dataclass
class SpanRef:
    """Where new observations attach: a trace and, optionally, a parent observation; `link` is the Prefect
    flow run (prefect_run_link) that children started in other threads inherit."""

    trace_id: str | None = None
    span_id: str | None = None
    link: dict = field(default_factory=dict)

    def context(self) -> dict:
        ctx = {"trace_id": self.trace_id}
        if self.span_id:
            ctx["parent_span_id"] = self.span_id
        return ctx


@contextlib.contextmanager
def span(run_name: str, name: str, input: Any = None, metadata: dict | None = None,
         parent: SpanRef | None = None) -> Iterator[SpanRef]:
    """A span (e.g. one model's evaluation) in the run's trace; yields where its children attach."""
    lf = client()
    if lf is None:
        yield SpanRef()
        return
    ref = parent or SpanRef(trace_id_for(run_name))
    link = prefect_run_link() or ref.link
    with _trace_attributes(link):
        obs = lf.start_observation(trace_context=ref.context(), name=name, as_type="span", input=input,
                                   metadata={**(metadata or {}), **link})
    try:
        yield SpanRef(ref.trace_id, obs.id, link)
    finally:
        obs.end()


@dataclass
class Generation:
    """One model call being traced; `end()` records its output and usage (idempotent)."""

    obs: Any = None
    trace_id: str | None = None
    _ended: bool = field(default=False, repr=False)

    @property
    def id(self) -> str | None:
        return self.obs.id if self.obs is not None else None

    def end(self, output: Any = None, usage: dict | None = None, cost: dict | None = None,
            metadata: dict | None = None, error: str | None = None) -> None:
        if self.obs is None or self._ended:
            return
        self._ended = True
        usage = {k: int(v) for k, v in (usage or {}).items() if v is not None}
        if usage and "total" not in usage:
            usage["total"] = sum(usage.values())
        self.obs.update(output=output, usage_details=usage or None, cost_details=cost, metadata=metadata,
                        level="ERROR" if error else None, status_message=error)
        self.obs.end()


def start_generation(name: str, model: str, input: Any, parent: SpanRef | None = None,
                     run_name: str | None = None, model_parameters: dict | None = None,
                     metadata: dict | None = None) -> Generation:
    """Open a generation now (its latency runs until `end()`); a no-op handle when tracing is off."""
    lf = client()
    if lf is None:
        return Generation()
    ref = parent if parent is not None and parent.trace_id else SpanRef(trace_id_for(run_name or "adhoc"))
    link = (parent.link if parent is not None else {}) or prefect_run_link()
    with _trace_attributes(link):
        obs = lf.start_observation(trace_context=ref.context(), name=name, as_type="generation", model=model,
                                   input=input, model_parameters=model_parameters,
                                   metadata={**(metadata or {}), **link})
    return Generation(obs, ref.trace_id)


@contextlib.contextmanager
def traced_generation(name: str, model: str, input: Any, run_name: str | None = None,
                      parent: SpanRef | None = None, model_parameters: dict | None = None,
                      metadata: dict | None = None) -> Iterator[Generation]:
    """Context-manager form of `start_generation`; an exception marks the generation as an error."""
    gen = start_generation(name, model, input, parent, run_name, model_parameters, metadata)
    try:
        yield gen
    except BaseException as exc:
        gen.end(error=f"{type(exc).__name__}: {exc}")
        raise
    gen.end()


def score(name: str, value: float | str, run_name: str | None = None, trace_id: str | None = None,
          observation_id: str | None = None, comment: str | None = None) -> None:
    """Attach a score to a run's trace, or to one observation of it (numeric, or categorical for text)."""
    lf = client()
    if lf is None:
        return
    trace_id = trace_id or trace_id_for(run_name or "adhoc")
    lf.create_score(name=name, value=value, trace_id=trace_id, observation_id=observation_id, comment=comment,
                    data_type="CATEGORICAL" if isinstance(value, str) else "NUMERIC")


def flush() -> None:
    """Send what is buffered; call at the end of each flow (the SDK batches spans and scores)."""
    lf = client()
    if lf is not None:
        lf.flush()
