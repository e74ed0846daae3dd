"""A fifth task type is one module and one registry line: a toy `exact` type, defined here, goes through the
same eval-file validation, chat rows, run_and_score, aggregation and report section the flows use."""

import json

import pytest

from tasks.data.evalfile import EvalFileError, load_eval_file, to_chat_row
from tasks.eval.measure import run_and_score
from tasks.tasktypes import TASK_TYPES, task_type
from tasks.tasktypes.base import TaskType
from tasks.llm_client import Completion
from tasks.release.report import results_section


# ---- the whole toy task type: what a module tasks/tasktypes/exact.py would hold ----------------------
def check_exact_row(row) -> None:
    if not isinstance(row.expected, str) or not row.expected.strip():
        raise ValueError("exact: 'expected' must be the gold answer text")


def score_exact(row: dict, answer: str, tool_calls=None, count_tokens=None) -> dict:
    hit = answer.strip() == row["expected"]
    return {"exact": float(hit), "nonempty": float(bool(answer.strip())),
            "group": row["metadata"].get("topic", "other"), "error": None if hit else "wrong answer"}


EXACT = TaskType(name="exact", metrics=(("exact", "exact match"), ("nonempty", "answered")), primary_metric="exact",
                 check_row=check_exact_row, gold_answer=lambda row: row.expected, score=score_exact,
                 breakdown=("per_topic", "topic"))
# --------------------------------------------------------------------------------------------------------------


@pytest.fixture
def exact_type(monkeypatch):
    monkeypatch.setitem(TASK_TYPES, EXACT.name, EXACT)   # the one registry line
    return EXACT


class CannedRunner:
    """A model that answers from a table (by row id): the runner interface without a model behind it."""

    label, model, kind = "canned", "table", "canned"

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def run(self, requests, observer=None, progress=None):
        return [Completion(self.answers[r.row_id], latency_s=0.5, prompt_tokens=10, completion_tokens=2)
                for r in requests]


def write_eval_file(tmp_path, rows: list[dict]):
    path = tmp_path / "exact.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"id": "cap-fr", "task": "exact", "prompt": "Capital of France?", "expected": "Paris",
         "metadata": {"topic": "geography"}},
        {"id": "cap-pt", "task": "exact", "prompt": "Capital of Portugal?", "expected": "Lisbon",
         "metadata": {"topic": "geography"}},
        {"id": "two", "task": "exact", "prompt": "1 + 1?", "expected": "2", "metadata": {"topic": "maths"}},
        {"id": "three", "task": "exact", "prompt": "1 + 2?", "expected": "3", "metadata": {"topic": "maths"}}]


def test_a_toy_task_type_validates_scores_aggregates_and_reports(tmp_path, exact_type):
    rows = load_eval_file(write_eval_file(tmp_path, ROWS), "exact")
    chat = [to_chat_row(r, "Answer with the answer only.") for r in rows]
    assert chat[0]["messages"][-1] == {"role": "assistant", "content": "Paris"}   # its gold answer, trained on

    runner = CannedRunner({"cap-fr": "Paris", "cap-pt": "Porto", "two": " 2 ", "three": ""})
    summary, records = run_and_score(runner, chat, "toy-run")

    assert summary["task"] == "exact" and summary["rows"] == 4
    assert (summary["exact"], summary["nonempty"]) == (0.5, 0.75)
    assert summary["per_topic"] == {"geography": 0.5, "maths": 0.5}
    assert summary["errors"] == {"wrong answer": 2}
    assert summary["latency_p50_s"] == 0.5 and summary["generated_tokens"] == 8
    assert [r["exact"] for r in records] == [1.0, 0.0, 1.0, 0.0] and records[1]["answer"] == "Porto"

    report = "\n".join(results_section("exact", {"canned": summary}))
    assert "| model | runner | exact match | answered |" in report
    assert "### Accuracy per topic" in report and "| geography | 50.0% |" in report


def test_the_toy_task_types_row_rules_name_the_line(tmp_path, exact_type):
    path = write_eval_file(tmp_path, [ROWS[0], {**ROWS[1], "expected": ""}])
    with pytest.raises(EvalFileError, match=r":2: exact: 'expected' must be the gold answer text"):
        load_eval_file(path)


def test_an_unregistered_task_type_is_refused_with_the_registered_ones(tmp_path):
    with pytest.raises(EvalFileError, match=r":1: task: got 'exact'; allowed values: .*'toolcall'"):
        load_eval_file(write_eval_file(tmp_path, ROWS[:1]))
    with pytest.raises(KeyError, match="unknown task type 'exact'"):
        task_type("exact")
