"""Dataset formats: exact round trips of the vendored dataset, and validators that name file, line, rule."""

import json

import pytest

from tasks.data.formats import FORMATS, Conversation, FormatError, main, read_file, validate_file, write_record
from tasks.synth.records import SYSTEM_PROMPT_BASIC
from conftest import REPO

DATASET = REPO / "data" / "slipstream-tqt.jsonl"


@pytest.fixture(scope="module")
def canonical() -> list[Conversation]:
    return read_file(DATASET, "sharegpt")


def _write(path, rows) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_round_trips_the_vendored_dataset_exactly(fmt, canonical, tmp_path):
    path = tmp_path / f"{fmt}.jsonl"
    _write(path, [write_record(c, fmt) for c in canonical])
    # prompt/completion has no system field: the system prompt rides at the start of `prompt`.
    back = read_file(path, fmt, system_prompt=SYSTEM_PROMPT_BASIC if fmt == "together-pc" else None)
    assert back == canonical
    assert validate_file(path, fmt) == 2283
    again = "".join(json.dumps(write_record(c, "sharegpt"), ensure_ascii=False) + "\n" for c in back)
    assert again.encode() == DATASET.read_bytes()


def test_prompt_completion_without_the_system_prompt_keeps_it_inline(canonical, tmp_path):
    path = tmp_path / "pc.jsonl"
    _write(path, [write_record(canonical[0], "together-pc")])
    (conv,) = read_file(path, "together-pc")
    assert [m.role for m in conv.messages] == ["user", "assistant"]
    assert conv.messages[0].content.startswith(SYSTEM_PROMPT_BASIC + "\n\n")


GOOD_MESSAGES = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                              {"role": "assistant", "content": "a"}]}
GOOD = {
    "together": GOOD_MESSAGES, "messages": GOOD_MESSAGES, "together-pc": {"prompt": "u", "completion": "a"},
    "sharegpt": {"conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]},
    "sharegpt-roles": {"conversations": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
    "alpaca": {"instruction": "u", "input": "", "output": "a"},
    "datafactory": {"instruction": "s", "input": "u", "output": "a"},
}
_turns = lambda *roles: [{"role": r, "content": r[0]} for r in roles]  # noqa: E731

BAD = [
    ("together", {**GOOD_MESSAGES, "anchor": "RequestTask"}, "together.extra-column"),
    ("together", {"messages": _turns("user", "user", "assistant")}, "together.alternation"),
    ("together", {"messages": _turns("assistant", "user")}, "together.alternation"),
    ("together", {"messages": _turns("user", "system", "assistant")}, "together.system-first"),
    ("together", {"messages": _turns("system", "user")}, "together.assistant"),
    ("together", {"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]},
     "together.content"),
    ("together", {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a", "weight": 2}]},
     "together.weight"),
    ("together", {"messages": [{"role": "user", "content": "u"},
                               {"role": "assistant", "content": "a", "weight": True}]}, "together.weight"),
    ("together", {"messages": _turns("user", "robot")}, "together.role"),
    ("together", {"prompt": "u", "completion": "a"}, "together.one-format"),
    ("together", {"messages": []}, "together.shape"),
    ("together-pc", {"prompt": "u", "completion": "a", "id": 3}, "together-pc.extra-column"),
    ("together-pc", {"prompt": "u", "completion": 5}, "together-pc.shape"),
    ("sharegpt", {"conversations": [{"role": "user", "content": "u"}]}, "sharegpt.turn"),
    ("sharegpt", {"conversations": [{"from": "bot", "value": "u"}]}, "sharegpt.role"),
    ("sharegpt-roles", {"conversations": [{"from": "human", "value": "u"}]}, "sharegpt-roles.turn-keys"),
    ("messages", {"messages": _turns("user")}, "messages.assistant"),
    ("alpaca", {"instruction": "u"}, "alpaca.shape"),
    ("alpaca", {"instruction": "u", "output": "a", "history": [["only one"]]}, "alpaca.history"),
    ("datafactory", {"input": "u", "output": "a", "system": "s"}, "datafactory.shape"),
]


@pytest.mark.parametrize("fmt, bad, rule", BAD, ids=[f"{f}-{r}" for f, _, r in BAD])
def test_validator_names_file_line_and_rule(fmt, bad, rule, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD[fmt]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(FormatError, match=rf"^{path}:2: {rule}: "):
        validate_file(path, fmt)


def test_broken_json_is_named_with_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD["together"]) + "\n\n" + '{"messages": [\n')
    with pytest.raises(FormatError, match=rf"^{path}:3: not valid JSON"):
        validate_file(path, "together")


def test_what_a_format_cannot_carry_is_refused_unless_dropping_is_asked_for():
    conv = Conversation(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                                  {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                                  {"role": "assistant", "content": "a2"}], extra={"anchor": "Accept"})
    with pytest.raises(FormatError, match="together-pc.cannot-carry: 2 earlier turns"):
        write_record(conv, "together-pc")
    assert write_record(conv, "together-pc", on_loss="drop") == {"prompt": "s\n\nu2", "completion": "a2"}
    with pytest.raises(FormatError, match=r"together.cannot-carry: extra keys \['anchor'\]"):
        write_record(conv, "together")
    assert write_record(conv, "messages")["anchor"] == "Accept"        # OpenAI chat rows may carry it
    alpaca = write_record(conv, "alpaca")
    assert alpaca["history"] == [["u1", "a1"]] and alpaca["system"] == "s"


def test_cli_converts_to_together_and_validates(tmp_path, capsys):
    out = tmp_path / "together.jsonl"
    assert main(["convert", str(DATASET), str(out), "--to", "together"]) == 0
    assert main(["validate", str(out), "--format", "together"]) == 0
    assert "2283 rows pass the together rules" in capsys.readouterr().out
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": _turns("user", "user", "assistant")}) + "\n")
    assert main(["validate", str(bad), "--format", "together"]) == 1
    assert f"{bad}:1: together.alternation" in capsys.readouterr().err
