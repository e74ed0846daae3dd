"""Traces lead back to the run: synthesis calls are traced like evaluation calls, and every observation
carries the Prefect flow run's id and UI link (as observation and trace metadata)."""

import json
from pathlib import Path

import pytest
from prefect import flow
from prefect.settings import PREFECT_UI_URL, temporary_settings

from receivers import FlakyChatServer
from tasks import tracing
from tasks.recipe import BaselineConfig, EvalConfig, Recipe
from tasks.run import RunFolder, atomic_write_jsonl, new_run_dir

KEY = "sk-trace-links-1234"


@pytest.fixture
def receiver(langfuse_receiver):
    """The shared receiver (tests/conftest.py), with a Prefect UI URL for the links."""
    with temporary_settings(updates={PREFECT_UI_URL: "http://prefect.example:4200"}):
        yield langfuse_receiver


def _links(span: dict) -> tuple:
    a = span["attributes"]   # metadata values arrive JSON-encoded
    return tuple(json.loads(a.get(f"langfuse.{key}", "null")) for key in (
        "observation.metadata.prefect_flow_run_id", "observation.metadata.prefect_flow_run_url",
        "trace.metadata.prefect_flow_run_id"))


def test_synthesis_and_evaluation_calls_are_traced_with_their_flow_run(receiver, tmp_path, tiny_rows):
    from blocks.llm import OpenAICompatibleEndpoint
    from flows.synthesize import synthesize
    from tasks.eval.measure import measure_llm_baseline
    from tasks.synth.llm import SynthesisConfig

    run = RunFolder(new_run_dir(tmp_path / "runs", "traced"))
    atomic_write_jsonl(run.split("test"), tiny_rows[:2])
    recipe = Recipe(name="traced", eval=EvalConfig(max_new_tokens=8),
                    baseline=BaselineConfig(source="block", block="openai-compatible-endpoint/trace-links"))

    @flow(name="eval-traced")
    def eval_traced(run_dir: str):
        return measure_llm_baseline(Path(run_dir), recipe)

    with FlakyChatServer(KEY, answer="[]") as chat:
        OpenAICompatibleEndpoint(base_url=chat.url + "/v1", model="m", api_key=KEY).save("trace-links", overwrite=True)
        synth = synthesize(config=SynthesisConfig(endpoint="openai-compatible-endpoint/trace-links", n=4,
                                                  batch_size=2, max_tokens=8),
                           output_dir=str(tmp_path / "synth-traced"), return_state=True)
        evaluated = eval_traced(str(run), return_state=True)
    assert synth.is_completed() and evaluated.is_completed()
    tracing.flush()
    receiver.wait_for(lambda: len(receiver.generations()) == 4)

    synth_id, eval_id = (str(s.state_details.flow_run_id) for s in (synth, evaluated))
    gens = receiver.generations()
    by_name = {name: [g for g in gens if g["name"] == name] for name in ("synthesize", "llm")}
    assert len(by_name["synthesize"]) == 2 and len(by_name["llm"]) == 2
    assert {g["trace_id"] for g in by_name["synthesize"]} == {tracing.trace_id_for("synth-traced")}
    for name, run_id in (("synthesize", synth_id), ("llm", eval_id)):
        for g in by_name[name]:
            assert _links(g) == (run_id, f"http://prefect.example:4200/runs/flow-run/{run_id}", run_id), g
    [span] = [s for s in receiver.spans if s["name"] == "eval llm"]
    assert _links(span)[0] == eval_id


    # Synthesis showed its batches as a progress artifact and its outcome as a table.
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        arts = [a for a in client.read_artifacts() if a.flow_run_id == synth.state_details.flow_run_id]
    [bar] = [a for a in arts if a.key == "synthesis-synth-traced"]
    assert float(bar.data) == 100.0 and bar.description.startswith("synthesis: 2/2 batches, 4 records asked for")
    [table] = [a for a in arts if a.key == "synthesis-counts"]
    assert "requested" in str(table.data) and "dropped" in str(table.data)
