"""The hand-written Gerbil Scheme Q&A set (seed 003) and its keyword-verify prompts."""

from tasks.data.dedupe import eval_prompts_from_file, remove_contaminated, remove_duplicates
from tasks.data.formats import read_file, validate_file
from tasks.data.rows import Example
from tasks.run import read_jsonl
from conftest import REPO

QA = REPO / "data" / "gerbil-qa.jsonl"
VERIFY = REPO / "data" / "gerbil-verify.jsonl"


def _examples():
    return [Example(c.messages[1].content, c.messages[2].content, "", i)
            for i, c in enumerate(read_file(QA, "together"), start=1)]


def test_qa_set_passes_together_rules_and_has_no_duplicate_questions():
    assert validate_file(QA, "together") >= 60
    for conv in read_file(QA, "together"):
        assert [m.role for m in conv.messages] == ["system", "user", "assistant"]
        assert "Gerbil" in conv.messages[1].content or "gerbil" in conv.messages[1].content
    kept, report = remove_duplicates(_examples())
    assert report["exact_duplicates"]["removed"] == report["near_duplicates"]["removed"] == 0


def test_verify_prompts_are_held_out_but_their_keywords_are_taught():
    rows = read_jsonl(VERIFY)
    assert len(rows) >= 10 and all(set(r) == {"prompt", "keywords"} and r["keywords"] for r in rows)
    _, report = remove_contaminated(_examples(), {"verify": eval_prompts_from_file(VERIFY)})
    assert report["removed"] == 0
    answers = " ".join(e.answer for e in _examples())
    assert [k for r in rows for k in r["keywords"] if k not in answers] == []
