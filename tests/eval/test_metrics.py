"""Metrics per task type on concrete answers, and the SLIP token comparison with the SLM's own tokenizer."""

import json

import pytest

from tasks.data.evalfile import load_eval_file, to_chat_row
from tasks.eval.metrics import aggregate, cost_per_1k_requests, score_row
from tasks.tasktypes.base import f1, parse_json_answer

from conftest import REPO


@pytest.fixture(scope="module")
def structured_row():
    rows = load_eval_file(REPO / "data" / "fledgling-structured.jsonl", "structured")
    return to_chat_row(next(r for r in rows if r.id == "order-01"), "JSON only.")


@pytest.fixture(scope="module")
def tool_row():
    rows = load_eval_file(REPO / "data" / "fledgling-toolcall.jsonl", "toolcall")
    return to_chat_row(next(r for r in rows if r.id == "assistant-02"), "Tools.")


def test_structured_scores(structured_row):
    gold = structured_row["expected"]
    assert gold == {"item": "hoodie", "quantity": 2, "size": "M", "express": False}
    perfect = score_row(structured_row, "```json\n" + json.dumps(gold) + "\n```")
    assert (perfect["valid_json"], perfect["schema_valid"], perfect["field_accuracy"], perfect["exact_match"]) == (1, 1, 1, 1)
    wrong = score_row(structured_row, '{"item": "hoodie", "quantity": "2", "size": "M", "express": true}')
    assert (wrong["valid_json"], wrong["schema_valid"], wrong["exact_match"]) == (1.0, 0.0, 0.0)
    assert wrong["field_accuracy"] == 0.5 and wrong["fields"] == {"item": 1, "quantity": 0, "size": 1, "express": 0}
    prose = score_row(structured_row, "Sure! Here is your order: hoodie x2")
    assert prose["valid_json"] == prose["field_accuracy"] == 0.0 and prose["error"] == "not JSON"


def test_toolcall_scores(tool_row):
    assert tool_row["expected"] == {"name": "get_weather",
                                    "arguments": {"city": "Oslo", "day": "tomorrow", "unit": "fahrenheit"}}
    exact = score_row(tool_row, json.dumps(tool_row["expected"]))
    assert exact["call_exact"] == exact["argument_f1"] == exact["arguments_valid"] == 1.0
    partial = score_row(tool_row, '{"name": "get_weather", "arguments": {"city": "Oslo", "day": "today"}}')
    assert (partial["name_accuracy"], partial["call_exact"]) == (1.0, 0.0)
    assert partial["argument_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    wrong_tool = score_row(tool_row, '{"name": "set_timer", "arguments": {"minutes": 5}}')
    assert (wrong_tool["valid_call"], wrong_tool["name_accuracy"], wrong_tool["argument_f1"]) == (1.0, 0.0, 0.0)
    native = score_row(tool_row, "", tool_calls=[{"name": "get_weather", "arguments": json.dumps(
        tool_row["expected"]["arguments"])}])
    assert native["call_exact"] == 1.0
    assert score_row(tool_row, "I will check the weather.")["valid_call"] == 0.0


def test_keyword_scores():
    row = {"task": "keyword", "messages": [{"role": "user", "content": "?"}], "keywords": [":std/iter", "in-hash"]}
    assert score_row(row, "(import :STD/iter) ...")["keyword_recall"] == 0.5
    assert score_row(row, "use :std/iter and in-hash")["keyword_pass"] == 1.0


def test_slipstream_scores_and_token_reduction_with_the_slm_tokenizer(tiny_rows, base_model_dir):
    from tasks.eval.measure import token_counter

    count = token_counter(str(base_model_dir))
    row = tiny_rows[0]
    gold = row["messages"][-1]["content"]
    perfect = score_row(row, gold, count)
    assert perfect["strict_parse"] == perfect["anchor_accuracy"] == perfect["payload_f1"] == 1.0
    tokens = perfect["tokens"]
    assert tokens["instruction"] == count(row["messages"][-2]["content"]) and 0 < tokens["slip"] < tokens["json"]
    broken = score_row(row, gold.replace("SLIP v1", "SLIP v9"), count)
    assert broken["strict_parse"] == 0.0 and "tokens" not in broken and "version" in broken["error"]
    assert broken["gold_tokens"] == tokens   # the gold message is measured on every row
    scored = [score_row(r, r["messages"][-1]["content"], count) for r in tiny_rows]
    summary = aggregate("slipstream", scored, [{"latency_s": 1.0, "prompt_tokens": 10, "completion_tokens": 5}] * 12, 6.0)
    t = summary["slip_tokens"]
    assert t["rows"] == 12 and t["reduction_vs_json"] == round(1 - t["slip"] / t["json"], 4) > 0.3
    assert summary["gold_slip_tokens"] == t   # every answer was the gold one
    assert summary["anchor_accuracy"] == 1.0 and set(summary["per_anchor"]) == {r["anchor"] for r in tiny_rows}
    assert summary["requests_per_second"] == 2.0 and summary["latency_p50_s"] == 1.0


def test_cost_per_1k_requests():
    summary = {"mean_prompt_tokens": 200, "mean_completion_tokens": 50, "requests_per_second": 2.0}
    llm = cost_per_1k_requests(summary, 0.15, 0.60)
    assert llm["usd_per_1k_requests"] == pytest.approx(1000 * (200 * 0.15 + 50 * 0.60) / 1e6)
    slm = cost_per_1k_requests(summary, usd_per_hour=0.36)
    assert slm["usd_per_1k_requests"] == pytest.approx(500 / 3600 * 0.36)
    assert cost_per_1k_requests(summary)["usd_per_1k_requests"] is None


def test_helpers():
    assert parse_json_answer(' {"a": 1} ') == (True, {"a": 1}) and parse_json_answer("{a}") == (False, None)
    assert f1([], []) == 1.0 and f1(["a", "b"], ["a"]) == pytest.approx(2 / 3)
