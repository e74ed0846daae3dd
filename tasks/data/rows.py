"""What data preparation, deduplication and the format converters share: the validating JSONL reader,
the `Example` a source row becomes, and the normalised prompt key that dedupe and leakage checks compare.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Example:
    """One validated source row."""

    prompt: str
    answer: str
    anchor: str
    line: int
    row: object = None   # the validated EvalRow, for data.format 'eval'
    source: str = ""     # provenance: the source file's name, or "templates" for synthesized rows


def normalise(text: str) -> str:
    """Case- and whitespace-insensitive key used for dedupe and leakage checks."""
    return re.sub(r"\s+", " ", text.strip().lower())


def read_json_lines(path: Path, error: type[ValueError] = ValueError) -> Iterator[tuple[int, object, str]]:
    """(line number, parsed JSON, '<file>:<line>') for every non-blank line of a user's JSONL file.

    Args:
        path: the file.
        error: the exception the caller's own rules raise, so one caller sees one error type.

    Raises:
        error: '<file>:<line>: not valid JSON (<reason> at column <n>)' at the first line that is not JSON.
    """
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
            yield line_no, obj, where
