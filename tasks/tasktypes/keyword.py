"""Keyword verification (seed 003's verify step): the answer must mention every expected keyword.

Metrics: share of keywords present, case-insensitive; all present (primary). No breakdown.
"""

from __future__ import annotations

from tasks.tasktypes.base import TaskType


def check_row(row) -> None:
    if not row.keywords or not all(isinstance(k, str) and k.strip() for k in row.keywords):
        raise ValueError("keyword: 'keywords' must be a non-empty list of non-empty strings")
    if row.expected is not None and not isinstance(row.expected, str):
        raise ValueError("keyword: 'expected' (a reference answer, optional) must be text")


def score(row: dict, answer: str, tool_calls=None, count_tokens=None) -> dict:
    text = answer.lower()
    hits = [k for k in row["keywords"] if k.lower() in text]
    return {"keyword_recall": len(hits) / len(row["keywords"]), "keyword_pass": float(len(hits) == len(row["keywords"])),
            "missing": [k for k in row["keywords"] if k not in hits], "group": None, "error": None}


KEYWORD = TaskType(
    name="keyword",
    metrics=(("keyword_recall", "keyword recall"), ("keyword_pass", "all keywords")),
    primary_metric="keyword_pass",
    check_row=check_row,
    gold_answer=lambda row: row.expected,
    score=score,
)
