"""Template synthesis: 2,000 distinct valid examples fast, seeded, honest about capacity."""

import json
import random
import time

import pytest
import yaml

from tasks.data.dedupe import remove_duplicates
from tasks.data.prepare import load_examples
from tasks.data.rows import Example, normalise
from tasks.protocol import DATASET_ANCHORS, parse_tqt, quantize_hint
from tasks.synth.records import SYSTEM_PROMPT_BASIC
from tasks.synth.templates import (TEMPLATES_PATH, TemplateError, generator_fingerprint, load_spaces, main, render,
                                   synth_cache_key, synthesize, synthesize_from_templates)
from conftest import REPO


def test_2000_distinct_valid_examples_over_all_anchors_in_well_under_a_minute(tmp_path):
    start = time.time()
    records = synthesize(2000, 42)
    assert time.time() - start < 60
    prompts = [normalise(r.instruction) for r in records]
    assert len(records) == 2000 and len(set(prompts)) == 2000
    out = tmp_path / "synth.jsonl"
    out.write_text("".join(json.dumps(r.to_sharegpt()) + "\n" for r in records))
    examples = load_examples(out)   # the project's own loader: shape + strict TQT parse of every answer
    assert {e.anchor for e in examples} == set(DATASET_ANCHORS)
    for record in records:
        parsed = parse_tqt(record.answer())
        assert (parsed.slip.src, parsed.slip.dst, parsed.slip.anchor) == (record.src, record.dst, record.anchor)
        if parsed.quantize_hint is not None:
            assert parsed.quantize_hint == quantize_hint(record.anchor)
    without_quantize = sum(not r.with_quantize for r in records) / len(records)
    assert 0.17 < without_quantize < 0.27          # the dataset has 499/2283 = 21.9%
    # Distinct by normalised prompt is not enough to be useful: almost none are near-duplicates either.
    _, report = remove_duplicates([Example(r.instruction, r.answer(), r.anchor, i) for i, r in enumerate(records)])
    assert report["near_duplicates"]["removed"] <= 10


def test_rows_are_shaped_like_the_published_dataset():
    first = json.loads((REPO / "data" / "slipstream-tqt.jsonl").read_text().splitlines()[0])
    assert first["conversations"][0]["value"] == SYSTEM_PROMPT_BASIC
    row = synthesize(19, 1)[0].to_sharegpt()
    assert [t["from"] for t in row["conversations"]] == ["system", "human", "gpt"]
    assert row["conversations"][0]["value"] == SYSTEM_PROMPT_BASIC


def test_same_seed_same_examples_other_seed_other_examples():
    first, again, other = synthesize(300, 7), synthesize(300, 7), synthesize(300, 8)
    assert first == again
    assert [r.instruction for r in first] != [r.instruction for r in other]


def test_asking_beyond_capacity_raises_with_the_capacity():
    capacity = sum(s.capacity for s in load_spaces().values())
    assert capacity > 1_000_000
    with pytest.raises(TemplateError, match=f"asked for {capacity + 1} examples .* at most {capacity} distinct"):
        synthesize(capacity + 1, 42)


def _tiny_spec(tmp_path):
    """The real template file cut down to one phrasing, one value per slot, one agent (one mention) each way."""
    spec = yaml.safe_load(TEMPLATES_PATH.read_text())
    spec["speakers"] = spec["speakers"][:1]
    spec["addressed"] = spec["addressed"][:1]
    spec["agents"] = {agent: mentions[:1] for agent, mentions in spec["agents"].items()}
    for anchor in spec["anchors"].values():
        anchor["prompts"], anchor["direct"] = anchor["prompts"][:1], anchor["direct"][:1]
        anchor["src"], anchor["dst"] = ["architect"], ["backend"]
    spec["groups"] = {}
    for name, entries in spec["pools"].items():
        spec["pools"][name] = entries[:2] if name == "deadline" else entries[:1]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_capacity_is_exact_all_of_it_can_be_made_and_no_more(tmp_path):
    path = _tiny_spec(tmp_path)
    capacity = sum(s.capacity for s in load_spaces(path).values())
    # (speakerless + one named speaker) x1 phrasing, + one addressed header x1 direct phrasing, x1 value per
    # slot; RequestTask/RequestReview/RequestPlan/Fallback also vary the deadline (2 values): 3 * (19 + 4) = 69
    assert capacity == 69
    records = synthesize(capacity, 3, path)
    assert len({normalise(r.instruction) for r in records}) == capacity
    with pytest.raises(TemplateError, match=f"at most {capacity} distinct prompts"):
        synthesize(capacity + 1, 3, path)


def test_a_phrasing_that_skips_a_slot_is_rejected_with_file_line_and_field(tmp_path):
    text = TEMPLATES_PATH.read_text().replace('"Ask {dst} to {task}{when}."', '"Ask {dst} to {task}."', 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = text.splitlines().index('      - "Ask {dst} to {task}."') + 1
    with pytest.raises(TemplateError, match=rf"^{path}:{line}: anchors.RequestTask.prompts.0: must use exactly"):
        load_spaces(path)


def test_cli_writes_the_file_and_prints_counts_per_anchor(tmp_path, capsys):
    out = tmp_path / "x.jsonl"
    assert main(["-n", "120", "--seed", "5", "-o", str(out)]) == 0
    printed = capsys.readouterr().out
    assert len(out.read_text().splitlines()) == 120
    for anchor in DATASET_ANCHORS:
        assert anchor in printed
    assert "total                   120" in printed and "wrote" in printed
    assert main(["-n", str(10**12), "-o", str(tmp_path / "y.jsonl")]) == 2
    assert "at most" in capsys.readouterr().err and not (tmp_path / "y.jsonl").exists()


def test_task_returns_rows_and_cache_key_follows_the_generator(tmp_path):
    rows = synthesize_from_templates.fn(25, 3)
    assert rows == [r.to_sharegpt() for r in synthesize(25, 3)]
    changed = tmp_path / "t.yaml"
    changed.write_text(TEMPLATES_PATH.read_text().replace("billing service|", "invoicing service|"))
    assert generator_fingerprint(changed) != generator_fingerprint(TEMPLATES_PATH)
    keys = {synth_cache_key(None, {"n": n, "seed": s}) for n, s in ((25, 3), (25, 4), (26, 3))}
    assert len(keys) == 3 and all(generator_fingerprint() in k for k in keys)


def test_a_phrasing_that_opens_with_the_recipient_keeps_the_name_as_written():
    spaces = load_spaces()
    space = spaces["RequestTask"]
    party = next(p for p in space.unnamed if p.dst_mention == "dave")   # a lower-case name in the file
    fills = {name: values[0] for name, values in space.slots}
    opening = render(space, party, "{dst}, please {task}{when}.", fills, random.Random(0))
    assert opening.instruction.startswith("dave, please ") and opening.dst == "dave"
    inside = render(space, party, "ask {dst} to {task}{when}.", fills, random.Random(0))
    assert inside.instruction.startswith("Ask dave to ")   # other phrasings still start a sentence
    speaker = next(p for p in space.named() if p.dst_mention == "dave" and p.speaker.endswith(" here:"))
    assert render(space, speaker, "{dst}, please {task}{when}.", fills, random.Random(0)).instruction.split(
        " here: ")[1].startswith("dave, please ")


def test_an_addressed_prompt_names_both_ends_in_its_header_and_no_speaker_before_it(tmp_path):
    space = load_spaces()["RequestReview"]
    prompt = "{src} to {dst}: could you review {artifact}{when}?"
    assert prompt in space.addressed
    party = next(space.addressed_parties())
    fills = {name: values[0] for name, values in space.slots}
    record = render(space, party, prompt, fills, random.Random(0))
    assert record.instruction.startswith(f"{party.src_mention} to {party.dst_mention}: could you review ")
    assert (record.src, record.dst) == (party.src, party.dst) and record.src != space.default_src
    # Drawn at about ADDRESSED_RATE, each with a sender that is its SLIP src.
    headers = [h.split("{src}")[1].split("{dst}")[0] for h in yaml.safe_load(TEMPLATES_PATH.read_text())["addressed"]]
    records = synthesize(2000, 5)
    addressed = [r for r in records if any(r.instruction.lower().startswith(f"{r.src.lower().replace('_', ' ')}{h}")
                                           for h in headers)]
    assert 0.08 * len(records) < len(addressed) < 0.25 * len(records)
    # A direct phrasing is said to the recipient: naming {dst} in it is refused with file, line and field.
    text = TEMPLATES_PATH.read_text().replace('"could you review {artifact}{when}?"', '"{dst}, review {artifact}{when}"')
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    line = text.splitlines().index('      - "{dst}, review {artifact}{when}"') + 1
    with pytest.raises(TemplateError, match=rf"^{bad}:{line}: anchors.RequestReview.direct.0: must use exactly"):
        load_spaces(bad)
