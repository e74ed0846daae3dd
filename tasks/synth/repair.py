"""Turn an LLM's answer into validated Slipstream records: extract the JSON, repair what is mechanically
fixable, drop the rest with a reason.

A repair never guesses meaning: it fixes spelling of things that have exactly one right form (anchor case
and spacing, a known alias, agent ids with spaces, payload characters the wire format forbids, a missing
QUANTIZE line that follows from the anchor, JSON with code fences or trailing commas). Anything that
needs judgement (no thought, an unknown anchor, QUANTIZE and SLIP disagreeing) is dropped. Every kept
record is a `tasks.synth.records.SynthRecord` (the record type the template synthesizer makes too), so it
passes `validate_record` and its answer is written by `format_tqt` and re-checked by `parse_tqt`.

Each repair and each drop is named by a fixed category, because a synthesis report counts them. It also
reads what LLMs return around the records: JSON in code fences or with trailing commas, renamed fields, a
whole TQT answer or wire line instead of separate fields.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

from tasks.protocol import AGENT_CHARS, PAYLOAD_CHARS, UCR_ANCHORS, SlipParseError
from tasks.synth.records import RecordError, SynthRecord, validate_record

# Anchors by their letters only: "request_task", "Request Task", "REQUESTTASK" -> RequestTask.
_ANCHOR_BY_LETTERS = {a.lower(): a for a in UCR_ANCHORS}
# Unambiguous short names models use for an anchor (each maps to exactly one UCR anchor).
ANCHOR_ALIASES = {
    "ack": "MetaAck", "acknowledge": "MetaAck", "handoff": "MetaHandoff", "handover": "MetaHandoff",
    "approve": "EvalApprove", "needswork": "EvalNeedsWork", "needsrevision": "EvalNeedsWork",
    "escalate": "MetaEscalate", "fallbackgeneric": "Fallback",
}
# Field names models use instead of the requested ones.
_FIELD_ALIASES = {"source": "src", "from": "src", "sender": "src", "destination": "dst", "to": "dst",
                  "target": "dst", "receiver": "dst", "intent": "anchor", "reasoning": "thought",
                  "user": "instruction", "prompt": "instruction"}
_TQT_FIELDS = ("response", "answer", "output", "tqt")
_WIRE_FIELDS = ("slip", "wire")
_AGENT_BAD = re.compile(rf"[^{AGENT_CHARS}]")
_PAYLOAD_BAD = re.compile(rf"[^{PAYLOAD_CHARS}]")
_FENCE = re.compile(r"```[A-Za-z0-9_-]*")
_TRAILING_COMMA = re.compile(r",\s*([\]}])")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_FLAT_OBJECT = re.compile(r"\{[^{}]*\}")


class Drop(Exception):
    """A record that cannot be repaired mechanically; the message is the (short, stable) reason."""


@dataclass
class Repaired:
    record: SynthRecord
    repairs: list[str] = field(default_factory=list)

    @property
    def instruction(self) -> str:
        return self.record.instruction

    @property
    def anchor(self) -> str:
        return self.record.anchor

    @property
    def answer(self) -> str:
        return self.record.answer()


def extract_items(text: str) -> tuple[list[object], list[str]]:
    """The JSON records in a model answer, and the response-level repairs that were needed to read them.

    Accepts a JSON array, an object holding one array (``{"scenarios": [...]}``) or a single object.
    An array cut off at max_tokens or broken by one bad record still yields its complete flat objects.
    """
    repairs = []
    cleaned = _CONTROL.sub("", text)
    if cleaned != text:
        repairs.append("json: control characters removed")
    if "```" in cleaned:
        cleaned = _FENCE.sub("", cleaned)
        repairs.append("json: code fence stripped")
    start = min((i for i in (cleaned.find("["), cleaned.find("{")) if i >= 0), default=-1)
    if start < 0:
        return [], repairs
    body = cleaned[start:cleaned.rfind("]" if cleaned[start] == "[" else "}") + 1]
    for attempt in (body, _TRAILING_COMMA.sub(r"\1", body)):
        try:
            value = json.loads(attempt)
        except json.JSONDecodeError:
            continue
        if attempt is not body:
            repairs.append("json: trailing commas removed")
        return _as_list(value), repairs
    salvaged = []
    for match in _FLAT_OBJECT.finditer(cleaned[start:]):
        try:
            salvaged.append(json.loads(_TRAILING_COMMA.sub(r"\1", match.group(0))))
        except json.JSONDecodeError:
            continue
    if salvaged:
        repairs.append("json: records salvaged from invalid JSON")
    return salvaged, repairs


def _as_list(value: object) -> list[object]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1 and not {"instruction", "anchor"} & set(value):
            return lists[0]
        return [value]
    return [value]


def repair_anchor(value: object, repairs: list[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Drop("missing anchor")
    if value in UCR_ANCHORS:
        return value
    letters = re.sub(r"[^a-z]", "", value.lower())
    if letters in _ANCHOR_BY_LETTERS:
        repairs.append("anchor: case/spacing fixed")
        return _ANCHOR_BY_LETTERS[letters]
    if letters in ANCHOR_ALIASES:
        repairs.append("anchor: alias resolved")
        return ANCHOR_ALIASES[letters]
    raise Drop("unknown anchor")


def repair_agent(value: object, repairs: list[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Drop("missing src/dst")
    agent = value.strip()
    if re.search(r"\s", agent):
        agent = re.sub(r"\s+", "_", agent)
        repairs.append("agent id: spaces to underscores")
    if _AGENT_BAD.search(agent):
        agent = _AGENT_BAD.sub("", agent)
        repairs.append("agent id: invalid characters removed")
    if not agent or len(agent) > 64:
        raise Drop("invalid agent id")
    return agent


def repair_payload(value: object, repairs: list[str]) -> list[str]:
    """Payload tokens in the wire profile: split on whitespace (as the wire does), forbidden characters out."""
    if value is None:
        return []
    if isinstance(value, dict):
        value = [f"{k}: {v}" for k, v in value.items()]
        repairs.append("payload: object flattened")
    items = value if isinstance(value, list) else [value]
    tokens = []
    for item in items:
        if isinstance(item, (dict, list)):
            raise Drop("invalid payload")
        if item is not None:
            tokens += str(item).split()
    clean = []
    for token in tokens:
        ascii_token = unicodedata.normalize("NFKD", token).encode("ascii", "ignore").decode()
        fixed = re.sub(r"_+", "_", _PAYLOAD_BAD.sub("_", ascii_token)).strip("_")
        if fixed != token:
            repairs.append("payload: token sanitized")
        if len(fixed) > 80:
            raise Drop("payload token too long")
        if fixed:
            clean.append(fixed)
    return clean


def repair_thought(value: object, repairs: list[str]) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Drop("missing thought")
    thought = value.strip()
    if thought.upper().startswith("THOUGHT:"):
        thought = thought[len("THOUGHT:"):].strip()
        repairs.append("thought: label removed")
    thought = _one_line(thought, "thought", repairs)
    if not thought:
        raise Drop("missing thought")
    return thought


def _normalise_keys(raw: dict, repairs: list[str]) -> dict:
    out = {}
    for key, value in raw.items():
        name = str(key).strip().lower()
        name = _FIELD_ALIASES.get(name, name)
        out.setdefault(name, value)
    if set(out) != set(raw):
        repairs.append("field names normalised")
    return out


def _fields_from_text(rec: dict, repairs: list[str]) -> None:
    """Records that carry a TQT answer or a wire line instead of separate fields: split them into fields."""
    text = next((rec[k] for k in _TQT_FIELDS + _WIRE_FIELDS if isinstance(rec.get(k), str)), None)
    if text is None:
        return
    lines = {m.group(1).upper(): m.group(2).strip()
             for m in re.finditer(r"^\s*(THOUGHT|QUANTIZE|SLIP)\s*:\s*(.*)$", text, re.M | re.I)}
    wire = lines.get("SLIP", text.strip())
    tokens = wire.split()
    if len(tokens) < 5 or tokens[0].upper() != "SLIP":
        raise Drop("SLIP line missing or too short")
    if tokens[1] != "v1":  # same grammar, other version label (v3's Force/Object anchors fail below)
        repairs.append("SLIP version set to v1")
    rec.setdefault("src", tokens[2])
    rec.setdefault("dst", tokens[3])
    rec.setdefault("anchor", tokens[4])
    rec.setdefault("payload", tokens[5:])
    if "THOUGHT" in lines:
        rec.setdefault("thought", lines["THOUGHT"])
    quantize = re.search(r"->\s*(\S+)\s*$", lines.get("QUANTIZE", ""))
    rec["_quantize_anchor"] = quantize.group(1) if quantize else None
    if any(k in rec for k in _TQT_FIELDS) and not quantize:
        repairs.append("QUANTIZE line regenerated")


def _one_line(text: str, what: str, repairs: list[str]) -> str:
    text = text.strip()
    if "\n" in text or "\r" in text:
        text = re.sub(r"\s*[\r\n]+\s*", " ", text)
        repairs.append(f"{what}: line breaks collapsed")
    return text


def repair_llm_record(raw: object) -> Repaired:
    """Validate one generated record, repairing mechanical faults.

    Raises:
        Drop: with a short reason when the record cannot be used.
    """
    if not isinstance(raw, dict):
        raise Drop("not an object")
    repairs: list[str] = []
    rec = _normalise_keys(raw, repairs)
    instruction = rec.get("instruction")
    if not isinstance(instruction, str) or not instruction.strip():
        raise Drop("missing instruction")
    instruction = _one_line(instruction, "instruction", repairs)
    _fields_from_text(rec, repairs)
    thought = repair_thought(rec.get("thought"), repairs)
    src = repair_agent(rec.get("src"), repairs)
    dst = repair_agent(rec.get("dst"), repairs)
    anchor = repair_anchor(rec.get("anchor"), repairs)
    if rec.get("_quantize_anchor") and repair_anchor(rec["_quantize_anchor"], []) != anchor:
        raise Drop("QUANTIZE anchor differs from SLIP anchor")
    payload = repair_payload(rec.get("payload"), repairs)
    try:  # the record model and the protocol parser are the judges: a repair that fails them is a drop
        record = validate_record({"instruction": instruction, "thought": thought, "src": src, "dst": dst,
                                  "anchor": anchor, "payload": tuple(payload)})
        record.answer()
    except (RecordError, SlipParseError) as exc:
        # Values are masked so that the reason is a category that can be counted.
        raise Drop("invalid record: " + re.sub(r"'[^']*'|\d+", "...", str(exc).splitlines()[0])) from None
    return Repaired(record=record, repairs=list(dict.fromkeys(repairs)))
