"""Slipstream (TQT): the answer is THOUGHT / QUANTIZE / SLIP lines, scored on the parsed SLIP message.

Metrics: strict TQT parse, exact anchor (primary), exact src+dst, payload token F1, and the anchor of a
loosely extracted message. With a token counter, the SLIP message's tokens against the natural-language
instruction (and against the same message as JSON): the seeds' "82% fewer tokens" claim, measured on
the model's own answers. Token counts use the SLM's own tokenizer: tiktoken downloads its BPE files at
first use, which offline machines cannot do, and the SLM's tokenizer is the one that pays the cost.
"""

from __future__ import annotations

import json

from tasks.tasktypes.base import TaskType, TokenCounter, f1
from tasks.markdown import pct
from tasks.protocol import SlipParseError, extract_slip_loose, parse_tqt


def check_row(row) -> None:
    if not isinstance(row.expected, str):
        raise ValueError("slipstream: 'expected' must be the gold TQT answer text")
    try:
        parse_tqt(row.expected)
    except SlipParseError as exc:
        raise ValueError(f"slipstream: 'expected' is not a valid TQT answer: {exc}") from None


def _json_tokens(message) -> str:
    return json.dumps({"src": message.src, "dst": message.dst, "anchor": message.anchor,
                       "payload": list(message.payload)})


def score(row: dict, answer: str, tool_calls=None, count_tokens: TokenCounter | None = None) -> dict:
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
        # The instruction is the last user turn (the turn before the gold answer, when the row has one).
        instruction = count_tokens(next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user"))
        # The gold message measures the protocol itself; the model's, only where its answer parsed.
        scores["gold_tokens"] = {"instruction": instruction, "slip": count_tokens(gold.wire()),
                                 "json": count_tokens(_json_tokens(gold))}
        if slip is not None:
            scores["tokens"] = {"instruction": instruction, "slip": count_tokens(slip.wire()),
                                "json": count_tokens(_json_tokens(slip))}
    return scores


def _token_reduction(counted: list[dict]) -> dict:
    total = {key: sum(t[key] for t in counted) for key in ("instruction", "slip", "json")}
    return {"rows": len(counted), **total,
            "reduction_vs_instruction": round(1 - total["slip"] / total["instruction"], 4) if counted else None,
            "reduction_vs_json": round(1 - total["slip"] / total["json"], 4) if counted else None}


def summarize(scored: list[dict]) -> dict:
    return {"slip_tokens": _token_reduction([s["tokens"] for s in scored if "tokens" in s]),
            "gold_slip_tokens": _token_reduction([s["gold_tokens"] for s in scored if "gold_tokens" in s])}


def report_lines(results: dict[str, dict]) -> list[str]:
    """The SLIP-tokens table: the gold answers' messages, then each model's."""
    lines = ["", "### SLIP message tokens vs the natural-language instruction", "",
             "Counted with the SLM's own tokenizer (not tiktoken: it needs a download): the gold answers' "
             "messages on every test row, each model's on the rows whose answer parsed. The seeds' \"82% "
             "fewer tokens\" is measured against JSON; both are shown.", "",
             "| messages | rows | instruction tokens | SLIP tokens | same message as JSON | "
             "reduction vs instruction | reduction vs JSON |", "|---|---|---|---|---|---|---|"]
    gold = next((res["gold_slip_tokens"] for res in results.values() if res.get("gold_slip_tokens")), None)
    rows = ([("gold answers", gold)] if gold else []) + [(label, res.get("slip_tokens") or {})
                                                         for label, res in results.items()]
    for label, t in rows:
        lines.append(f"| {label} | {t.get('rows', 0)} | {t.get('instruction', '–')} | {t.get('slip', '–')} | "
                     f"{t.get('json', '–')} | {pct(t.get('reduction_vs_instruction'))} | "
                     f"{pct(t.get('reduction_vs_json'))} |")
    return lines


SLIPSTREAM = TaskType(
    name="slipstream",
    metrics=(("strict_parse", "strict parse"), ("anchor_accuracy", "anchor acc."),
             ("src_dst_accuracy", "src/dst acc."), ("payload_f1", "payload F1"), ("anchor_loose", "anchor (loose)")),
    primary_metric="anchor_accuracy",
    check_row=check_row,
    gold_answer=lambda row: row.expected,
    score=score,
    chat_fields=lambda row: {"anchor": parse_tqt(row.expected).slip.anchor},
    breakdown=("per_anchor", "anchor"),
    summarize=summarize,
    report_lines=report_lines,
    counts_tokens=True,
    data_formats=("sharegpt", "datafactory", "eval"),   # datafactory: TQT rows in the Data Factory format
)
