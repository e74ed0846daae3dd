"""Stages that wait on the outside world stop at the recipe's timeout, and the failure names the stage, the
limit and the recipe field (training's own timeout: tests/train/test_training_status.py)."""

import time
from pathlib import Path

import pytest
from prefect import flow

from receivers import FlakyChatServer
from tasks.recipe import BaselineConfig, EvalConfig, Recipe
from tasks.run import RunFolder, atomic_write_jsonl, new_run_dir, read_json
from tasks.timeouts import StageTimeout, stage_deadline


def test_a_deadline_interrupts_the_stage_in_the_main_thread():
    began = time.monotonic()
    with pytest.raises(StageTimeout, match=r"^stage 'export' timed out after 0.5s \(export.timeout_s: 0.5\)$"):
        with stage_deadline("export", 0.5, "export.timeout_s"):
            time.sleep(5)
    assert time.monotonic() - began < 2
    with stage_deadline("export", 5, "export.timeout_s"):   # a stage within its limit is left alone
        time.sleep(0.1)


def test_a_slow_endpoint_fails_the_evaluation_stage_with_its_name(tmp_path, tiny_rows):
    from blocks.llm import OpenAICompatibleEndpoint
    from tasks.eval.measure import measure_llm_baseline

    run = RunFolder(new_run_dir(tmp_path, "slow"))
    atomic_write_jsonl(run.split("test"), tiny_rows[:4])
    recipe = Recipe(name="slow", eval=EvalConfig(max_new_tokens=8, timeout_s=1),
                    baseline=BaselineConfig(source="block", block="openai-compatible-endpoint/slow", concurrency=1))

    @flow(name="slow-eval")
    def slow_eval(run_dir: str):
        return measure_llm_baseline(Path(run_dir), recipe)

    with FlakyChatServer("sk-slow-1234", delay_s=1.5) as slow:
        OpenAICompatibleEndpoint(base_url=slow.url + "/v1", model="m", api_key="sk-slow-1234").save("slow",
                                                                                                      overwrite=True)
        state = slow_eval(str(run), return_state=True)
    assert state.is_failed()
    assert "stage 'eval-llm' timed out after 1s (eval.timeout_s: 1)" in state.message
    assert read_json(run.timings)["eval-llm"]["status"] == "failed"
