import json

import pytest

from tasks.data.dedupe import remove_duplicates
from tasks.data.prepare import (DatasetError, load_chat_examples, load_datafactory_examples, load_examples,
                               split_examples)
from tasks.data.rows import normalise
from tasks.recipe import DataConfig
from conftest import ASSETS, REPO


def test_published_dataset_loads_and_validates():
    examples = load_examples(REPO / "data" / "slipstream-tqt.jsonl")
    assert len(examples) == 2283
    unique, report = remove_duplicates(examples)
    removed = report["exact_duplicates"]["removed"] + report["near_duplicates"]["removed"]
    assert removed == len(examples) - len(unique) and report["exact_duplicates"]["removed"] > 0


def test_line_that_is_not_json_is_named(tmp_path):
    lines = (ASSETS / "slipstream-tiny.jsonl").read_text().splitlines()
    lines.insert(3, '{"conversations": [oops')
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"^{bad}:4: not valid JSON"):
        load_examples(bad)


def test_answer_that_breaks_the_protocol_is_named(tmp_path):
    row = json.loads((ASSETS / "slipstream-tiny.jsonl").read_text().splitlines()[0])
    row["conversations"][-1]["value"] = "THOUGHT: hm\nSLIP: SLIP v1 a b NotAnAnchor"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(DatasetError, match=rf"{bad}:1: assistant answer .* unknown anchor"):
        load_examples(bad)


@pytest.mark.parametrize("loader, good", [
    (load_examples, {"conversations": [{"from": "human", "value": "u"},
                                       {"from": "gpt", "value": "THOUGHT: t\nSLIP: SLIP v1 a b RequestReview"}]}),
    (load_datafactory_examples, {"instruction": "s", "input": "u",
                                 "output": "THOUGHT: t\nSLIP: SLIP v1 a b RequestReview"}),
    (load_chat_examples, {"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}),
])
def test_every_line_format_names_its_file_line_and_field_and_keeps_its_provenance(tmp_path, loader, good):
    """The line-based formats share one reader: blank lines skipped, each row's provenance the file's name,
    and the first bad line named file:line with the rule it broke."""
    src = tmp_path / "rows.jsonl"
    src.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
    examples = loader(src)
    assert [(e.prompt, e.line, e.source) for e in examples] == [("u", 1, "rows.jsonl"), ("u", 3, "rows.jsonl")]
    src.write_text(json.dumps(good) + "\n" + json.dumps({"nothing": "here"}) + "\n")
    with pytest.raises(DatasetError, match=rf"^{src}:2: "):
        loader(src)
    src.write_text("\n")
    with pytest.raises(DatasetError, match=rf"^{src}: no rows$"):
        loader(src)
    with pytest.raises(DatasetError, match="dataset file not found"):
        loader(tmp_path / "missing.jsonl")


def test_split_is_seeded_and_shares_no_prompt():
    examples, _ = remove_duplicates(load_examples(REPO / "data" / "slipstream-tqt.jsonl"))
    cfg = DataConfig(val_ratio=0.05, test_ratio=0.1, seed=7)
    first, second = split_examples(examples, cfg), split_examples(examples, cfg)
    assert [e.prompt for e in first["test"]] == [e.prompt for e in second["test"]]
    prompts = {name: {normalise(e.prompt) for e in part} for name, part in first.items()}
    assert not prompts["train"] & prompts["test"]
    assert not prompts["train"] & prompts["val"]
    assert not prompts["val"] & prompts["test"]
    assert sum(len(p) for p in first.values()) == len(examples)
    other = split_examples(examples, DataConfig(seed=8))
    assert [e.prompt for e in other["test"]] != [e.prompt for e in first["test"]]
