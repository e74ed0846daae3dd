"""The Slipstream protocol (SLIP v1 wire format) and a strict parser of TQT answers.

Grammar follows slipcore <= 2.4.0 (the version the published dataset and the seed model use):

    SLIP v1 <src> <dst> <anchor> [payload...]

A TQT (Think-Quantize-Transmit) answer is two or three lines:

    THOUGHT: <free text>
    QUANTIZE: [ACTION=.. | DOMAIN=.. | URGENCY=.. | POLARITY=..] -> <anchor>    (optional)
    SLIP: SLIP v1 <src> <dst> <anchor> [payload...]

The reference decoder (slipcore.protocol.decode) only checks the marker and the anchor. This parser is
stricter, because "the model produced something SLIP-shaped" is not the metric we want: agent ids and
payload tokens must match the token-friendly profile of the ABNF (payload tokens may additionally carry
the punctuation that occurs in the published dataset, e.g. ``artifact: model_v2.4.1``), the version is
``v1``, the anchor is a known UCR mnemonic, and a QUANTIZE line, when present, names the same anchor.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# The 19 anchors the published dataset and the seed model card use (slipcore README lists these).
DATASET_ANCHORS: tuple[str, ...] = (
    "RequestTask", "RequestReview", "RequestHelp", "RequestPlan",
    "InformComplete", "InformProgress", "InformBlocked", "InformStatus",
    "ProposePlan", "ProposeChange", "ProposeAlternative",
    "EvalApprove", "EvalReject", "EvalNeedsWork",
    "Accept", "Reject", "MetaAck", "MetaHandoff", "Fallback",
)

# All 46 core UCR anchors of slipcore 2.4.0 (src/slipcore/ucr.py) with (action, polarity, domain, urgency).
UCR_ANCHORS: dict[str, tuple[int, int, int, int]] = {
    "ObserveState": (0, 4, 2, 3), "ObserveChange": (0, 4, 2, 4), "ObserveError": (0, 2, 6, 6),
    "InformResult": (1, 5, 2, 3), "InformStatus": (1, 4, 0, 3), "InformComplete": (1, 6, 0, 4),
    "InformBlocked": (1, 2, 0, 5), "InformProgress": (1, 5, 0, 3),
    "AskClarify": (2, 4, 1, 4), "AskStatus": (2, 4, 0, 3), "AskPermission": (2, 4, 4, 4),
    "AskResource": (2, 4, 5, 3),
    "RequestTask": (3, 4, 0, 4), "RequestPlan": (3, 4, 1, 4), "RequestReview": (3, 4, 3, 3),
    "RequestHelp": (3, 4, 7, 5), "RequestCancel": (3, 1, 4, 5), "RequestPriority": (3, 4, 4, 5),
    "RequestResource": (3, 4, 5, 4),
    "ProposePlan": (4, 5, 1, 4), "ProposeChange": (4, 5, 0, 4), "ProposeAlternative": (4, 5, 1, 4),
    "ProposeRollback": (4, 3, 4, 5),
    "CommitTask": (5, 6, 0, 4), "CommitDeadline": (5, 6, 0, 4), "CommitResource": (5, 6, 5, 4),
    "EvalApprove": (6, 7, 3, 4), "EvalReject": (6, 0, 3, 4), "EvalNeedsWork": (6, 3, 3, 4),
    "EvalComplete": (6, 6, 3, 4), "EvalBlocked": (6, 2, 3, 5),
    "MetaAck": (7, 5, 4, 2), "MetaSync": (7, 4, 4, 3), "MetaHandoff": (7, 4, 4, 4),
    "MetaEscalate": (7, 3, 4, 6), "MetaAbort": (7, 0, 4, 7),
    "Accept": (5, 7, 7, 3), "Reject": (5, 0, 7, 3), "AcceptWithCondition": (5, 5, 7, 4),
    "Defer": (5, 4, 7, 2),
    "ErrorGeneric": (1, 1, 6, 5), "ErrorTimeout": (1, 1, 6, 5), "ErrorResource": (1, 1, 6, 5),
    "ErrorPermission": (1, 0, 6, 5), "ErrorValidation": (1, 1, 6, 4),
    "Fallback": (7, 4, 7, 4),
}

# Label vocabularies of slipcore.finetune (the QUANTIZE hint); they index the UCR coordinates.
ACTION_LABELS = ["observe", "inform", "ask", "request", "propose", "commit", "evaluate", "meta"]
POLARITY_LABELS = ["strongly_negative", "negative", "declining", "mild_negative",
                   "neutral", "mild_positive", "positive", "strongly_positive"]
DOMAIN_LABELS = ["task", "plan", "observation", "evaluation", "control", "resource", "error", "general"]
URGENCY_LABELS = ["background", "low", "low_normal", "normal", "elevated", "high", "urgent", "critical"]

AGENT_CHARS = r"A-Za-z0-9._-"
AGENT_MAX = 64
AGENT_ID = re.compile(rf"^[{AGENT_CHARS}]{{1,{AGENT_MAX}}}$")
# Payload tokens: printable ASCII without whitespace or the separators the spec forbids ('|', '@').
PAYLOAD_CHARS = r"A-Za-z0-9._\-:=/,+%'#<>\[\]{}()\""
PAYLOAD_MAX = 80
PAYLOAD_TOKEN = re.compile(rf"^[{PAYLOAD_CHARS}]{{1,{PAYLOAD_MAX}}}$")
_QUANTIZE = re.compile(r"^\[(?P<hint>[^\]]*)\]\s*->\s*(?P<anchor>[A-Za-z]+)$")


class SlipParseError(ValueError):
    """A message or answer that does not follow the grammar; the message says which rule failed."""


@dataclass(frozen=True)
class SlipMessage:
    """One decoded SLIP v1 wire message."""

    src: str
    dst: str
    anchor: str
    payload: tuple[str, ...] = ()
    version: str = "v1"

    def wire(self) -> str:
        return " ".join(["SLIP", self.version, self.src, self.dst, self.anchor, *self.payload])


@dataclass(frozen=True)
class TQTAnswer:
    """A parsed Think-Quantize-Transmit answer."""

    thought: str
    slip: SlipMessage
    quantize_anchor: str | None = None
    quantize_hint: str | None = None
    extra: dict = field(default_factory=dict)


def parse_slip(wire: str) -> SlipMessage:
    """Parse one wire line ``SLIP v1 src dst Anchor [payload...]`` strictly.

    Raises:
        SlipParseError: naming the first rule the line breaks.
    """
    tokens = wire.strip().split()
    if len(tokens) < 5:
        raise SlipParseError(f"need at least 5 tokens (SLIP v1 src dst anchor), got {len(tokens)}")
    marker, version, src, dst, anchor, *payload = tokens
    if marker != "SLIP":
        raise SlipParseError(f"marker must be 'SLIP', got {marker!r}")
    if version != "v1":
        raise SlipParseError(f"version must be 'v1', got {version!r}")
    for role, agent in (("src", src), ("dst", dst)):
        if not AGENT_ID.match(agent):
            raise SlipParseError(f"{role} {agent!r} is not an agent id ([A-Za-z0-9._-]+)")
    if anchor not in UCR_ANCHORS:
        raise SlipParseError(f"unknown anchor {anchor!r}")
    for token in payload:
        if not PAYLOAD_TOKEN.match(token):
            raise SlipParseError(f"payload token {token!r} has characters outside the profile")
    return SlipMessage(src=src, dst=dst, anchor=anchor, payload=tuple(payload), version=version)


def parse_tqt(answer: str) -> TQTAnswer:
    """Parse a model's whole TQT answer: THOUGHT, optional QUANTIZE, then SLIP, and nothing else.

    Raises:
        SlipParseError: naming the missing/extra line or the broken rule.
    """
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    if not lines:
        raise SlipParseError("empty answer")
    if not lines[0].startswith("THOUGHT:"):
        raise SlipParseError("first line must start with 'THOUGHT:'")
    thought = lines[0][len("THOUGHT:"):].strip()
    rest = lines[1:]
    quantize_anchor = quantize_hint = None
    if rest and rest[0].startswith("QUANTIZE:"):
        match = _QUANTIZE.match(rest[0][len("QUANTIZE:"):].strip())
        if not match:
            raise SlipParseError("QUANTIZE line must be '[hint] -> Anchor'")
        quantize_hint, quantize_anchor = match["hint"], match["anchor"]
        rest = rest[1:]
    if len(rest) != 1:
        raise SlipParseError(f"expected exactly one SLIP line after THOUGHT/QUANTIZE, got {len(rest)} lines")
    if not rest[0].startswith("SLIP:"):
        raise SlipParseError("last line must start with 'SLIP:'")
    slip = parse_slip(rest[0][len("SLIP:"):])
    if quantize_anchor is not None and quantize_anchor != slip.anchor:
        raise SlipParseError(f"QUANTIZE anchor {quantize_anchor} differs from SLIP anchor {slip.anchor}")
    return TQTAnswer(thought=thought, slip=slip, quantize_anchor=quantize_anchor, quantize_hint=quantize_hint)


_NOT_AGENT_CHAR = re.compile(rf"[^{AGENT_CHARS}]")


def normalise_agent(name: str) -> str:
    """The agent id a recipient named in plain text gets: lower case, whitespace runs to '_', characters
    outside [A-Za-z0-9._-] dropped ("Carol" -> carol, "Ops Bot" -> ops_bot). The template synthesis derives
    every named person's id with it, and the recipient metric compares ids after it."""
    return _NOT_AGENT_CHAR.sub("", re.sub(r"\s+", "_", name.strip().lower()))


def agent_id_as_written(name: str) -> str:
    """The agent id of a name with the case the text writes it in ("Tobias" -> Tobias, "Ops Bot" -> Ops_Bot,
    "siobhan" -> siobhan); `normalise_agent` of it is the canonical id, which is what ids are compared by. The
    template synthesis gives a named person this id, so the answer repeats the prompt's own tokens: " Tobias" and
    " tobias" are different BPE tokens, and a small model asked to lower-case a rare name while copying it wrote
    "toba" or "tohabba" (9 of a demo's 11 recipient misses on the hand-written prompts, 2026-12-03)."""
    return _NOT_AGENT_CHAR.sub("", re.sub(r"\s+", "_", name.strip()))


def names_agent(text: str, agent: str) -> bool:
    """Whether `text` names `agent`: its id's words (split on '_', '-', '.') appear in order as whole
    words, separated by spaces or those characters ("ask the ops bot", "ops_bot", "ops-bot" name ops_bot)."""
    words = [w for w in re.split(r"[_.\-]+", agent.lower()) if w]
    if not words:
        return False
    pattern = r"(?<![A-Za-z0-9])" + r"[\s_.\-]+".join(map(re.escape, words)) + r"(?![A-Za-z0-9])"
    return re.search(pattern, text.lower()) is not None


def extract_slip_loose(answer: str) -> SlipMessage | None:
    """Find the first strictly valid wire message anywhere in free text (for partial credit metrics)."""
    for match in re.finditer(r"SLIP v1 [^\n]*", answer):
        try:
            return parse_slip(match.group(0))
        except SlipParseError:
            continue
    return None


def quantize_hint(anchor: str) -> str:
    """The QUANTIZE hint slipcore.finetune writes for an anchor (order ACTION, DOMAIN, URGENCY, POLARITY)."""
    action, polarity, domain, urgency = UCR_ANCHORS[anchor]
    return (f"ACTION={ACTION_LABELS[action]} | DOMAIN={DOMAIN_LABELS[domain]} | "
            f"URGENCY={URGENCY_LABELS[urgency]} | POLARITY={POLARITY_LABELS[polarity]}")


def format_tqt(thought: str, message: SlipMessage, with_quantize: bool = True) -> str:
    """Write a TQT answer in the dataset's exact layout."""
    lines = [f"THOUGHT: {thought}"]
    if with_quantize:
        lines.append(f"QUANTIZE: [{quantize_hint(message.anchor)}] -> {message.anchor}")
    lines.append(f"SLIP: {message.wire()}")
    return "\n".join(lines)


# Constrained decoding: a GBNF grammar (llama.cpp) whose every sentence parse_tqt accepts. Bounds the parser
# does not have keep a constrained model from rambling until max_tokens: of every gold answer the recipes train
# or evaluate on (published, templates, Data Factory, hand-written), the longest thought is 197 characters,
# the longest message carries 11 payload tokens and the longest payload token has 56 characters.
THOUGHT_MAX = 256
PAYLOAD_MAX_TOKENS = 12
GRAMMAR_TOKEN_MAX = 64
# What str.splitlines() splits on (parse_tqt reads lines with it): none of them may occur inside a line.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def _gbnf_char(code: int) -> str:
    char = chr(code)
    return char if char.isascii() and char.isalnum() else (f"\\x{code:02X}" if code < 0x100 else f"\\u{code:04X}")


def _gbnf_class(chars: list[str], negate: bool = False) -> str:
    """A GBNF character class of `chars`, consecutive runs as ranges, punctuation as \\xHH escapes (so no
    character can read as GBNF syntax: '-', ']', '^', '\\')."""
    codes, parts, i = sorted({ord(c) for c in chars}), [], 0
    while i < len(codes):
        j = i
        while j + 1 < len(codes) and codes[j + 1] == codes[j] + 1:
            j += 1
        parts.append(_gbnf_char(codes[i]) + (f"-{_gbnf_char(codes[j])}" if j > i else ""))
        i = j + 1
    return "[" + ("^" if negate else "") + "".join(parts) + "]"


def _gbnf_literal(text: str) -> str:
    return json.dumps(text)   # GBNF string literals take JSON's escapes (\n, \", \\)


def _matching(pattern: re.Pattern) -> list[str]:
    """The printable ASCII characters a one-character string of `pattern` may consist of."""
    return [chr(c) for c in range(0x21, 0x7F) if pattern.match(chr(c))]


def tqt_gbnf(anchors: tuple[str, ...] | list[str] = tuple(UCR_ANCHORS)) -> str:
    """The GBNF grammar of a TQT answer (llama.cpp `--grammar-file`): a THOUGHT line, an optional QUANTIZE
    line, then one SLIP line, and nothing after it (so generation stops there). The anchor is one of
    `anchors` (default: every UCR anchor parse_slip accepts), and a QUANTIZE line names the same anchor as
    the SLIP line: one alternative per anchor. Agent ids and payload tokens use exactly the characters and
    lengths of AGENT_ID and PAYLOAD_TOKEN; hints are the four slipcore labels (or the dataset's rare
    `ANCHOR=<anchor>`)."""
    def alternatives(words) -> str:
        return " | ".join(_gbnf_literal(w) for w in words)

    per_anchor = [f"q-{a} ::= {_gbnf_literal(a + chr(10) + 'SLIP: SLIP v1 ')} agents {_gbnf_literal(a)} payload"
                  for a in anchors]
    return "\n".join([
        "# TQT answer (tasks/protocol.py tqt_gbnf): THOUGHT, optional QUANTIZE, SLIP; the anchor of both lines",
        "# is the same protocol anchor. Generated from tasks.protocol; do not edit by hand.",
        'root ::= "THOUGHT: " thought "\\n" (quantized | slip-line)',
        f"thought ::= {_gbnf_class(list(_LINE_BREAKS), negate=True)}{{0,{THOUGHT_MAX}}}",
        'quantized ::= "QUANTIZE: [" hint "] -> " (' + " | ".join(f"q-{a}" for a in anchors) + ")",
        'slip-line ::= "SLIP: SLIP v1 " agents anchor payload',
        'agents ::= agent " " agent " "',
        f"agent ::= {_gbnf_class(_matching(AGENT_ID))}{{1,{AGENT_MAX}}}",
        f'payload ::= (" " token){{0,{PAYLOAD_MAX_TOKENS}}}',
        f"token ::= {_gbnf_class(_matching(PAYLOAD_TOKEN))}{{1,{GRAMMAR_TOKEN_MAX}}}",
        f"anchor ::= {alternatives(anchors)}",
        'hint ::= "ACTION=" action " | DOMAIN=" domain " | URGENCY=" urgency " | POLARITY=" polarity '
        '| "ANCHOR=" anchor',
        f"action ::= {alternatives(ACTION_LABELS)}",
        f"domain ::= {alternatives(DOMAIN_LABELS)}",
        f"urgency ::= {alternatives(URGENCY_LABELS)}",
        f"polarity ::= {alternatives(POLARITY_LABELS)}",
        *per_anchor, ""])


def tqt_max_chars(anchors: tuple[str, ...] | list[str] = tuple(UCR_ANCHORS)) -> int:
    """The longest answer tqt_gbnf(anchors) allows, in characters: a constrained generation is complete within
    this many tokens (no token is shorter than one character), whatever the model does."""
    labels = (ACTION_LABELS, DOMAIN_LABELS, URGENCY_LABELS, POLARITY_LABELS)
    hint = max(len("ACTION= | DOMAIN= | URGENCY= | POLARITY=") + sum(max(map(len, ls)) for ls in labels),
               len("ANCHOR=") + max(map(len, anchors)))
    anchor = max(map(len, anchors))
    return (len("THOUGHT: ") + THOUGHT_MAX + 1 + len("QUANTIZE: [") + hint + len("] -> ") + anchor + 1
            + len("SLIP: SLIP v1 ") + 2 * (AGENT_MAX + 1) + anchor + PAYLOAD_MAX_TOKENS * (1 + GRAMMAR_TOKEN_MAX))
