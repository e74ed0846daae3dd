"""Names that become folder names, model names and Prefect keys: slugs, checked once, with one message.

A recipe name, a run name and a release name (an Ollama model, a Hub repo's name) end up in paths, URLs
and command lines. Accepting only slugs — lowercase letters, digits, '.', '_' and '-', starting with a
letter or digit, at most 63 characters — rules out `../../x`, absolute paths, spaces and shell characters
in one rule. Prefect artifact keys are stricter (lowercase letters, digits and dashes only), so they are
derived from names with `artifact_key`, never used raw.
"""

from __future__ import annotations

import re

SLUG_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
_SLUG = re.compile(SLUG_PATTERN)
# Hugging Face repo ids: <owner>/<name>; the Hub allows upper case, the rest is the slug rule.
_HUB_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class InvalidName(ValueError):
    """A name that is not a slug (the message says which rule, once)."""


def slug_problem(value: str) -> str | None:
    """None when `value` is a slug, else why not (the same sentence everywhere)."""
    if isinstance(value, str) and _SLUG.match(value) and ".." not in value:
        return None
    return (f"{value!r} is not a valid name: use 1-63 lowercase letters, digits, '.', '_' or '-', starting "
            f"with a letter or digit (no '/', no '..')")


def check_slug(kind: str, value: str) -> str:
    """Return `value` when it is a slug.

    Raises:
        InvalidName: '<kind> <value> is not a valid name: ...'.
    """
    problem = slug_problem(value)
    if problem:
        raise InvalidName(f"{kind} {problem}")
    return value


def check_hub_repo(kind: str, value: str) -> str:
    """A Hub repo id `<owner>/<name>`, each part a Hub name (no '..', no further '/').

    Raises:
        InvalidName: naming the field and the rule.
    """
    parts = value.split("/") if isinstance(value, str) else []
    if len(parts) == 2 and all(_HUB_PART.match(p) and ".." not in p for p in parts):
        return value
    raise InvalidName(f"{kind} {value!r} is not a valid Hub repo id: '<owner>/<name>', each 1-96 letters, "
                     f"digits, '.', '_' or '-', starting with a letter or digit")


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key from names: lowercase letters, digits and dashes only (Prefect's rule), so
    `report` + `qwen2.5-7b` gives `report-qwen2-5-7b`."""
    key = re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower()).strip("-")
    return key or "slipway"
