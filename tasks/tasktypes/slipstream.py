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
from tasks.protocol import SlipParseError, extract_slip_loose, names_agent, normalise_agent, parse_tqt, tqt_gbnf


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
    instruction_text = next(m["content"] for m in reversed(row["messages"]) if m["role"] == "user")
    # Recipient accuracy only where the instruction names the gold recipient; elsewhere the dataset's ids are
    # arbitrary (no model could know them) and the row has no dst score (None: left out of the mean).
    named = names_agent(instruction_text, gold.dst)
    scores = {"strict_parse": float(slip is not None),
              "anchor_accuracy": float(slip is not None and slip.anchor == gold.anchor),
              "dst_accuracy": (float(slip is not None and normalise_agent(slip.dst) == normalise_agent(gold.dst))
                               if named else None),
              # Ids compare after normalise_agent, as dst does: a template row writes a person's id as the prompt
              # writes the name ("Carol" is the agent carol).
              "src_dst_accuracy": float(slip is not None and (normalise_agent(slip.src), normalise_agent(slip.dst))
                                        == (normalise_agent(gold.src), normalise_agent(gold.dst))),
              "payload_f1": f1(list(slip.payload), list(gold.payload)) if slip is not None else 0.0,
              "anchor_loose": float(loose is not None and loose.anchor == gold.anchor),
              "predicted_anchor": slip.anchor if slip else None, "group": gold.anchor, "error": error}
    if count_tokens is not None:
        # The instruction is the last user turn (the turn before the gold answer, when the row has one).
        instruction = count_tokens(instruction_text)
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


def _dst_per_anchor(scored: list[dict]) -> dict:
    groups: dict[str, list[float]] = {}
    for s in scored:
        if s.get("dst_accuracy") is not None:
            groups.setdefault(s["group"], []).append(s["dst_accuracy"])
    return {g: round(sum(v) / len(v), 3) for g, v in sorted(groups.items())}


def summarize(scored: list[dict]) -> dict:
    return {"recipient_rows": sum(s.get("dst_accuracy") is not None for s in scored),
            "dst_per_anchor": _dst_per_anchor(scored),
            "slip_tokens": _token_reduction([s["tokens"] for s in scored if "tokens" in s]),
            "gold_slip_tokens": _token_reduction([s["gold_tokens"] for s in scored if "gold_tokens" in s])}


def report_lines(results: dict[str, dict]) -> list[str]:
    """The SLIP-tokens table: the gold answers' messages, then each model's."""
    anchors = sorted({a for res in results.values() for a in (res.get("dst_per_anchor") or {})})
    lines = []
    if anchors:
        lines += ["", "### Recipient (dst) accuracy per anchor", "",
                  "On rows whose instruction names the gold recipient (`tasks.protocol.names_agent`); the predicted "
                  "and gold ids compared after `normalise_agent`. Rows per model: "
                  + ", ".join(f"{label} {res.get('recipient_rows', 0)}" for label, res in results.items()) + ". "
                  "`src/dst acc.` in the table above is src and dst (ids after `normalise_agent`) on every row, "
                  "although most of the published dataset's ids are arbitrary (not derivable from the "
                  "instruction).", "",
                  "| anchor | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
        lines += [f"| {a} | " + " | ".join(pct((res.get("dst_per_anchor") or {}).get(a)) for res in results.values())
                  + " |" for a in anchors]
    lines += ["", "### SLIP message tokens vs the natural-language instruction", "",
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
             ("dst_accuracy", "recipient (dst) acc."), ("src_dst_accuracy", "src/dst acc. (arbitrary ids)"), ("payload_f1", "payload F1"), ("anchor_loose", "anchor (loose)")),
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
    grammar=tqt_gbnf,   # every anchor the parser knows, the same one in QUANTIZE and SLIP
)
