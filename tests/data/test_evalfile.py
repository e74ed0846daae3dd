"""Eval files: the documented format loads, the shipped Fledgling datasets validate, a bad line is named."""

import json
import re

import pytest

from tasks.data.prepare import load_eval_examples, prepare_splits
from tasks.data.evalfile import EvalFileError, gold_answer, load_eval_file, prompt_messages, to_chat_row
from tasks.recipe import load_recipe

from conftest import REPO

STRUCTURED = {"task": "structured", "prompt": "Extract: Ana, 31",
              "schema": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                         "required": ["name", "age"]},
              "expected": {"name": "Ana", "age": 31}}
TOOL = {"name": "get_weather", "description": "Forecast.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def write(tmp_path, rows) -> str:
    path = tmp_path / "eval.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_documented_examples_are_valid_eval_rows(tmp_path):
    doc = (REPO / "docs" / "eval-file-format.md").read_text()
    blocks = re.findall(r"```jsonl\n(.*?)```", doc, re.DOTALL)
    assert len(blocks) >= 4
    for block in blocks:
        path = tmp_path / "doc.jsonl"
        path.write_text(block)
        rows = load_eval_file(path)
        assert rows and all(gold_answer(r) is not None or r.task == "keyword" for r in rows)


@pytest.mark.parametrize("name, task, count", [("fledgling-structured", "structured", 104),
                                                ("fledgling-toolcall", "toolcall", 100)])
def test_shipped_fledgling_datasets_validate(name, task, count):
    rows = load_eval_file(REPO / "data" / f"{name}.jsonl", task)
    assert len(rows) == count and len({r.id for r in rows}) == count
    assert len({r.prompt for r in rows}) == count   # no repeated request


@pytest.mark.parametrize("line, message", [
    ('{"task": "structured", "prompt": "x"', r":2: not valid JSON"),
    ({**STRUCTURED, "expected": {"name": "Ana", "age": "31"}}, r":2: .*'expected' does not match 'schema': '31' is not of type 'integer'"),
    ({**STRUCTURED, "schma": {}}, r":2: schma: unknown field"),
    ({k: v for k, v in STRUCTURED.items() if k != "prompt"}, r":2: .*exactly one of 'prompt'"),
    ({"task": "toolcall", "prompt": "Rain in Oslo?", "tools": [TOOL],
      "expected": {"name": "get_forecast", "arguments": {"city": "Oslo"}}}, r":2: .*'get_forecast' is not in 'tools'"),
    ({"task": "toolcall", "prompt": "Rain in Oslo?", "tools": [TOOL],
      "expected": {"name": "get_weather", "arguments": {}}}, r":2: .*'city' is a required property"),
    ({"task": "slipstream", "prompt": "Tell bob", "expected": "SLIP v1 a b RequestReview"}, r":2: .*not a valid TQT"),
    ({"task": "keyword", "prompt": "How?", "keywords": []}, r":2: .*non-empty list"),
    ([1, 2], r":2: a line must be a JSON object"),
])
def test_a_bad_line_is_rejected_naming_the_line(tmp_path, line, message):
    path = write(tmp_path, [STRUCTURED, line])
    with pytest.raises(EvalFileError, match=rf"^{re.escape(str(path))}{message}"):
        load_eval_file(path)


def test_task_mismatch_and_duplicate_ids_are_named(tmp_path):
    path = write(tmp_path, [{**STRUCTURED, "id": "a"}, {**STRUCTURED, "id": "a"}])
    with pytest.raises(EvalFileError, match=r":2: id 'a' already used on line 1"):
        load_eval_file(path)
    with pytest.raises(EvalFileError, match=r":1: task 'structured' but this evaluation is 'toolcall'"):
        load_eval_file(path, "toolcall")


def test_rows_may_omit_task_and_become_chat_rows(tmp_path):
    path = write(tmp_path, [{"prompt": "Rain in Oslo?", "tools": [{"type": "function", "function": TOOL}],
                             "expected": {"name": "get_weather", "arguments": {"city": "Oslo"}}}])
    [row] = load_eval_file(path, "toolcall")
    chat = to_chat_row(row, "You call tools.")
    system, user, gold = chat["messages"]
    assert system["content"].startswith("You call tools.\n\nYou can call one of these tools:\n")
    assert '"get_weather"' in system["content"] and user == {"role": "user", "content": "Rain in Oslo?"}
    assert json.loads(gold["content"]) == {"name": "get_weather", "arguments": {"city": "Oslo"}}
    assert prompt_messages(chat) == [system, user] and chat["id"] == "line-1"


def test_eval_format_trains_through_the_shared_split(tmp_path):
    recipe = load_recipe("fledgling-structured")
    examples = load_eval_examples(REPO / recipe.data.source, "structured")
    assert len(examples) == 104 and examples[0].row is not None
    prepared = prepare_splits.fn(recipe.data, recipe.model.system_prompt, recipe.task)
    test = prepared["rows"]["test"]
    assert len(test) == recipe.data.eval_rows
    assert all(r["task"] == "structured" and r["messages"][-1]["role"] == "assistant" for r in test)
    train_prompts = {r["messages"][-2]["content"] for r in prepared["rows"]["train"]}
    assert not train_prompts & {r["messages"][-2]["content"] for r in test}


def test_seed_003_verify_set_is_a_keyword_eval_file():
    rows = load_eval_file(REPO / "data" / "gerbil-verify.jsonl", "keyword")
    assert len(rows) == 12 and all(r.keywords and r.expected is None for r in rows)
