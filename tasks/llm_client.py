"""One chat-completions interface over the LLM endpoint Blocks (OpenAI, Azure OpenAI, Together, DeepSeek,
Anthropic's OpenAI-compatible endpoint, any local OpenAI-compatible server).

Every call goes through the official `openai` client with `max_retries=0`: retrying is the caller's job
(tasks/synth/llm.py), so each retry can honour `Retry-After`, be counted and show up in Prefect.
Errors come back as `APIRequestError`, whose message is built here from the status code and the
server's error text with the API key redacted; the openai exception (which carries the request, its
headers and the raw body) is never chained, so no traceback or log line can echo the key.
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

from blocks.llm import AzureOpenAIEndpoint, OpenAICompatibleEndpoint

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


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None


def provider_of(endpoint: LLMEndpoint) -> str:
    return "azure" if isinstance(endpoint, AzureOpenAIEndpoint) else endpoint.provider


def endpoint_identity(endpoint: LLMEndpoint) -> dict:
    """What decides the answers of an endpoint, without its key: part of cache keys and reports."""
    if isinstance(endpoint, AzureOpenAIEndpoint):
        return {"provider": "azure", "base_url": endpoint.endpoint.rstrip("/"), "model": endpoint.deployment,
                "api_version": endpoint.api_version}
    return {"provider": endpoint.provider, "base_url": endpoint.resolved_base_url().rstrip("/"),
            "model": endpoint.model}


def redact(text: str, secret: str) -> str:
    """Remove the key from text a server sent back (some servers echo the presented key on 401)."""
    return text.replace(secret, "***") if secret and len(secret) >= 4 else text


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
             seed: int | None = None) -> Completion:
    """One chat completion, no retries.

    Raises:
        APIRequestError: on any HTTP, timeout or connection failure, or a response without a choice.
    """
    import openai

    secret = endpoint.api_key.get_secret_value()
    provider = provider_of(endpoint)
    # OpenAI's and Azure's reasoning models reject `max_tokens`; the other providers document `max_tokens`.
    limit = {"max_completion_tokens" if provider in ("openai", "azure") else "max_tokens": max_tokens}
    error = None
    with endpoint.client(max_retries=0) as client:
        try:
            response = client.chat.completions.create(model=endpoint.model, messages=messages,
                                                      temperature=temperature, seed=seed, **limit)
        except openai.OpenAIError as exc:
            error = to_request_error(exc, secret)
    if error is not None:
        raise error  # raised outside the except block: the openai exception is not attached as context
    if not response.choices:
        raise APIRequestError("response has no choices", kind="bad response", transient=True)
    choice = response.choices[0]
    usage = response.usage
    return Completion(text=choice.message.content or "",
                      prompt_tokens=usage.prompt_tokens if usage else 0,
                      completion_tokens=usage.completion_tokens if usage else 0,
                      finish_reason=choice.finish_reason)
