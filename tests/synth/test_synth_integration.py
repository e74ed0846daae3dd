"""LLM synthesis against a real llama.cpp server (the embedded SmolLM2 GGUF) behind the fault-injecting proxy.

SmolLM2-135M rarely writes usable JSON and answers are cut short here (max_tokens 32, for CPU time), so
most records end up dropped with a reason; what is tested is that every record is accounted for, retries
happen and are visible in Prefect, the cache prevents repeated requests, and the API key never leaks.
"""

import json
import logging
from collections import Counter

import pytest

from conftest import read_jsonl
from fault_proxy import FaultProxy
from flows.synthesize import synthesize
from tasks.data.prepare import load_examples
from tasks.data.rows import normalise
from tasks.llamacpp.serve import llama_server
from tasks.models.bootstrap import embedded_gguf_path
from tasks.protocol import parse_tqt
from tasks.synth.llm import PROMPT_TEMPLATE, SynthesisConfig

pytestmark = pytest.mark.integration

CLIENT_TIMEOUT_S = 45   # above a real 32-token answer on a busy 2-core CPU; the proxy's hang outlasts it
# Seeded fault sequence in arrival order for seed 51 at rate 0.3: timeout, ok, 429, ok, 500, ok, ok: each
# fault kind once in the 7 requests that 4 batches need (more if a real request is slow).
FAULT_SEED = 51
PLANTED_KEY = "sk-test-PLANTED-123"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with llama_server(embedded_gguf_path(), log, parallel=2) as server:
        yield server


def _upstream(server) -> str:
    return server.base_url.removesuffix("/v1")


def _report(out_dir) -> dict:
    return json.loads((out_dir / "synthesis-report.json").read_text())


def _config(block: str, **changes):
    endpoint = block if "/" in block else f"openai-compatible-endpoint/{block}"
    return SynthesisConfig(**{"endpoint": endpoint, "n": 200, "batch_size": 50,
                              "concurrency": 2, "max_retries": 6, "backoff_base_s": 0.2, "backoff_max_s": 2.0,
                              "max_tokens": 32, **changes})


def _task_runs_and_logs(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs reach the API in the background
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return runs, [log.message for log in logs]


def test_200_records_under_injected_faults_are_accounted_for_retried_and_cached(llama, tmp_path):
    from blocks.llm import OpenAICompatibleEndpoint

    with FaultProxy(_upstream(llama), fault_rate=0.3, seed=FAULT_SEED, retry_after=1,
                    hang_s=CLIENT_TIMEOUT_S + 5) as proxy:
        OpenAICompatibleEndpoint(base_url=proxy.url, model=llama.model, timeout_s=CLIENT_TIMEOUT_S,
                                 input_cost_per_mtok=0.27, output_cost_per_mtok=1.1).save("faulty-llama",
                                                                                          overwrite=True)
        cfg = _config("faulty-llama")
        state = synthesize(config=cfg, output_dir=str(tmp_path / "run1"), return_state=True)
        assert state.is_completed(), state.message
        report = _report(tmp_path / "run1")

        # Every requested record is kept, repaired or dropped with a reason, exactly once.
        c = report["counts"]
        assert c["requested"] == 200 == c["kept"] + c["repaired"] + c["dropped"]
        assert sum(report["dropped_by_reason"].values()) == c["dropped"]
        rows, ledger = read_jsonl(tmp_path / "run1" / "synthetic.jsonl"), read_jsonl(tmp_path / "run1" / "ledger.jsonl")
        assert len(ledger) == len({e["id"] for e in ledger}) == 200
        assert Counter(e["status"] for e in ledger) == Counter({k: c[k] for k in ("kept", "repaired", "dropped")})
        assert all(e["reason"] for e in ledger if e["status"] == "dropped")
        assert len(rows) == c["written"] == c["kept"] + c["repaired"]
        prompts = [normalise(r["conversations"][1]["value"]) for r in rows]
        assert len(prompts) == len(set(prompts))
        for row in rows:
            parse_tqt(row["conversations"][2]["value"])

        # Faults were injected and retried; each attempt is one request at the proxy.
        assert proxy.stats["fault_429"] and proxy.stats["fault_500"] and proxy.stats["fault_timeout"]
        assert report["batches"] == {"total": 4, "failed": 0, "from_cache": 0}
        assert report["retries"]["total"] > 0
        assert proxy.stats["requests"] == report["batches"]["total"] + report["retries"]["total"]
        assert {"HTTP 429", "HTTP 500", "timeout"} <= set(report["retries"]["by_cause"])
        assert report["tokens"]["prompt"] > 0 and report["estimate"]["usd"] > 0

        # Retries are visible in Prefect: task-run run counts and one log line per retry.
        runs, logs = _task_runs_and_logs(state.state_details.flow_run_id)
        batch_runs = [r for r in runs if r.name.startswith("request-batch-")]
        assert len(batch_runs) == 4
        assert sum(r.run_count - 1 for r in batch_runs) == report["retries"]["total"]
        assert sum("will start immediately" in m for m in logs) == report["retries"]["total"]
        assert any("HTTP 429" in m and "Retry-After 1s" in m for m in logs)
        assert any(m.startswith("Cost estimate for 200 records") for m in logs)

        # A re-run is answered from the cache: not one request reaches the proxy.
        proxy.reset_stats()
        state = synthesize(config=cfg, output_dir=str(tmp_path / "run2"), return_state=True)
        assert state.is_completed(), state.message
        assert proxy.stats["requests"] == 0
        rerun = _report(tmp_path / "run2")
        assert rerun["batches"]["from_cache"] == 4 and rerun["counts"] == report["counts"]
        assert rerun["tokens"]["prompt"] == 0 and rerun["retries"]["total"] == 0
        first, again = (tmp_path / run / "synthetic.jsonl" for run in ("run1", "run2"))
        assert again.read_text() == first.read_text()

        # A changed prompt template is a different request: batch 0 (same size and seed) is asked again.
        proxy.reset_stats()
        proxy.fault_rate = 0.0
        template = tmp_path / "prompt.txt"
        template.write_text(PROMPT_TEMPLATE + "\nKeep every instruction under twenty words.\n")
        state = synthesize(config=_config("faulty-llama", n=50, prompt_template=str(template)),
                           output_dir=str(tmp_path / "run3"), return_state=True)
        assert state.is_completed(), state.message
        assert proxy.stats["requests"] == 1 and _report(tmp_path / "run3")["batches"]["from_cache"] == 0


def test_an_azure_deployment_endpoint_works_through_the_same_interface(llama, tmp_path):
    from blocks.llm import AzureOpenAIEndpoint

    with FaultProxy(_upstream(llama), fault_rate=0.0, azure_paths=True) as proxy:
        AzureOpenAIEndpoint(endpoint=proxy.root, deployment=llama.model, api_key="azure-local",
                            api_version="2024-10-21", timeout_s=300).save("local-azure", overwrite=True)
        state = synthesize(config=_config("azure-openai-endpoint/local-azure", n=2, batch_size=2, max_tokens=16),
                           output_dir=str(tmp_path / "azure"), return_state=True)
    assert state.is_completed(), state.message
    assert proxy.paths == {f"/openai/deployments/{llama.model}/chat/completions": 1}
    report = _report(tmp_path / "azure")
    assert report["endpoint"]["provider"] == "azure" and report["tokens"]["completion"] > 0
    assert report["counts"]["requested"] == 2


def test_the_template_method_runs_the_template_generator_in_the_same_flow(tmp_path):
    state = synthesize(config=SynthesisConfig(method="templates", n=40, seed=3), output_dir=str(tmp_path / "t"),
                       return_state=True)
    assert state.is_completed(), state.message
    assert _report(tmp_path / "t")["counts"] == {"requested": 40, "kept": 40, "repaired": 0, "dropped": 0,
                                                 "written": 40}
    assert len(load_examples(tmp_path / "t" / "synthetic.jsonl")) == 40


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(self.format(record))  # with exception tracebacks


def test_a_planted_key_appears_in_no_log_artifact_or_output_file(llama, tmp_path, capfd):
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    from blocks.llm import AzureOpenAIEndpoint, OpenAICompatibleEndpoint

    collect = _Collect()
    loggers = [logging.getLogger(name) for name in ("", "prefect", "openai", "httpx", "httpx2", "httpcore")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(collect)
        lg.setLevel(logging.DEBUG)
    try:
        with FaultProxy(_upstream(llama), fault_rate=0.0) as ok, \
                FaultProxy(_upstream(llama), echo_key_401=True) as echo:
            given = OpenAICompatibleEndpoint(base_url=ok.url, model=llama.model, api_key=PLANTED_KEY, timeout_s=300)
            OpenAICompatibleEndpoint(base_url=echo.url, model=llama.model, api_key=PLANTED_KEY,
                                     timeout_s=300).save("planted-echo", overwrite=True)
            # One run with the Block object passed in, two with saved Blocks loaded by name.
            good = synthesize(config=_config("planted-ok", endpoint=None, n=2, batch_size=2, max_tokens=16, seed=7),
                              output_dir=str(tmp_path / "ok"), endpoint=given, return_state=True)
            bad = synthesize(config=_config("planted-echo", n=2, batch_size=2, max_tokens=16, seed=7),
                             output_dir=str(tmp_path / "echo"), return_state=True)
            AzureOpenAIEndpoint(endpoint=echo.root, deployment="gpt-4o-mini", api_key=PLANTED_KEY,
                                api_version="2024-10-21").save("planted-azure", overwrite=True)
            azure = synthesize(config=_config("azure-openai-endpoint/planted-azure", n=2, batch_size=2),
                               output_dir=str(tmp_path / "azure-echo"), return_state=True)
        assert good.is_completed() and bad.is_completed() and azure.is_completed()
        assert ok.stats["requests"] == 1 and echo.stats["requests"] == 2  # a 401 is not retried
        for name in ("echo", "azure-echo"):
            assert _report(tmp_path / name)["dropped_by_reason"] == {"request failed: HTTP 401 not retried": 2}
        flow_runs = [s.state_details.flow_run_id for s in (good, bad, azure)]
        api_logs = [m for fr in flow_runs for m in _task_runs_and_logs(fr)[1]]
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(collect)
            lg.setLevel(level)
    out, err = capfd.readouterr()

    # The key really went over the wire (both header forms) and came back in the server's error message ...
    assert echo.keys_seen == {("authorization", PLANTED_KEY), ("api-key", PLANTED_KEY)}
    assert any("Incorrect API key provided: ***" in line for line in collect.lines)
    # ... and shows up nowhere: process logs, stdout/stderr, Prefect's logs, artifacts, runs, files.
    assert not [line for line in collect.lines if PLANTED_KEY in line]
    assert PLANTED_KEY not in out and PLANTED_KEY not in err
    assert not [m for m in api_logs if PLANTED_KEY in m] and api_logs
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts()
        runs = [client.read_flow_run(fr) for fr in flow_runs]
        task_runs = client.read_task_runs()
    assert any(a.key == "synthesis-report" for a in artifacts)
    for obj in [*artifacts, *runs, *task_runs]:
        assert PLANTED_KEY not in obj.model_dump_json()
    storage = get_current_settings().results.local_storage_path
    files = [p for root in (tmp_path, storage) for p in root.rglob("*") if p.is_file()]
    assert len([p for p in files if p.name == "synthesis-report.json"]) == 3
    assert not [p for p in files if PLANTED_KEY.encode() in p.read_bytes()]
