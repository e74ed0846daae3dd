"""Duplicate, near-duplicate and contamination removal, and how data preparation reports it."""

import json
import random

from tasks.data.dedupe import NearIndex, eval_prompts_from_file, jaccard, remove_contaminated, remove_duplicates, word_set
from tasks.data.prepare import load_examples, prepare_cache_key, prepare_splits
from tasks.data.rows import Example
from tasks.recipe import DataConfig, ModelConfig, Recipe
from tasks.release.report import render_report
from conftest import ASSETS, REPO


def _row(prompt: str, answer_of: dict) -> str:
    row = json.loads(json.dumps(answer_of))
    row["conversations"][1]["value"] = prompt
    return json.dumps(row)


def test_planted_duplicates_and_eval_prompt_are_removed_and_reported(tmp_path):
    lines = (ASSETS / "slipstream-tiny.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    prompts = [r["conversations"][1]["value"] for r in rows]
    planted_eval = "Ping the on-call SRE: the payment webhooks are failing in production"
    planted = [
        _row("  " + prompts[2].upper() + "  ", rows[0]),            # line 13: exact duplicate after normalising
        _row(prompts[4] + " today", rows[4]),                       # line 14: near duplicate (one word more)
        _row(planted_eval.lower() + ".", rows[5]),                  # line 15: an evaluation prompt
    ]
    source = tmp_path / "source.jsonl"
    source.write_text("\n".join(lines + planted) + "\n")
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"messages": [{"role": "user", "content": planted_eval},
                                                  {"role": "assistant", "content": "x"}]}) + "\n")
    cfg = DataConfig(source=str(source), eval_files=[str(eval_file)], test_ratio=0.2, val_ratio=0.0)
    stats = prepare_splits.fn(cfg, ModelConfig().system_prompt)["stats"]
    assert stats["source_rows"] == 15
    assert (stats["duplicates_removed"], stats["near_duplicates_removed"], stats["contaminated_removed"]) == (1, 1, 1)
    assert stats["dedupe"]["exact_duplicates"]["examples"][0]["line"] == 13
    assert stats["dedupe"]["exact_duplicates"]["examples"][0]["duplicate_of_line"] == 3
    assert stats["dedupe"]["near_duplicates"]["examples"][0] | {"jaccard": None} == {
        "line": 14, "near_line": 5, "jaccard": None, "prompt": prompts[4] + " today", "near_prompt": prompts[4]}
    assert stats["contamination"]["by_source"] == {str(eval_file): 1}
    assert stats["contamination"]["examples"][0]["line"] == 15
    assert stats["train_rows"] + stats["test_rows"] == 12


def test_a_training_row_matching_a_test_prompt_is_removed_and_reported():
    examples = load_examples(ASSETS / "slipstream-tiny.jsonl")
    test_prompts = [examples[0].prompt, "something else entirely"]
    near_copy = Example(examples[0].prompt.rstrip(".") + " please", examples[0].answer, examples[0].anchor, 99)
    kept, report = remove_contaminated(examples[1:] + [near_copy], {"test split": test_prompts})
    assert near_copy not in kept and len(kept) == len(examples) - 1
    assert report["removed"] == 1 and report["by_source"] == {"test split": 1}
    assert report["examples"][0]["line"] == 99 and report["examples"][0]["jaccard"] >= 0.9


def test_prefix_filtered_index_finds_exactly_the_pairs_brute_force_finds():
    prompts = [e.prompt for e in load_examples(REPO / "data" / "slipstream-tqt.jsonl")][:400]
    rng = random.Random(0)
    for p in prompts[:100]:   # plant variants at a spread of similarities around the threshold
        words = p.split()
        del words[rng.randrange(len(words))]
        prompts.append(" ".join(words))
    sets = [word_set(p) for p in prompts]
    rank = {w: i for i, w in enumerate(sorted({w for s in sets for w in s}))}
    index = NearIndex(0.9, rank)
    found = set()
    for i, s in enumerate(sets):
        match = index.best_match(s)
        if match:
            found.add(i)
        index.add(s, i)
    brute = {i for i, s in enumerate(sets) if any(jaccard(s, sets[j]) >= 0.9 for j in range(i))}
    assert found == brute and len(brute) > 50


def test_eval_prompts_are_read_from_verify_files_and_chat_files(tmp_path):
    verify = eval_prompts_from_file(REPO / "data" / "gerbil-verify.jsonl")
    assert verify and all(isinstance(p, str) and p for p in verify)
    sharegpt = eval_prompts_from_file(ASSETS / "slipstream-tiny.jsonl")
    assert sharegpt[0] == json.loads((ASSETS / "slipstream-tiny.jsonl").read_text().splitlines()[0])[
        "conversations"][1]["value"]


def test_report_has_a_data_section_with_what_was_removed(tmp_path):
    examples = load_examples(REPO / "data" / "slipstream-tqt.jsonl")
    _, dup = remove_duplicates(examples)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stats.json").write_text(json.dumps({
        "source_rows": 2283, "duplicates_removed": dup["exact_duplicates"]["removed"],
        "near_duplicates_removed": dup["near_duplicates"]["removed"], "contaminated_removed": 2,
        "contamination": {"by_source": {"data/gerbil-verify.jsonl": 2}}, "dedupe": dup,
        "train_rows": 480, "val_rows": 43, "test_rows": 200}))
    row = {"anchor_accuracy": 0.5, "strict_parse": 0.5, "src_dst_accuracy": 0.1, "anchor_loose": 0.5,
           "rows": 10, "runner": "x", "tokens_per_second": 1.0}
    text = render_report(Recipe(name="x"), tmp_path, {"base": row}, [], {"mask": {}}, {}, {})
    assert "## Data" in text
    assert f"| exact duplicate prompts removed | {dup['exact_duplicates']['removed']} |" in text
    assert f"| near duplicates removed (Jaccard ≥ 0.9) | {dup['near_duplicates']['removed']} |" in text
    assert "| training rows matching an eval prompt removed | 2 (data/gerbil-verify.jsonl: 2) |" in text


def test_prepare_cache_key_follows_eval_files(tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text(json.dumps({"prompt": "a", "keywords": ["b"]}) + "\n")
    key = lambda cfg: prepare_cache_key(None, {"cfg": cfg, "system_prompt": "s"})  # noqa: E731
    plain, with_eval = key(DataConfig()), key(DataConfig(eval_files=[str(eval_file)]))
    eval_file.write_text(json.dumps({"prompt": "changed", "keywords": ["b"]}) + "\n")
    assert len({plain, with_eval, key(DataConfig(eval_files=[str(eval_file)]))}) == 3
