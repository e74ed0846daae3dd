"""The Slipstream training mix (published rows + template rows that name their recipient) and the
hand-written eval file that measures generalisation: validity, routing, provenance, no leakage."""

import json
from collections import Counter

import pytest
import yaml

from tasks.data.evalfile import load_eval_file
from tasks.data.prepare import DatasetError, mix_lines, prepare_splits, synthetic_examples
from tasks.data.rows import normalise
from tasks.protocol import DATASET_ANCHORS, agent_id_as_written, names_agent, normalise_agent, parse_tqt
from tasks.recipe import DataConfig, load_recipe
from tasks.synth.templates import TEMPLATES_PATH, load_spaces, synthesize
from conftest import REPO

HANDWRITTEN = REPO / "data" / "slipstream-handwritten.jsonl"
PEOPLE = yaml.safe_load(TEMPLATES_PATH.read_text())["people"]


def test_every_template_row_is_strictly_valid_and_addressed_to_the_recipient_its_prompt_names():
    spaces = load_spaces()
    mentions = {m: agent for s in spaces.values() for m, agent in s.recipients}
    records = synthesize(600, 11)
    for r in records:
        answer = parse_tqt(r.answer())                      # the strict parser, as training rows are checked
        assert answer.slip.dst == r.dst and answer.slip.anchor == r.anchor
        named = [m for m in mentions if m in r.instruction and mentions[m] == r.dst]
        assert named, f"{r.instruction!r} does not name its dst {r.dst!r}"
    people = [r for r in records if normalise_agent(r.dst) in {normalise_agent(p) for p in PEOPLE}]
    assert len(people) > 0.6 * len(records)                 # named people/bots dominate the recipients
    for r in people:   # a person's id is the name as the prompt writes it: copying it is the skill taught
        assert names_agent(r.instruction, r.dst)
        assert f" {r.dst}" in f" {r.instruction}", (r.instruction, r.dst)   # the same characters, case included
    assert any(r.dst[0].isupper() for r in people) and any(r.dst[0].islower() for r in people)
    assert {r.anchor for r in records} == set(DATASET_ANCHORS)


def test_people_ids_are_their_names_as_written_and_a_clash_is_refused(tmp_path):
    spaces = load_spaces()
    dsts = {dst: mention for s in spaces.values() for mention, dst in s.recipients}
    srcs = {src: mention for s in spaces.values() for mention, src in s.sender_mentions}
    for name in PEOPLE:   # "Tobias" is written Tobias in the SLIP line and is the agent tobias
        assert dsts[agent_id_as_written(name)] == name
        assert normalise_agent(agent_id_as_written(name)) == normalise_agent(name)
    assert all(srcs[src] == src for src in srcs if normalise_agent(src) in {normalise_agent(p) for p in PEOPLE})
    bad = tmp_path / "bad.yaml"
    bad.write_text(TEMPLATES_PATH.read_text().replace("people: [Alice,", "people: [Backend, Alice,", 1))
    with pytest.raises(ValueError, match=r"bad.yaml:\d+: people.0: id 'backend'"):
        load_spaces(bad)


def test_the_mix_records_provenance_per_row_and_per_split():
    cfg = DataConfig(source="tests/assets/slipstream-tiny.jsonl", synth_rows=60, test_ratio=0.2, val_ratio=0.0)
    prepared = prepare_splits.fn(cfg, "sys")
    rows, stats = prepared["rows"], prepared["stats"]
    sources = Counter(r["source"] for part in rows.values() for r in part)
    assert set(sources) == {"slipstream-tiny.jsonl", "templates"} and sources["templates"] > 50
    for name, part in rows.items():
        mix = stats["mix"][name]
        assert sum(sum(c.values()) for c in mix.values()) == len(part)
        for r in part:
            assert mix[r["source"]][r["anchor"]] >= 1
    table = "\n".join(mix_lines(stats))
    assert "train: templates" in table and "test: slipstream-tiny.jsonl" in table and "60 rows asked" in table
    assert synthetic_examples(cfg)[0].source == "templates"


def test_synth_rows_are_refused_for_a_task_they_do_not_fit():
    cfg = DataConfig(source="data/fledgling-toolcall.jsonl", format="eval", synth_rows=10)
    with pytest.raises(DatasetError, match="synth_rows"):
        prepare_splits.fn(cfg, "sys", "toolcall")


def test_the_hand_written_file_is_valid_covers_every_anchor_and_names_unseen_recipients():
    rows = load_eval_file(HANDWRITTEN, "slipstream")      # strict: every expected answer parses
    assert 60 <= len(rows) <= 100
    golds = [parse_tqt(r.expected).slip for r in rows]
    per_anchor = Counter(g.anchor for g in golds)
    assert set(per_anchor) == set(DATASET_ANCHORS) and min(per_anchor.values()) >= 3
    for row, gold in zip(rows, golds):
        assert names_agent(row.prompt, gold.dst), f"{row.id}: the prompt does not name {gold.dst}"
    # Recipients the training templates never use: routing must generalise, not recall names.
    assert not {g.dst for g in golds} & {normalise_agent(p) for p in PEOPLE}
    assert len({normalise(r.prompt) for r in rows}) == len(rows)


def test_the_recipe_keeps_the_hand_written_prompts_out_of_training():
    recipe = load_recipe("slipstream")
    assert "data/slipstream-handwritten.jsonl" in recipe.data.eval_files and recipe.data.synth_rows > 0
    cfg = recipe.data.model_copy(update={"synth_rows": 300})
    prepared = prepare_splits.fn(cfg, recipe.model.system_prompt)
    assert prepared["stats"]["contamination"]["checked_against"]["data/slipstream-handwritten.jsonl"] == 76
    train = {normalise(r["messages"][-2]["content"]) for r in prepared["rows"]["train"]}
    hand = {normalise(json.loads(line)["prompt"]) for line in HANDWRITTEN.read_text().splitlines()}
    assert not train & hand
