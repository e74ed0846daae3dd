"""The synthesis record and its validation/repair hooks (shared by template and LLM synthesis)."""

import pytest

from tasks.protocol import parse_tqt
from tasks.synth.records import RecordError, SynthRecord, repair_record, validate_record

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


def test_repair_fixes_mechanical_slips_and_says_what_it_changed():
    raw = {**GOOD, "anchor": "request_task", "src": "Dev Team", "dst": "@qa", "thought": "QA owns\ntesting",
           "payload": "login|flow  priority:high"}
    fixed, notes = repair_record(raw)
    record = validate_record(fixed)
    assert (record.anchor, record.src, record.dst, record.thought) == ("RequestTask", "dev_team", "qa",
                                                                       "QA owns testing")
    assert record.payload == ("login_flow", "priority:high")
    assert len(notes) == 6 and notes[0] == "anchor 'request_task' -> 'RequestTask'"
    parse_tqt(record.answer())


def test_repair_leaves_what_it_cannot_fix_to_validation():
    fixed, notes = repair_record({**GOOD, "anchor": "PleaseDoIt"})
    assert notes == [] and fixed["anchor"] == "PleaseDoIt"
    with pytest.raises(RecordError, match="unknown anchor"):
        validate_record(fixed)
