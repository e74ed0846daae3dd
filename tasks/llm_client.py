"""The one chat-completions path of the project, over the LLM endpoint Blocks (OpenAI, Azure OpenAI, Together,
DeepSeek, Anthropic's OpenAI-compatible endpoint, llama.cpp's server, any OpenAI-compatible server).
Synthesis (tasks/synth/llm.py) and evaluation (tasks/eval/runners.py) both call `complete`.

Retrying is a parameter, a `RetryPolicy`: transient failures (408/409/429/5xx, timeouts, connection
errors) wait for max(Retry-After, exponential backoff) plus jitter. Evaluation retries inside the call
(`EVAL_RETRIES`); synthesis passes `NO_RETRY` and retries whole Prefect task runs with the same
backoff, so each retry is counted and shows up in Prefect. The openai client's own retries are off.

Errors come back as `APIRequestError`, whose message is built here from the status code and the
server's error text with the API key redacted (tasks/redact.py); the openai exception (which carries the request, its
headers and the raw body) is never chained, so no traceback or log line can echo the key.
"""

from __future__ import annotations

import contextlib
import email.utils
import random
import time
from dataclasses import dataclass

from blocks.llm import AzureOpenAIEndpoint, OpenAICompatibleEndpoint
from tasks.redact import redact

LLMEndpoint = OpenAICompatibleEndpoint | AzureOpenAIEndpoint

# Status codes worth retrying: request timeout, lock conflict, rate limit, server errors.
_TRANSIENT_STATUS = {408, 409, 429}


class APIRequestError(RuntimeError):
    """A failed chat request. `transient` says whether retrying can help; the message holds no secret."""

    def __init__(self, message: str = "request failed", *, kind: str = "error", status: int | None = None,
                 retry_after: float | None = None, transient: bool = False):
        super().__init__(message)
        self.kind = kind                # short, stable category used in reports: "HTTP 429", "timeout", ...
        self.status = status
        self.retry_after = retry_after  # seconds the server asked us to wait, if it said
        self.transient = transient


@dataclass
class Completion:
    """One model answer, from any runner (an endpoint through `complete`, or transformers)."""

    text: str
    latency_s: float = 0.0
    prompt_tokens: int | None = None      # None: the server did not report usage
    completion_tokens: int | None = None
    tool_calls: list[dict] | None = None  # native tool calls: [{"name", "arguments" (JSON text)}]
    finish_reason: str | None = None
    error: str | None = None              # the call failed (a runner records it and carries on)

    def as_call(self) -> dict:
        return {"latency_s": self.latency_s, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "error": self.error}


def provider_of(endpoint: LLMEndpoint) -> str:
    return "azure" if isinstance(endpoint, AzureOpenAIEndpoint) else endpoint.provider


def endpoint_identity(endpoint: LLMEndpoint) -> dict:
    """What decides the answers of an endpoint, without its key: part of cache keys and reports."""
    if isinstance(endpoint, AzureOpenAIEndpoint):
        return {"provider": "azure", "base_url": endpoint.endpoint.rstrip("/"), "model": endpoint.deployment,
                "api_version": endpoint.api_version}
    return {"provider": endpoint.provider, "base_url": endpoint.resolved_base_url().rstrip("/"),
            "model": endpoint.model}


def parse_retry_after(headers) -> float | None:
    """Seconds from `retry-after-ms` (OpenAI, Azure) or `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / divisor)
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


def backoff_delay(retry: int, retry_after: float | None, base_s: float, max_s: float, jitter: float,
                  rng: random.Random | None = None) -> float:
    """Exponential backoff with jitter, never shorter than the server's Retry-After.

    `retry` counts from 1. The jitter spreads concurrent clients that were throttled together.
    """
    rng = rng or random
    backoff = min(max_s, base_s * 2 ** (retry - 1))
    return max(retry_after or 0.0, backoff) + rng.uniform(0, jitter * backoff)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before retrying a failed request.

    Only transient failures are retried, at most `retries` times; the wait is exponential backoff from
    `base_s` (capped at `max_s`) plus up to `jitter` x backoff, never shorter than the server's
    Retry-After. A Retry-After longer than `max_wait_s` is not waited for.
    """

    retries: int = 0
    base_s: float = 1.0
    max_s: float = 60.0
    jitter: float = 0.5
    max_wait_s: float = 300.0

    def delay(self, retry: int, error: APIRequestError, rng: random.Random | None = None) -> float | None:
        """Seconds to wait before retry number `retry` (from 1), or None when the error is not retried."""
        if not error.transient or retry > self.retries:
            return None
        wait = backoff_delay(retry, error.retry_after, self.base_s, self.max_s, self.jitter, rng)
        return wait if wait <= self.max_wait_s else None


NO_RETRY = RetryPolicy(retries=0)
# Evaluation's calls: what the openai client's own retries did before (3 retries from 0.5 s, at most 8 s
# apart, a Retry-After of up to a minute honoured).
EVAL_RETRIES = RetryPolicy(retries=3, base_s=0.5, max_s=8.0, jitter=0.25, max_wait_s=60.0)


def _error_text(body: object) -> str:
    """The server's own error message, if it sent a JSON one (OpenAI-style or plain)."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner.get("type") or "")
        return str(inner)
    return str(body or "")


def to_request_error(exc: Exception, secret: str) -> APIRequestError:
    """Translate an openai exception into an `APIRequestError` that cannot carry the key."""
    import openai

    if isinstance(exc, openai.APITimeoutError):
        return APIRequestError("request timed out", kind="timeout", transient=True)
    if isinstance(exc, openai.APIConnectionError):
        return APIRequestError("connection error", kind="connection error", transient=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        detail = redact(_error_text(exc.body), secret)[:200]
        return APIRequestError(f"HTTP {status}: {detail}" if detail else f"HTTP {status}", kind=f"HTTP {status}",
                               status=status, retry_after=parse_retry_after(exc.response.headers),
                               transient=status in _TRANSIENT_STATUS or status >= 500)
    if isinstance(exc, openai.APIResponseValidationError):
        return APIRequestError("response did not match the chat-completions schema", kind="bad response",
                               transient=True)
    return APIRequestError(f"{type(exc).__name__}", kind=type(exc).__name__)


def complete(endpoint: LLMEndpoint, messages: list[dict], *, max_tokens: int, temperature: float,
             seed: int | None = None, response_format: dict | None = None, tools: list[dict] | None = None,
             extra_body: dict | None = None, retry: RetryPolicy = NO_RETRY, client=None) -> Completion:
    """One chat completion, retried as `retry` says; `latency_s` covers every attempt.

    Args:
        response_format, tools: OpenAI's structured-output and tool-calling fields, sent when given.
        extra_body: server-specific JSON fields merged into the body (llama.cpp's sampler settings).
        client: an `endpoint.client()` to reuse across calls (connection pooling); one per call otherwise.

    Raises:
        APIRequestError: the last failure (HTTP, timeout, connection, a response without a choice).
    """
    began, retries = time.perf_counter(), 0
    while True:
        try:
            completion = _complete_once(endpoint, messages, client, max_tokens=max_tokens, temperature=temperature,
                                        seed=seed, response_format=response_format, tools=tools,
                                        extra_body=extra_body)
            break
        except APIRequestError as exc:
            retries += 1
            wait = retry.delay(retries, exc)
            if wait is None:
                raise
            time.sleep(wait)
    completion.latency_s = time.perf_counter() - began
    return completion


def _complete_once(endpoint: LLMEndpoint, messages: list[dict], client, *, max_tokens: int, temperature: float,
                   seed: int | None, response_format: dict | None, tools: list[dict] | None,
                   extra_body: dict | None) -> Completion:
    import openai

    secret = endpoint.api_key.get_secret_value()
    provider = provider_of(endpoint)
    # OpenAI's and Azure's reasoning models reject `max_tokens`; the other providers document `max_tokens`.
    body = {"model": endpoint.model, "messages": messages, "temperature": temperature, "seed": seed,
            "max_completion_tokens" if provider in ("openai", "azure") else "max_tokens": max_tokens}
    if response_format is not None:
        body["response_format"] = response_format
    if tools:
        body["tools"] = [{"type": "function", "function": t} for t in tools]
    if extra_body:
        body["extra_body"] = dict(extra_body)
    error = None
    with contextlib.nullcontext(client) if client is not None else endpoint.client(max_retries=0) as session:
        try:
            response = session.chat.completions.create(**body)
        except openai.OpenAIError as exc:
            error = to_request_error(exc, secret)
    if error is not None:
        raise error  # raised outside the except block: the openai exception is not attached as context
    if not response.choices:
        raise APIRequestError("response has no choices", kind="bad response", transient=True)
    choice = response.choices[0]
    usage = response.usage
    calls = [{"name": c.function.name, "arguments": c.function.arguments}
             for c in (choice.message.tool_calls or [])] or None
    return Completion(text=choice.message.content or "",
                      prompt_tokens=usage.prompt_tokens if usage else None,
                      completion_tokens=usage.completion_tokens if usage else None,
                      tool_calls=calls, finish_reason=choice.finish_reason)
