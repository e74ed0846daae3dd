import pytest

from tasks.protocol import (DATASET_ANCHORS, UCR_ANCHORS, SlipMessage, SlipParseError, extract_slip_loose,
                            format_tqt, parse_slip, parse_tqt, quantize_hint)
from tasks.run import read_jsonl
from conftest import REPO


def dataset_answers():
    return [row["conversations"][-1]["value"] for row in read_jsonl(REPO / "data" / "slipstream-tqt.jsonl")]


def test_every_published_answer_parses_and_reformats_exactly():
    answers = dataset_answers()
    assert len(answers) == 2283
    anchors = set()
    for answer in answers:
        parsed = parse_tqt(answer)
        anchors.add(parsed.slip.anchor)
        if parsed.quantize_hint and not parsed.quantize_hint.startswith("ANCHOR="):
            # QUANTIZE hints are derived from UCR coordinates; our writer reproduces them byte for byte.
            assert format_tqt(parsed.thought, parsed.slip) == answer
    assert anchors == set(DATASET_ANCHORS)


def test_core_ucr_has_46_anchors_and_dataset_anchors_are_core():
    assert len(UCR_ANCHORS) == 46
    assert set(DATASET_ANCHORS) <= set(UCR_ANCHORS)
    assert quantize_hint("RequestReview") == "ACTION=request | DOMAIN=evaluation | URGENCY=normal | POLARITY=neutral"


@pytest.mark.parametrize("wire, rule", [
    ("SLIP v1 alice bob", "at least 5 tokens"),
    ("SLIP v2 alice bob RequestTask", "version must be 'v1'"),
    ("SLOP v1 alice bob RequestTask", "marker"),
    ("SLIP v1 alice bob RequestEverything", "unknown anchor"),
    ("SLIP v1 al|ce bob RequestTask", "src"),
    ("SLIP v1 alice bob RequestTask pay|load", "payload token"),
])
def test_parse_slip_rejects_with_the_rule(wire, rule):
    with pytest.raises(SlipParseError, match=rule):
        parse_slip(wire)


def test_parse_slip_round_trip():
    msg = parse_slip("SLIP v1 ml_engineer executor RequestTask artifact: model_v2.4.1")
    assert msg == SlipMessage("ml_engineer", "executor", "RequestTask", ("artifact:", "model_v2.4.1"))
    assert parse_slip(msg.wire()) == msg


@pytest.mark.parametrize("answer, rule", [
    ("", "empty"),
    ("SLIP: SLIP v1 a b RequestTask", "THOUGHT"),
    ("THOUGHT: x\nQUANTIZE: nonsense\nSLIP: SLIP v1 a b RequestTask", "QUANTIZE line"),
    ("THOUGHT: x\nQUANTIZE: [h] -> RequestPlan\nSLIP: SLIP v1 a b RequestTask", "differs"),
    ("THOUGHT: x\nSLIP: SLIP v1 a b RequestTask\nSLIP: SLIP v1 a b RequestTask", "exactly one SLIP line"),
    ("THOUGHT: x\nSLIP v1 a b RequestTask", "must start with 'SLIP:'"),
])
def test_parse_tqt_is_strict(answer, rule):
    with pytest.raises(SlipParseError, match=rule):
        parse_tqt(answer)


def test_loose_extraction_finds_a_valid_message_in_prose():
    assert extract_slip_loose("blah SLIP v1 a b Nope\nok SLIP v1 a b MetaAck done").anchor == "MetaAck"
    assert extract_slip_loose("no message here") is None
