"""The synthesis record and its validation (shared by template and LLM synthesis; LLM repairs: test_synth_llm.py)."""

import pytest

from tasks.protocol import parse_tqt
from tasks.synth.records import RecordError, SynthRecord, validate_record

GOOD = {"instruction": "Ask QA to test the login flow", "thought": "QA owns testing", "src": "dev",
        "dst": "qa", "anchor": "RequestTask", "payload": ["login_flow", "priority:high"]}


def test_a_valid_record_renders_a_strict_tqt_answer():
    record = validate_record(GOOD)
    answer = record.answer()
    assert answer.splitlines()[1] == ("QUANTIZE: [ACTION=request | DOMAIN=task | URGENCY=elevated | "
                                      "POLARITY=neutral] -> RequestTask")
    assert parse_tqt(answer).slip.payload == ("login_flow", "priority:high")
    short = SynthRecord(**GOOD, with_quantize=False).answer()
    assert [line.split(":")[0] for line in short.splitlines()] == ["THOUGHT", "SLIP"]


@pytest.mark.parametrize("field, value, rule", [
    ("anchor", "RequestEverything", "anchor: Value error, unknown anchor"),
    ("src", "dev team", "src: Value error, src 'dev team' is not an agent id"),
    ("payload", ["a|b"], "payload: Value error, payload token 'a|b'"),
    ("thought", "two\nlines", "thought: Value error, thought must be one trimmed line"),
    ("instruction", "", "instruction: String should have at least 1 character"),
])
def test_validation_names_the_field_and_rule(field, value, rule):
    with pytest.raises(RecordError, match=rule):
        validate_record({**GOOD, field: value})

