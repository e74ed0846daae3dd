"""`slipway verify`: the verify prompts of an eval file asked of any OpenAI-compatible server, pass/fail
per prompt (seed 003's verify_model.py). Against a real llama-server on the embedded SmolLM2 GGUF."""

import json

import pytest
from typer.testing import CliRunner

from conftest import REPO
from flows.cli import app
from tasks.eval.verify import render_lines

VERIFY = REPO / "data" / "gerbil-verify.jsonl"


def test_a_bad_verify_file_stops_before_any_request(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"task": "keyword", "prompt": "q", "keywords": []}\n')
    result = CliRunner().invoke(app, ["verify", "--base-url", "http://127.0.0.1:9/v1", "--model", "m",
                                      "--eval-file", str(bad)])
    assert result.exit_code == 2 and f"{bad}:1:" in result.output


def test_render_lines_show_each_prompt_with_pass_or_fail_and_what_is_missing():
    lines = render_lines({"eval_file": "f", "model": "m", "base_url": "u", "passed": 1, "total": 2, "results": [
        {"prompt": "a | b", "passed": True, "missing": [], "error": None},
        {"prompt": "c", "passed": False, "missing": ["in-hash"], "error": None}]})
    assert "**1/2 passed** (50.0%)" in lines[0]
    assert lines[-3] == "| 1 | a \\| b | PASS |  |" and lines[-2] == "| 2 | c | FAIL | `in-hash` |"


@pytest.mark.integration
def test_verify_asks_every_prompt_of_a_served_model(tmp_path):
    from tasks.llamacpp.serve import ManagedLlamaServer
    from tasks.models.bootstrap import embedded_gguf_path

    out = tmp_path / "verify.json"
    with ManagedLlamaServer(embedded_gguf_path(), tmp_path / "server.log", alias="smol", parallel=2) as server:
        result = CliRunner().invoke(app, ["verify", "--base-url", server.base_url, "--model", "smol",
                                          "--eval-file", str(VERIFY), "--max-tokens", "48", "--json", str(out)])
    rows = [json.loads(line) for line in VERIFY.read_text().splitlines()]
    record = json.loads(out.read_text())
    assert record["total"] == len(rows) and [r["prompt"] for r in record["results"]] == [r["prompt"] for r in rows]
    assert all(r["answer"] and r["error"] is None for r in record["results"])
    for r, row in zip(record["results"], rows):   # pass/fail is the keyword rule, recomputed here
        assert r["passed"] == all(k.lower() in r["answer"].lower() for k in row["keywords"])
    assert result.exit_code == (0 if record["passed"] == record["total"] else 1)
    assert result.output.count("| PASS |") + result.output.count("| FAIL |") == len(rows)
