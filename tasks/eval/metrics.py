"""Metrics per task type: one scorer per row, one aggregate per model.

slipstream  strict TQT parse, exact anchor, exact src+dst, payload token F1, and the token count of the SLIP
            message against the natural-language instruction (and against the same message as JSON): the
            seeds' "82% fewer tokens" claim, measured on the model's own answers.
structured  valid JSON, valid against the row's JSON Schema, per-field exact match, whole-object match.
toolcall    a parseable call, function name match, exact call (name and arguments), argument F1, arguments
            valid against the tool's parameter schema.
keyword     share of expected keywords present (case-insensitive), all present (seed 003's verify step).

Token counts use the SLM's own tokenizer (passed in as `count_tokens`): tiktoken downloads its BPE files
at first use, which offline machines cannot do, and the SLM's tokenizer is the one that pays the cost.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from typing import Any, Callable

import jsonschema

from tasks.data.evalfile import prompt_messages, task_of
from tasks.protocol import SlipParseError, extract_slip_loose, parse_tqt

TokenCounter = Callable[[str], int]

# Row-level metrics averaged into each model's summary, per task type (the report's columns, in order).
METRICS: dict[str, list[tuple[str, str]]] = {
    "slipstream": [("strict_parse", "strict parse"), ("anchor_accuracy", "anchor acc."),
                   ("src_dst_accuracy", "src/dst acc."), ("payload_f1", "payload F1"),
                   ("anchor_loose", "anchor (loose)")],
    "structured": [("valid_json", "valid JSON"), ("schema_valid", "schema-valid"),
                   ("field_accuracy", "field acc."), ("exact_match", "exact match")],
    "toolcall": [("valid_call", "valid call"), ("name_accuracy", "name acc."), ("call_exact", "exact call"),
                 ("argument_f1", "argument F1"), ("arguments_valid", "args schema-valid")],
    "keyword": [("keyword_recall", "keyword recall"), ("keyword_pass", "all keywords")],
}
# The metric gates and the Fledgling decision compare, unless the recipe names another.
PRIMARY_METRIC = {"slipstream": "anchor_accuracy", "structured": "field_accuracy", "toolcall": "call_exact",
                  "keyword": "keyword_pass"}
# Which label a row's per-group accuracy is reported under (per anchor, per field, per function).
BREAKDOWN = {"slipstream": "per_anchor", "structured": "per_field", "toolcall": "per_function",
             "keyword": None}

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


def _json_tokens(message) -> str:
    return json.dumps({"src": message.src, "dst": message.dst, "anchor": message.anchor,
                       "payload": list(message.payload)})


def score_slipstream(row: dict, answer: str, count_tokens: TokenCounter | None = None) -> dict:
    gold = parse_tqt(row["messages"][-1]["content"] if row.get("expected") is None else row["expected"]).slip
    try:
        slip, error = parse_tqt(answer).slip, None
    except SlipParseError as exc:
        slip, error = None, str(exc)
    loose = slip or extract_slip_loose(answer)
    scores = {"strict_parse": float(slip is not None),
              "anchor_accuracy": float(slip is not None and slip.anchor == gold.anchor),
              "src_dst_accuracy": float(slip is not None and (slip.src, slip.dst) == (gold.src, gold.dst)),
              "payload_f1": f1(list(slip.payload), list(gold.payload)) if slip is not None else 0.0,
              "anchor_loose": float(loose is not None and loose.anchor == gold.anchor),
              "predicted_anchor": slip.anchor if slip else None, "group": gold.anchor, "error": error}
    if count_tokens is not None:
        instruction = count_tokens(prompt_messages(row)[-1]["content"])
        # The gold message measures the protocol itself; the model's, only where its answer parsed.
        scores["gold_tokens"] = {"instruction": instruction, "slip": count_tokens(gold.wire()),
                                 "json": count_tokens(_json_tokens(gold))}
        if slip is not None:
            scores["tokens"] = {"instruction": instruction, "slip": count_tokens(slip.wire()),
                                "json": count_tokens(_json_tokens(slip))}
    return scores


def score_structured(row: dict, answer: str, count_tokens: TokenCounter | None = None) -> dict:
    ok, value = parse_json_answer(answer)
    expected = row["expected"]
    schema_valid = ok and jsonschema.Draft202012Validator(row["schema"]).is_valid(value)
    fields = {}
    if isinstance(expected, dict):
        for key, gold in expected.items():
            fields[key] = float(ok and isinstance(value, dict) and key in value and value[key] == gold)
    else:
        fields["<value>"] = float(ok and value == expected)
    return {"valid_json": float(ok), "schema_valid": float(schema_valid),
            "field_accuracy": sum(fields.values()) / len(fields) if fields else float(ok and value == expected),
            "exact_match": float(ok and value == expected), "fields": fields,
            "group": None, "error": None if ok else "not JSON" if answer.strip() else "empty answer"}


def parse_tool_call(answer: str, native: list[dict] | None = None) -> dict | None:
    """A call from native `tool_calls` (first one) or from a JSON answer {"name", "arguments"}."""
    if native:
        call = native[0]
        args = call.get("arguments")
        if isinstance(args, str):
            ok, args = parse_json_answer(args)
            if not ok:
                return None
        return {"name": call.get("name"), "arguments": args} if isinstance(args, dict) else None
    ok, value = parse_json_answer(answer)
    if not (ok and isinstance(value, dict) and isinstance(value.get("name"), str)):
        return None
    args = value.get("arguments", value.get("parameters", {}))
    return {"name": value["name"], "arguments": args} if isinstance(args, dict) else None


def score_toolcall(row: dict, answer: str, count_tokens: TokenCounter | None = None,
                   tool_calls: list[dict] | None = None) -> dict:
    expected = row["expected"]
    call = parse_tool_call(answer, tool_calls)
    if call is None:
        return {"valid_call": 0.0, "name_accuracy": 0.0, "call_exact": 0.0, "argument_f1": 0.0,
                "arguments_valid": 0.0, "predicted_name": None, "group": expected["name"],
                "error": "no parseable tool call"}
    pairs = lambda args: [(k, json.dumps(v, sort_keys=True)) for k, v in args.items()]
    tool = next((t for t in row["tools"] if t["name"] == call["name"]), None)
    return {"valid_call": 1.0, "name_accuracy": float(call["name"] == expected["name"]),
            "call_exact": float(call == expected),
            "argument_f1": f1(pairs(call["arguments"]), pairs(expected["arguments"]))
            if call["name"] == expected["name"] else 0.0,
            "arguments_valid": float(tool is not None and jsonschema.Draft202012Validator(
                tool["parameters"]).is_valid(call["arguments"])),
            "predicted_name": call["name"], "group": expected["name"], "error": None}


def score_keyword(row: dict, answer: str, count_tokens: TokenCounter | None = None) -> dict:
    text = answer.lower()
    hits = [k for k in row["keywords"] if k.lower() in text]
    return {"keyword_recall": len(hits) / len(row["keywords"]), "keyword_pass": float(len(hits) == len(row["keywords"])),
            "missing": [k for k in row["keywords"] if k not in hits], "group": None, "error": None}


def score_row(row: dict, answer: str, count_tokens: TokenCounter | None = None,
              tool_calls: list[dict] | None = None) -> dict:
    """Scores of one answer against one chat row (its task type decides the metrics)."""
    task = task_of(row)
    if task == "toolcall":
        return score_toolcall(row, answer, count_tokens, tool_calls)
    return {"slipstream": score_slipstream, "structured": score_structured,
            "keyword": score_keyword}[task](row, answer, count_tokens)


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))], 3)


def _token_reduction(counted: list[dict]) -> dict:
    total = {key: sum(t[key] for t in counted) for key in ("instruction", "slip", "json")}
    return {"rows": len(counted), **total,
            "reduction_vs_instruction": round(1 - total["slip"] / total["instruction"], 4) if counted else None,
            "reduction_vs_json": round(1 - total["slip"] / total["json"], 4) if counted else None}


def aggregate(task: str, scored: list[dict], calls: list[dict], seconds: float) -> dict:
    """Per-model summary: metric means, per-group accuracy, errors, latency, tokens and throughput.

    Args:
        task: the task type.
        scored: one score dict per row (from `score_row`).
        calls: one dict per row with latency_s, prompt_tokens, completion_tokens (from the runner).
        seconds: wall time of the whole evaluation (throughput and hourly cost use it).
    """
    n = len(scored)
    summary: dict = {key: _mean([s[key] for s in scored]) for key, _ in METRICS[task]}
    primary = PRIMARY_METRIC[task]
    breakdown = BREAKDOWN[task]
    if task == "structured":
        per_field: dict[str, list[float]] = {}
        for s in scored:
            for key, value in s["fields"].items():
                per_field.setdefault(key, []).append(value)
        summary["per_field"] = {k: round(sum(v) / len(v), 3) for k, v in sorted(per_field.items())}
    elif breakdown:
        groups: dict[str, list[float]] = {}
        for s in scored:
            groups.setdefault(s["group"], []).append(s[primary])
        summary[breakdown] = {g: round(sum(v) / len(v), 3) for g, v in sorted(groups.items())}
    if task == "slipstream":
        summary["slip_tokens"] = _token_reduction([s["tokens"] for s in scored if "tokens" in s])
        summary["gold_slip_tokens"] = _token_reduction([s["gold_tokens"] for s in scored if "gold_tokens" in s])
    summary["errors"] = dict(Counter(s["error"].split(":")[0][:60] for s in scored if s.get("error")).most_common(5))
    latencies = [c["latency_s"] for c in calls if c.get("latency_s") is not None]
    prompt_tokens = sum(c.get("prompt_tokens") or 0 for c in calls)
    completion_tokens = sum(c.get("completion_tokens") or 0 for c in calls)
    summary.update(
        rows=n, seconds=round(seconds, 2), failed_calls=sum(1 for c in calls if c.get("error")),
        latency_p50_s=_percentile(latencies, 0.5), latency_p95_s=_percentile(latencies, 0.95),
        prompt_tokens=prompt_tokens, generated_tokens=completion_tokens,
        mean_prompt_tokens=round(prompt_tokens / n, 1) if n else None,
        mean_completion_tokens=round(completion_tokens / n, 1) if n else None,
        tokens_per_second=round(completion_tokens / seconds, 1) if seconds else None,
        requests_per_second=round(n / seconds, 3) if seconds else None)
    return summary


def cost_per_1k_requests(summary: dict, input_usd_per_mtok: float | None = None,
                         output_usd_per_mtok: float | None = None, usd_per_hour: float | None = None) -> dict:
    """Estimated USD per 1,000 requests: per-token prices (a hosted LLM) or an hourly machine price (a
    self-hosted model, at the throughput measured here, batching and concurrency included)."""
    if input_usd_per_mtok is not None or output_usd_per_mtok is not None:
        usd = 1000 * ((summary["mean_prompt_tokens"] or 0) * (input_usd_per_mtok or 0)
                      + (summary["mean_completion_tokens"] or 0) * (output_usd_per_mtok or 0)) / 1e6
        return {"usd_per_1k_requests": round(usd, 5), "basis": f"${input_usd_per_mtok}/Mtok in, "
                f"${output_usd_per_mtok}/Mtok out"}
    if usd_per_hour is not None and summary.get("requests_per_second"):
        usd = 1000 / summary["requests_per_second"] / 3600 * usd_per_hour
        return {"usd_per_1k_requests": round(usd, 5), "basis": f"${usd_per_hour}/h at "
                f"{summary['requests_per_second']} req/s"}
    return {"usd_per_1k_requests": None, "basis": "no price configured"}
