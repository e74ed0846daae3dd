"""No secret in any output. Every Block of the project that holds a SecretStr (found by walking blocks/ and
tasks/, so a new one is covered without an edit here) keeps its secret out of its repr, its stored Block
document, flow-run parameters and logs; and a planted key that servers echo back (LLM endpoints in
evaluation and synthesis, the Hub) and a planted Langfuse secret reach no Python or Prefect log, flow or
task state, artifact, persisted result, run-folder file or Langfuse payload.
"""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
from pathlib import Path

import pytest
from prefect import flow, get_run_logger
from prefect.blocks.core import Block
from pydantic import SecretStr

from receivers import EchoingHubServer, FlakyChatServer, LangfuseReceiver
from conftest import REPO

PLANTED = "sk-PLANTED-4f1c2a9e7b"


def _project_modules():
    """Every module of blocks/ and tasks/ that defines a Block (imported, so its classes register)."""
    for package in ("blocks", "tasks"):
        for info in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
            path = REPO / Path(*info.name.split(".")[:-1]) / (info.name.split(".")[-1] + ".py")
            if path.exists() and "(Block)" in path.read_text():
                yield importlib.import_module(info.name)


def _subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _subclasses(sub)


def secret_fields(cls) -> list[str]:
    return [name for name, f in cls.model_fields.items() if "SecretStr" in str(f.annotation)]


def secret_block_classes() -> list[type[Block]]:
    modules = {m.__name__ for m in _project_modules()}
    return sorted({c for c in _subclasses(Block) if c.__module__ in modules and secret_fields(c)},
                  key=lambda c: c.__name__)


# Values for required non-secret fields that validators accept; anything else gets a URL-looking string.
EXAMPLES = {"endpoint": "https://planted.openai.azure.com", "deployment": "d", "model": "m",
            "public_key": "pk-lf-planted", "base_url": "http://127.0.0.1:9/v1"}


def planted(cls) -> Block:
    fields = {name: EXAMPLES.get(name, "https://planted.example") for name, f in cls.model_fields.items()
              if f.is_required() and name not in secret_fields(cls)}
    return cls(**fields, **{name: SecretStr(PLANTED) for name in secret_fields(cls)})


def test_every_secret_block_of_the_project_is_found():
    names = {c.__name__ for c in secret_block_classes()}
    assert {"OpenAICompatibleEndpoint", "AzureOpenAIEndpoint", "LangfuseCredentials",
            "HuggingFaceHubCredentials"} <= names


@pytest.mark.parametrize("cls", secret_block_classes(), ids=lambda c: c.__name__)
def test_a_secret_block_keeps_its_secret_out_of_repr_documents_parameters_and_logs(cls):
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker

    block = planted(cls)
    name = f"planted-{cls.__name__.lower()}"
    block.save(name, overwrite=True)
    loaded = cls.load(name)
    assert [getattr(loaded, f).get_secret_value() for f in secret_fields(cls)] == [PLANTED] * len(secret_fields(cls))
    for text in (repr(loaded), str(loaded), loaded.model_dump_json(), json.dumps(loaded.model_dump(), default=str)):
        assert PLANTED not in text

    @flow(name="log-a-block", log_prints=True)
    def log_block(b: Block):
        get_run_logger().info("using %s / %r", b, b)
        print(b)
        return b.model_dump_json()

    state = log_block(loaded, return_state=True)
    assert state.is_completed()
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        doc = client.read_block_document_by_name(name, cls.get_block_type_slug(), include_secrets=False)
        logs = client.read_logs()
    assert PLANTED not in run.model_dump_json() and PLANTED not in doc.model_dump_json()
    assert logs and not [log.message for log in logs if PLANTED in log.message]


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))   # with tracebacks


@pytest.fixture
def every_log_line():
    collect = _Collect()
    names = ("", "prefect", "openai", "httpx", "httpx2", "httpcore", "huggingface_hub", "langfuse", "urllib3")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(collect)
        lg.setLevel(logging.DEBUG)
    yield collect.lines
    for lg, level in zip(loggers, levels):
        lg.removeHandler(collect)
        lg.setLevel(level)


def test_planted_keys_echoed_by_servers_reach_no_output(tmp_path, tiny_rows, every_log_line, capfd, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import get_current_settings

    from blocks.hub import HuggingFaceHubCredentials
    from blocks.llm import OpenAICompatibleEndpoint
    from blocks.tracing import LangfuseCredentials
    from flows.synthesize import synthesize
    from tasks import tracing
    from tasks.data.evalfile import prompt_messages
    from tasks.eval.fledgling import configure_tracing
    from tasks.eval.measure import measure_llm_baseline
    from tasks.recipe import BaselineConfig, EvalConfig, Recipe, ReleaseConfig
    from tasks.release.model_card import publish_release
    from tasks.run import RunFolder, atomic_write_jsonl, new_run_dir
    from tasks.synth.llm import SynthesisConfig

    import huggingface_hub.constants

    for var in ("LANGFUSE_PUBLIC_KEY", "LANGFUSE_SECRET_KEY", "LANGFUSE_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)   # the Hub here is 127.0.0.1
    rows = tiny_rows[:5]
    failing = {prompt_messages(rows[0])[-1]["content"]}
    run = RunFolder(new_run_dir(tmp_path / "runs", "planted"))
    atomic_write_jsonl(run.split("test"), rows)

    def recipe(block: str) -> Recipe:
        return Recipe(name="planted", eval=EvalConfig(max_new_tokens=8, max_failed_calls=5),
                      baseline=BaselineConfig(source="block", block=f"openai-compatible-endpoint/{block}",
                                              label=block),
                      release=ReleaseConfig(hub_model_repo="me/planted", hub_token_block="planted-hub"))

    @flow(name="planted-keys")
    def planted_keys(run_dir: str) -> dict:
        configure_tracing("planted-langfuse")
        states = {"echo500": measure_llm_baseline(Path(run_dir), recipe("echo500"), return_state=True),
                  "echo401": measure_llm_baseline(Path(run_dir), recipe("echo401"), return_state=True),
                  "hub": publish_release.with_options(retries=0)(Path(run_dir), recipe("echo500"), [],
                                                                  return_state=True)}
        return {k: (s.name, s.message) for k, s in states.items()}

    with FlakyChatServer(PLANTED, failing) as chat, FlakyChatServer("another-key", set()) as refusing, \
            EchoingHubServer() as hub, LangfuseReceiver(secret_key=PLANTED) as receiver:
        OpenAICompatibleEndpoint(base_url=chat.url + "/v1", model="m", api_key=PLANTED).save("echo500", overwrite=True)
        OpenAICompatibleEndpoint(base_url=refusing.url + "/v1", model="m", api_key=PLANTED).save("echo401",
                                                                                                  overwrite=True)
        HuggingFaceHubCredentials(token=PLANTED, endpoint=hub.url).save("planted-hub", overwrite=True)
        LangfuseCredentials(public_key=receiver.public_key, secret_key=PLANTED, base_url=receiver.url).save(
            "planted-langfuse", overwrite=True)
        tracing.reset()
        state = planted_keys(str(run), return_state=True)
        synth = synthesize(config=SynthesisConfig(endpoint="openai-compatible-endpoint/echo401", n=2, batch_size=2,
                                                  max_retries=0, max_tokens=8),
                           output_dir=str(tmp_path / "synth"), return_state=True)
        tracing.flush()
        receiver.wait_for(lambda: len(receiver.generations()) >= 5)
        tracing.reset()
    outcomes = state.result()
    APILogWorker.drain_all(timeout=10)
    out, err = capfd.readouterr()

    # The servers really did echo the key, so every output below had the chance to leak it ...
    assert chat.calls and refusing.calls and hub.requests and hub.requests[0][2] == PLANTED
    assert outcomes["echo500"][0] == "Completed"
    assert outcomes["echo401"][0] == "Failed" and "Incorrect API key provided: ***" in outcomes["echo401"][1]
    assert outcomes["hub"][0] == "Failed" and "Invalid credentials in Authorization header (got ***)" in \
        outcomes["hub"][1]
    assert synth.is_completed()
    failed_call = [json.loads(line) for line in run.predictions("echo500").read_text().splitlines()][0]
    assert failed_call["call_error"].startswith("HTTP 500: backend failed for request with key ***")
    assert any(g["attributes"].get("langfuse.observation.level") == "ERROR" for g in receiver.generations())

    # ... and it is nowhere: Python logs, stdout/stderr, Prefect's logs, states, artifacts, results, files,
    # and what Langfuse received.
    assert every_log_line and not [line for line in every_log_line if PLANTED in line]
    assert PLANTED not in out and PLANTED not in err
    with get_client(sync_client=True) as client:
        objects = [*client.read_logs(), *client.read_artifacts(), *client.read_flow_runs(),
                   *client.read_task_runs()]
    assert objects and not [o for o in objects if PLANTED in o.model_dump_json()]
    storage = get_current_settings().results.local_storage_path
    files = [p for root in (tmp_path, storage) for p in root.rglob("*") if p.is_file()]
    assert run.predictions("echo500") in files and (tmp_path / "synth" / "responses.jsonl") in files
    assert not [p for p in files if PLANTED.encode() in p.read_bytes()]
    assert receiver.spans and PLANTED not in json.dumps([receiver.spans, receiver.scores], default=str)
