"""The synthesis record: one Slipstream example before it becomes a training row, and its strict
validation, shared by every synthesizer (tasks/synth/templates.py, and the LLM path through
tasks/synth/repair.py, which fixes the mechanical slips of LLM output first).

A record holds the fields slipcore's generators produce (instruction, thought, src, dst, anchor,
payload) and renders the dataset's exact TQT answer through tasks.protocol.format_tqt, so QUANTIZE hints
are always the UCR-derived ones. `validate_record` is strict: it decides what goes into a dataset.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tasks.protocol import AGENT_ID, PAYLOAD_TOKEN, UCR_ANCHORS, SlipMessage, format_tqt, parse_tqt

# The system prompt of every row of data/slipstream-tqt.jsonl (slipcore.finetune SYSTEM_PROMPT_BASIC).
SYSTEM_PROMPT_BASIC = (
    "You are an AI agent that communicates using the Slipstream protocol (SLIP).\n\n"
    "Slipstream uses semantic quantization - instead of verbose natural language, you transmit compact "
    "messages that reference a shared concept codebook (UCR).\n\n"
    "Wire format: SLIP v1 <src> <dst> <anchor> [payload...]\n\n"
    "Example:\n"
    "- To request a code review: SLIP v1 alice bob RequestReview\n"
    "- To report completion: SLIP v1 worker manager InformComplete task42\n"
    "- To propose a plan: SLIP v1 planner team ProposePlan auth_refactor\n\n"
    "Always respond with SLIP messages when coordinating with other agents."
)


class RecordError(ValueError):
    """A record that breaks a rule; the message names the field and the rule."""


class SynthRecord(BaseModel):
    """One synthesized example; `with_quantize` chooses the 3-line or the THOUGHT+SLIP-only answer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    instruction: str = Field(min_length=1)
    thought: str = Field(min_length=1)
    src: str
    dst: str
    anchor: str
    payload: tuple[str, ...] = ()
    with_quantize: bool = True

    @field_validator("instruction", "thought")
    @classmethod
    def _one_line_text(cls, value: str, info) -> str:
        if value != value.strip() or "\n" in value:
            raise ValueError(f"{info.field_name} must be one trimmed line")
        return value

    @field_validator("src", "dst")
    @classmethod
    def _agent_id(cls, value: str, info) -> str:
        if not AGENT_ID.match(value):
            raise ValueError(f"{info.field_name} {value!r} is not an agent id ([A-Za-z0-9._-]{{1,64}})")
        return value

    @field_validator("anchor")
    @classmethod
    def _known_anchor(cls, value: str) -> str:
        if value not in UCR_ANCHORS:
            raise ValueError(f"unknown anchor {value!r}")
        return value

    @field_validator("payload")
    @classmethod
    def _payload_tokens(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for token in value:
            if not PAYLOAD_TOKEN.match(token):
                raise ValueError(f"payload token {token!r} has characters outside the wire profile")
        return value

    def message(self) -> SlipMessage:
        return SlipMessage(self.src, self.dst, self.anchor, self.payload)

    def answer(self) -> str:
        """The TQT answer in the dataset's exact layout (checked by the strict parser)."""
        text = format_tqt(self.thought, self.message(), with_quantize=self.with_quantize)
        parse_tqt(text)  # cannot fail given the field validators; checked so a protocol change shows here
        return text

    def to_sharegpt(self, system_prompt: str = SYSTEM_PROMPT_BASIC) -> dict:
        """A row shaped like data/slipstream-tqt.jsonl."""
        return {"conversations": [{"from": "system", "value": system_prompt},
                                  {"from": "human", "value": self.instruction},
                                  {"from": "gpt", "value": self.answer()}]}


def validate_record(obj: dict) -> SynthRecord:
    """Strictly validate a raw record (e.g. parsed LLM JSON).

    Raises:
        RecordError: '<field>: <rule>' for every broken rule, one per line.
    """
    try:
        return SynthRecord.model_validate(obj)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in e['loc']) or '<record>'}: {e['msg']}" for e in exc.errors()]
        raise RecordError("\n".join(lines)) from None

