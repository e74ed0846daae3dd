"""What a task type is: everything evaluation, data preparation and the reports need to know about one kind
of request. One module per type fills in a `TaskType`; tasks/tasktypes/__init__.py registers them.

Light on purpose: no Prefect, no runners, no model code, so the training worker and data preparation can
import the registry. Row arguments are duck-typed: `EvalRow` (tasks/data/evalfile.py) for validation and
gold answers, the chat-row dict (`to_chat_row`) for scoring.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

from tasks.markdown import pct

TokenCounter = Callable[[str], int]
# scorer(chat_row, answer, tool_calls, count_tokens) -> the row's scores: one float per metric key, plus
# "group" (what the row's breakdown counts it under, or None) and "error" (why the answer failed, or None).
Scorer = Callable[[dict, str, list[dict] | None, TokenCounter | None], dict]


def _nothing(*_args) -> None:
    return None


def _no_fields(*_args) -> dict:
    return {}


def _no_lines(*_args) -> list[str]:
    return []


@dataclass(frozen=True)
class TaskType:
    """One task type. Only `name`, `metrics`, `primary_metric`, `check_row`, `gold_answer` and `score` are
    required; every other hook defaults to "nothing special"."""

    name: str
    metrics: tuple[tuple[str, str], ...]          # row scores averaged per model: (key, report column), in order
    primary_metric: str                           # what gates and the Fledgling decision compare by default
    check_row: Callable[[Any], None]              # eval-file row rules; raises ValueError naming the field
    gold_answer: Callable[[Any], str | None]      # the assistant text a perfect model writes (training target)
    score: Scorer
    instruction: Callable[[Any], str | None] = _nothing     # appended to the system prompt (schema, tool list)
    chat_fields: Callable[[Any], dict] = _no_fields          # extra chat-row fields the scorer or splits need
    request_fields: Callable[[dict], dict] = _no_fields      # Request(json_schema=..., tools=...) for native APIs
    split_group: Callable[[Any], str] = lambda row: ""       # stratification key of eval-format training rows
    breakdown: tuple[str, str] | None = None      # (summary key, what a group is): ("per_anchor", "anchor")
    group_scores: Callable[[dict], dict] | None = None       # row -> {group: value}; default {group: primary}
    summarize: Callable[[list[dict]], dict] = _no_fields     # extra summary fields from all rows' scores
    report_lines: Callable[[dict], list[str]] = _no_lines    # extra report section from {label: summary}
    counts_tokens: bool = False                   # scorer wants the SLM tokenizer's token counter
    data_formats: tuple[str, ...] = ("eval",)     # recipe data.format values that can train this task
    # The GBNF grammar (llama.cpp) of the answer format, for deploy.constrain_output; None: the task has none.
    grammar: Callable[[], str] | None = None

    @property
    def metric_keys(self) -> list[str]:
        return [key for key, _ in self.metrics]

    def groups_of(self, scores: dict) -> dict:
        """The row's contribution to the per-group breakdown."""
        if self.group_scores is not None:
            return self.group_scores(scores)
        return {scores["group"]: scores[self.primary_metric]}

    def report_sections(self, results: dict[str, dict]) -> list[str]:
        """Report lines after the metrics table: each model's accuracy per group (per anchor, field,
        function), then the task's own section (e.g. SLIP tokens). `results` maps label -> summary."""
        lines = []
        if self.breakdown:
            key, title = self.breakdown
            groups = sorted({g for res in results.values() for g in (res.get(key) or {})})
            if groups:
                lines += ["", f"### Accuracy per {title} (rows where it is the gold {title})", "",
                          f"| {title} | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
                lines += [f"| {g} | " + " | ".join(pct((res.get(key) or {}).get(g)) for res in results.values())
                          + " |" for g in groups]
        return lines + self.report_lines(results)


_FENCE = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_json_answer(text: str) -> tuple[bool, Any]:
    """Strict JSON parse of the whole answer; one surrounding Markdown code fence is tolerated."""
    text = text.strip()
    match = _FENCE.match(text)
    if match:
        text = match.group(1).strip()
    try:
        return True, json.loads(text)
    except json.JSONDecodeError:
        return False, None


def f1(predicted: list, gold: list) -> float:
    """Multiset F1; two empty sides agree perfectly."""
    if not predicted and not gold:
        return 1.0
    common = sum((Counter(predicted) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(gold)
    return 2 * precision * recall / (precision + recall)

