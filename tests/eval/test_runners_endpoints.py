"""Endpoint runners address Azure OpenAI's two URL styles and send the right headers (checked by a local
server that refuses what Azure refuses), send native structured-output / tool fields when asked, and parse
native tool calls."""

import pytest
from pydantic import SecretStr

from blocks.llm import AzureOpenAIEndpoint, OpenAICompatibleEndpoint
from receivers import AzureOpenAIServer
from tasks.data.evalfile import load_eval_file, to_chat_row
from tasks.eval.metrics import score_row
from tasks.eval.runners import (LLAMA_CPP_GREEDY, EndpointError, EndpointRunner, Request, requests_from_rows,
                               served_model_runner)

from conftest import REPO

ASK = [Request("r1", [{"role": "user", "content": "Weather in Lisbon?"}])]


@pytest.fixture
def azure():
    with AzureOpenAIServer() as server:
        yield server


def test_deployment_style_url_api_version_and_api_key_header(azure):
    block = AzureOpenAIEndpoint(endpoint=azure.url, deployment="gpt-4o-mini", api_key=SecretStr("azure-test-key"),
                                api_version="2024-10-21")
    [answer] = EndpointRunner(block, "llm", 32).run(ASK)
    assert answer.text == '{"city": "Lisbon"}' and (answer.prompt_tokens, answer.completion_tokens) == (42, 7)
    [req] = azure.requests
    assert req["path"] == "/openai/deployments/gpt-4o-mini/chat/completions"
    assert req["query"] == {"api-version": ["2024-10-21"]}
    assert req["headers"]["api-key"] == "azure-test-key" and "authorization" not in req["headers"]
    assert req["body"]["temperature"] == 0.0 and req["body"]["max_completion_tokens"] == 32   # greedy by default
    assert "top_k" not in req["body"]   # hosted APIs reject unknown sampler fields


def test_v1_style_url_without_api_version(azure):
    block = AzureOpenAIEndpoint(endpoint=azure.url + "/openai/v1/", deployment="gpt-4o-mini",
                                api_key=SecretStr("azure-test-key"))
    assert block.endpoint == azure.url   # a URL pasted with the path is reduced to the resource root
    [answer] = EndpointRunner(block, "llm", 16).run(ASK)
    assert answer.text == '{"city": "Lisbon"}'
    [req] = azure.requests
    assert req["path"] == "/openai/v1/chat/completions" and req["query"] == {}
    assert req["body"]["model"] == "gpt-4o-mini"
    assert req["headers"]["authorization"] == "Bearer azure-test-key"


def test_portal_deployment_url_is_accepted():
    block = AzureOpenAIEndpoint(endpoint="https://res.openai.azure.com/openai/deployments/gpt-4o-mini/",
                                deployment="gpt-4o-mini", api_key=SecretStr("k"), api_version="2024-10-21")
    assert block.endpoint == "https://res.openai.azure.com"
    with pytest.raises(ValueError, match="expected https://<resource>.openai.azure.com"):
        AzureOpenAIEndpoint(endpoint="res.openai.azure.com", deployment="d", api_key=SecretStr("k"))


@pytest.mark.parametrize("change, status", [({"api_key": SecretStr("wrong")}, "401"),
                                            ({"deployment": "gpt-5-nope"}, "404"),
                                            ({"api_version": "1999-01-01"}, "404")])
def test_configuration_errors_stop_the_evaluation_with_the_status(azure, change, status):
    fields = {"endpoint": azure.url, "deployment": "gpt-4o-mini", "api_key": SecretStr("azure-test-key"),
              "api_version": "2024-10-21"} | change
    with pytest.raises(EndpointError, match=rf"llm: AzureOpenAIEndpoint refused the request \({status}\)"):
        EndpointRunner(AzureOpenAIEndpoint(**fields), "llm", 16).run(ASK * 3)
    assert azure.requests   # it did reach the server: the error is the service's answer


def test_secret_key_is_never_in_the_block_repr():
    block = AzureOpenAIEndpoint(endpoint="https://r.openai.azure.com", deployment="d", api_key=SecretStr("s3cr3t"))
    assert "s3cr3t" not in repr(block) and "s3cr3t" not in str(block.model_dump())


def test_native_tool_calls_are_sent_and_parsed(azure):
    rows = [to_chat_row(r, "You call tools.") for r in load_eval_file(REPO / "data" / "fledgling-toolcall.jsonl",
                                                                       "toolcall")[:1]]
    assert rows[0]["expected"]["name"] == "get_weather"
    block = AzureOpenAIEndpoint(endpoint=azure.url, deployment="gpt-4o-mini", api_key=SecretStr("azure-test-key"),
                                api_version="2024-10-21")
    [answer] = EndpointRunner(block, "llm", 64, tool_calling="native").run(requests_from_rows(rows))
    sent = azure.requests[0]["body"]
    assert [t["function"]["name"] for t in sent["tools"]] == [t["name"] for t in rows[0]["tools"]]
    assert answer.tool_calls == [{"name": "get_weather", "arguments": '{"city": "Lisbon", "day": "today"}'}]
    scores = score_row(rows[0], answer.text, tool_calls=answer.tool_calls)
    assert scores["call_exact"] == 1.0 and scores["argument_f1"] == 1.0


def test_json_schema_mode_sends_response_format_and_extra_body(azure):
    rows = [to_chat_row(r, "JSON only.") for r in load_eval_file(REPO / "data" / "fledgling-structured.jsonl",
                                                                 "structured")[:1]]
    block = OpenAICompatibleEndpoint(base_url=azure.url + "/openai/v1", model="gpt-4o-mini",
                                     api_key=SecretStr("azure-test-key"), extra_body={"top_k": 1})
    EndpointRunner(block, "llm", 64, structured_output="json_schema").run(requests_from_rows(rows))
    sent = azure.requests[0]["body"]
    assert sent["response_format"]["type"] == "json_schema"
    assert sent["response_format"]["json_schema"]["schema"] == rows[0]["schema"]
    assert sent["top_k"] == 1   # extra_body fields are merged into the JSON body


def test_the_retry_policy_decides_whether_a_rate_limited_call_is_retried(azure):
    from fault_proxy import FaultProxy
    from tasks.llm_client import NO_RETRY, RetryPolicy

    quick = RetryPolicy(retries=5, base_s=0.01, max_s=0.05, jitter=0.0, max_wait_s=1.0)
    with FaultProxy(azure.url, fault_rate=0.5, seed=3, faults=("429",), retry_after=0.02) as proxy:
        block = OpenAICompatibleEndpoint(base_url=proxy.root + "/openai/v1", model="gpt-4o-mini",
                                         api_key=SecretStr("azure-test-key"))
        answers = EndpointRunner(block, "llm", 16, concurrency=1, retry=quick).run(ASK * 4)
        assert [a.text for a in answers] == ['{"city": "Lisbon"}'] * 4 and not any(a.error for a in answers)
        assert proxy.stats["fault_429"] > 0   # each one retried after the server's Retry-After
        assert proxy.stats["requests"] == 4 + proxy.stats["fault_429"] == len(azure.requests) + proxy.stats["fault_429"]
        proxy.fault_rate = 1.0
        failed = EndpointRunner(block, "llm", 16, retry=NO_RETRY).run(ASK * 3)   # recorded, counted by the caller
        assert [a.error for a in failed] == ["HTTP 429: Rate limit reached (injected)"] * 3


def test_a_served_model_runner_asks_the_servers_model_and_reports_its_own_name():
    runner = served_model_runner("http://127.0.0.1:9/v1", "slipway", 16, concurrency=2, label="gguf-q8_0",
                                 kind="llama.cpp server", model="model-q8_0.gguf")
    assert (runner.endpoint.model, runner.model, runner.label, runner.kind) == (
        "slipway", "model-q8_0.gguf", "gguf-q8_0", "llama.cpp server")
    assert runner.endpoint.extra_body == LLAMA_CPP_GREEDY   # llama.cpp's samplers made greedy
