"""The one redaction of secrets in text that came back from a server (error bodies, exception messages).

Some servers repeat the credentials they were given (OpenAI-style "Incorrect API key provided: <key>", a
proxy echoing the Authorization header, a Hub error quoting the token). Every error text from an LLM
endpoint (tasks/llm_client.py, evaluation and synthesis alike) and from the Hub (tasks/release) passes
through `redact` before it can reach an exception, a log line, a Prefect state, a file or a trace.
"""

from __future__ import annotations

from urllib.parse import quote

MASK = "***"


def redact(text: str, *secrets: str | None) -> str:
    """`text` with every secret (as given, and URL-encoded) replaced by '***'; secrets shorter than 4
    characters are ignored (masking 'a' would shred the text and hide nothing)."""
    for secret in secrets:
        if not secret or len(secret) < 4:
            continue
        for form in {secret, quote(secret, safe="")}:
            text = text.replace(form, MASK)
    return text
