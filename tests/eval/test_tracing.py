"""Langfuse tracing against a local receiver that speaks Langfuse's ingestion API (OTLP spans + score batches).

With keys: every model call of an evaluation is a generation (model, input, output, usage, latency) under
the model's span in the run's trace, every row metric is a score on its generation and every aggregate a
score on the span. Without keys: nothing is sent and the evaluation still works.
"""

import json

import pytest

from receivers import LangfuseReceiver
from tasks import tracing
from tasks.models.bootstrap import embedded_gguf_path
from tasks.data.evalfile import load_eval_file, to_chat_row
from tasks.eval.measure import run_and_score
from tasks.tasktypes import task_type
from tasks.eval.runners import HFRunner, llama_cpp_runner

from conftest import REPO


@pytest.fixture
def receiver(langfuse_receiver):
    return langfuse_receiver


@pytest.fixture
def rows():
    return [to_chat_row(r, "You are a precise assistant. Reply with JSON only.")
            for r in load_eval_file(REPO / "data" / "fledgling-structured.jsonl", "structured")[:3]]


def test_traced_generation_api_for_other_flows(receiver):
    with tracing.traced_generation("synthesize", model="gpt-4o-mini", input=[{"role": "user", "content": "hi"}],
                                   run_name="synth-run") as gen:
        gen.end(output="hello", usage={"input": 5, "output": 2})
    with pytest.raises(RuntimeError):
        with tracing.traced_generation("synthesize", model="gpt-4o-mini", input="x", run_name="synth-run"):
            raise RuntimeError("provider down")
    tracing.score("rows_accepted", 0.75, run_name="synth-run")
    tracing.flush()
    receiver.wait_for(lambda: len(receiver.generations()) == 2 and receiver.scores)
    ok, failed = sorted(receiver.generations(), key=lambda s: s["start_ns"])
    attrs = ok["attributes"]
    assert ok["trace_id"] == failed["trace_id"] == tracing.trace_id_for("synth-run")
    assert attrs["langfuse.observation.model.name"] == "gpt-4o-mini"
    assert json.loads(attrs["langfuse.observation.usage_details"]) == {"input": 5, "output": 2, "total": 7}
    assert attrs["langfuse.observation.output"] == "hello"   # strings as they are, objects as JSON
    assert failed["attributes"]["langfuse.observation.level"] == "ERROR"
    assert "provider down" in failed["attributes"]["langfuse.observation.status_message"]
    [score] = receiver.scores
    assert (score["name"], score["value"], score["traceId"]) == ("rows_accepted", 0.75, ok["trace_id"])


@pytest.mark.integration
def test_every_call_is_a_generation_and_every_metric_a_score(receiver, rows, tmp_path, base_model_dir):
    hf = HFRunner(base_model_dir, "base", max_new_tokens=8, batch_size=2)
    base, _ = run_and_score(hf, rows, "trace-run")
    with llama_cpp_runner(embedded_gguf_path(), tmp_path / "server.log", "llm", 8) as runner:
        llm, _ = run_and_score(runner, rows, "trace-run", prices=(0.15, 0.6))
    tracing.flush()
    metrics = task_type("structured").metric_keys
    n_scores = 2 * (len(rows) * len(metrics) + len(metrics))
    receiver.wait_for(lambda: len(receiver.generations()) == 6 and len(receiver.scores) == n_scores)
    trace_id = tracing.trace_id_for("trace-run")
    spans = {s["span_id"]: s for s in receiver.spans}
    gens = receiver.generations()
    assert len(gens) == 2 * len(rows)
    for gen in gens:
        attrs = gen["attributes"]
        parent = spans[gen["parent_span_id"]]
        assert gen["trace_id"] == trace_id and parent["name"] == f"eval {gen['name']}"
        usage = json.loads(attrs["langfuse.observation.usage_details"])
        assert usage["input"] > 100 and 0 < usage["output"] <= 8 and usage["total"] == usage["input"] + usage["output"]
        assert json.loads(attrs["langfuse.observation.input"])["messages"][-1]["role"] == "user"
        assert gen["end_ns"] > gen["start_ns"]   # latency is the span's duration
    models = {g["name"]: g["attributes"]["langfuse.observation.model.name"] for g in gens}
    assert models == {"base": hf.model, "llm": embedded_gguf_path().name}
    llm_costs = [json.loads(g["attributes"]["langfuse.observation.cost_details"]) for g in gens if g["name"] == "llm"]
    assert all(c["input"] > 0 for c in llm_costs)
    gen_ids = {g["span_id"] for g in gens}
    row_scores = [s for s in receiver.scores if s.get("observationId") in gen_ids]
    assert len(row_scores) == 2 * len(rows) * len(metrics)
    span_scores = {(spans[s["observationId"]]["name"], s["name"]): s["value"] for s in receiver.scores
                   if s.get("observationId") not in gen_ids}
    assert span_scores[("eval base", "valid_json")] == base["valid_json"]
    assert span_scores[("eval llm", "field_accuracy")] == llm["field_accuracy"]


@pytest.mark.integration
def test_without_keys_nothing_is_sent_and_nothing_breaks(monkeypatch, rows, tmp_path):
    with LangfuseReceiver() as rec:
        monkeypatch.setenv("LANGFUSE_BASE_URL", rec.url)
        monkeypatch.delenv("LANGFUSE_PUBLIC_KEY", raising=False)
        monkeypatch.delenv("LANGFUSE_SECRET_KEY", raising=False)
        tracing.reset()
        with llama_cpp_runner(embedded_gguf_path(), tmp_path / "server.log", "llm", 8) as runner:
            summary, records = run_and_score(runner, rows, "untraced-run")
        tracing.score("decision", "keep-llm", run_name="untraced-run")
        tracing.flush()
        assert not tracing.enabled()
        assert summary["rows"] == 3 and len(records) == 3
    assert rec.requests == []


def test_keys_from_a_langfuse_credentials_block(monkeypatch):
    from pydantic import SecretStr

    from blocks.tracing import LangfuseCredentials

    for key in ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY", "LANGFUSE_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    with LangfuseReceiver(public_key="pk-lf-block", secret_key="sk-lf-block") as rec:
        tracing.reset()
        block = LangfuseCredentials(public_key="pk-lf-block", secret_key=SecretStr("sk-lf-block"), base_url=rec.url)
        assert "sk-lf-block" not in repr(block)
        assert tracing.configure(block)
        with tracing.traced_generation("g", model="m", input="x", run_name="block-run") as gen:
            gen.end(output="y", usage={"input": 1, "output": 1})
        tracing.flush()
        rec.wait_for(lambda: rec.generations())
        assert [g["name"] for g in rec.generations()] == ["g"]
    tracing.reset()
