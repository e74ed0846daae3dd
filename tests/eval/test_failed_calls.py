"""Evaluation failures are loud: failed calls are counted apart from wrong answers and fail the evaluation
above `eval.max_failed_calls`, naming the count; the predictions stay on disk to read."""

import json
from pathlib import Path

import pytest
from prefect import flow

from receivers import FlakyChatServer
from tasks.data.evalfile import prompt_messages
from tasks.eval.measure import measure_llm_baseline
from tasks.eval.runners import FailedCalls, check_failed_calls
from tasks.names import artifact_key
from tasks.recipe import BaselineConfig, EvalConfig, Recipe
from tasks.run import RunFolder, atomic_write_jsonl, new_run_dir, read_jsonl

KEY = "sk-flaky-0123456789"


@flow(name="baseline-only")
def baseline_only(run_dir: str, recipe: Recipe) -> dict:
    return measure_llm_baseline(Path(run_dir), recipe)


def _run_with_rows(tmp_path, rows, name: str) -> RunFolder:
    run = RunFolder(new_run_dir(tmp_path, name))
    atomic_write_jsonl(run.split("test"), rows)
    return run


def _recipe(block: str, **eval_fields) -> Recipe:
    return Recipe(name="flaky", eval=EvalConfig(max_new_tokens=8, **eval_fields),
                  baseline=BaselineConfig(source="block", block=f"openai-compatible-endpoint/{block}", concurrency=4))


def test_tolerance_counts_failed_calls_only():
    check_failed_calls("m", [None, "HTTP 500", None], 1)
    with pytest.raises(FailedCalls, match=r"^m: 2 of 3 calls failed \(tolerance 1\); first: HTTP 500$"):
        check_failed_calls("m", ["HTTP 500", None, "timeout"], 1)


def test_an_endpoint_failing_a_fifth_of_the_calls_fails_the_run_naming_the_count(tmp_path, tiny_rows):
    from blocks.llm import OpenAICompatibleEndpoint

    rows = tiny_rows[:10]
    failing = {prompt_messages(r)[-1]["content"] for r in rows[:2]}   # 20% of the calls, on every attempt
    with FlakyChatServer(KEY, failing) as server:
        OpenAICompatibleEndpoint(base_url=server.url + "/v1", model="m", api_key=KEY).save("flaky", overwrite=True)
        run = _run_with_rows(tmp_path, rows, "strict")
        state = baseline_only(str(run), _recipe("flaky"), return_state=True)
        assert state.is_failed()
        assert "llm: 2 of 10 calls failed (eval.max_failed_calls is 0; every call in" in state.message
        assert "first: HTTP 500" in state.message
        assert all(server.calls[p] == 4 for p in failing)   # each failed call was retried (EVAL_RETRIES) first
        records = read_jsonl(run.predictions("llm"))
        assert sum(1 for r in records if r["call_error"]) == 2 and len(records) == 10
        assert json.loads(run.eval_metrics("llm").read_text())["failed_calls"] == 2

        # Within the recipe's tolerance the evaluation goes on, and the count is still reported.
        tolerant = _run_with_rows(tmp_path, rows, "tolerant")
        summary = baseline_only(str(tolerant), _recipe("flaky", max_failed_calls=2))
        assert summary["failed_calls"] == 2 and summary["rows"] == 10

    # Rows done per model were shown as a progress artifact while it ran.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        [bar] = [a for a in client.read_artifacts() if a.key == artifact_key("eval-llm", tolerant.name)]
    assert bar.type == "progress" and float(bar.data) == 100.0 and bar.description == "eval llm: 10/10 rows"


@pytest.mark.integration
def test_a_crashed_llama_server_is_restarted_inside_the_evaluation(tmp_path, tiny_rows):
    import signal

    from tasks.eval.runners import llama_cpp_runner, requests_from_rows
    from tasks.models.bootstrap import embedded_gguf_path

    with llama_cpp_runner(embedded_gguf_path(), tmp_path / "server.log", "gguf", 4) as runner:
        first_pid = runner.server.process.pid
        runner.server.process.send_signal(signal.SIGKILL)   # a crash between two evaluations' calls
        runner.server.process.wait()
        answers = runner.run(requests_from_rows(tiny_rows[:2]))
        assert [a.error for a in answers] == [None, None] and all(a.completion_tokens for a in answers)
        assert runner.server.restarts == 1 and runner.server.process.pid != first_pid
