"""LLM synthesis without a server: record repair, JSON extraction, retry timing, config, cache keys, accounting."""

import email.utils
import random
import subprocess
import sys
import time

import httpx2
import openai
import pytest
from pydantic import ValidationError

from blocks.llm import AzureOpenAIEndpoint, OpenAICompatibleEndpoint
from conftest import REPO
from tasks.data.prepare import load_examples
from tasks.llm_client import backoff_delay, endpoint_identity, parse_retry_after, to_request_error
from tasks.protocol import parse_tqt
from tasks.run import atomic_write_jsonl
from tasks.synth.llm import PROMPT_TEMPLATE, BatchSpec, SynthesisConfig, batch_cache_key, estimate_cost, plan_batches
from tasks.synth.repair import Drop, extract_items, repair_llm_record as repair_record
from tasks.synth.report import assemble_records

GOOD = {"instruction": "Ask the reviewer to check the auth module", "thought": "I need feedback first",
        "src": "developer", "dst": "reviewer", "anchor": "RequestReview", "payload": ["auth_module"]}


def test_a_valid_record_is_kept_unchanged_and_gets_its_quantize_line():
    rec = repair_record(dict(GOOD))
    assert rec.repairs == []
    assert rec.answer.splitlines() == [
        "THOUGHT: I need feedback first",
        "QUANTIZE: [ACTION=request | DOMAIN=evaluation | URGENCY=normal | POLARITY=neutral] -> RequestReview",
        "SLIP: SLIP v1 developer reviewer RequestReview auth_module"]
    assert parse_tqt(rec.answer).slip.anchor == "RequestReview"


@pytest.mark.parametrize("changes, repair, check", [
    ({"anchor": "request_review"}, "anchor: case/spacing fixed", lambda r: r.anchor == "RequestReview"),
    ({"anchor": " Request Review "}, "anchor: case/spacing fixed", lambda r: r.anchor == "RequestReview"),
    ({"anchor": "ack"}, "anchor: alias resolved", lambda r: r.anchor == "MetaAck"),
    ({"src": "data analyst"}, "agent id: spaces to underscores", lambda r: " data_analyst " in r.answer),
    ({"dst": "ops@team!"}, "agent id: invalid characters removed", lambda r: " opsteam " in r.answer),
    ({"payload": ["user@example.com", "50% done|now", "café"]}, "payload: token sanitized",
     lambda r: r.answer.endswith("user_example.com 50% done_now cafe")),
    ({"payload": {"env": "staging"}}, "payload: object flattened", lambda r: r.answer.endswith("env: staging")),
    ({"thought": "THOUGHT: line one\nline two"}, "thought: line breaks collapsed",
     lambda r: "THOUGHT: line one line two\n" in r.answer),
])
def test_mechanical_faults_are_repaired_and_the_result_parses(changes, repair, check):
    rec = repair_record({**GOOD, **changes})
    assert repair in rec.repairs
    assert check(rec), rec.answer
    parse_tqt(rec.answer)


def test_field_name_variants_are_normalised():
    raw = {"Instruction": GOOD["instruction"], "Thought": "ok", "source": "a", "destination": "b",
           "intent": "MetaAck"}
    rec = repair_record(raw)
    assert rec.repairs == ["field names normalised"]
    assert rec.answer.endswith("SLIP: SLIP v1 a b MetaAck")


def test_a_tqt_answer_without_quantize_gets_it_regenerated_from_the_anchor():
    raw = {"instruction": "Tell ops the deploy is done",
           "response": "THOUGHT: deploy finished\nSLIP: SLIP v1 deployer ops InformComplete deploy_v2"}
    rec = repair_record(raw)
    assert rec.repairs == ["QUANTIZE line regenerated"]
    assert parse_tqt(rec.answer).quantize_anchor == "InformComplete"


def test_a_wire_field_with_another_version_label_is_rebuilt_as_v1():
    rec = repair_record({"instruction": "Ack it", "thought": "got it", "wire": "SLIP v2 a b MetaAck done", "x": 1})
    assert rec.repairs == ["SLIP version set to v1"]
    assert rec.answer.endswith("SLIP: SLIP v1 a b MetaAck done")
    assert repair_record({**GOOD, "payload": [None, "x"]}).answer.endswith("RequestReview x")


@pytest.mark.parametrize("raw, reason", [
    ("just a string", "not an object"),
    ({**GOOD, "instruction": "  "}, "missing instruction"),
    ({k: v for k, v in GOOD.items() if k != "thought"}, "missing thought"),
    ({**GOOD, "anchor": "DoTheThing"}, "unknown anchor"),
    ({**GOOD, "anchor": None}, "missing anchor"),
    ({**GOOD, "dst": ""}, "missing src/dst"),
    ({**GOOD, "src": "!!!"}, "invalid agent id"),
    ({**GOOD, "payload": ["x" * 81]}, "payload token too long"),
    ({**GOOD, "payload": [["nested"]]}, "invalid payload"),
    ({"instruction": "x", "response": "THOUGHT: t\nQUANTIZE: [ACTION=request] -> RequestTask\n"
                                      "SLIP: SLIP v1 a b RequestReview"}, "QUANTIZE anchor differs from SLIP anchor"),
    ({"instruction": "x", "thought": "t", "wire": "SLIP v1 a"}, "SLIP line missing or too short"),
])
def test_records_that_need_judgement_are_dropped_with_a_reason(raw, reason):
    with pytest.raises(Drop, match=f"^{reason}$"):
        repair_record(raw)


def test_json_in_code_fences_with_trailing_commas_is_read():
    text = 'Here you go:\n```json\n[{"instruction": "a", "payload": ["x",],},\n {"instruction": "b"},]\n```'
    items, repairs = extract_items(text)
    assert [i["instruction"] for i in items] == ["a", "b"]
    assert repairs == ["json: code fence stripped", "json: trailing commas removed"]


def test_complete_records_are_salvaged_from_an_array_cut_at_max_tokens():
    text = '[{"instruction": "a", "anchor": "MetaAck"}, {"instruction": "b", "anchor": "Acc'
    items, repairs = extract_items(text)
    assert items == [{"instruction": "a", "anchor": "MetaAck"}]
    assert repairs == ["json: records salvaged from invalid JSON"]


@pytest.mark.parametrize("text, n", [('{"scenarios": [{"instruction": "a"}, {"instruction": "b"}]}', 2),
                                     ('{"instruction": "a", "anchor": "MetaAck"}', 1),
                                     ("I cannot produce JSON today.", 0), ("", 0)])
def test_json_shapes(text, n):
    assert len(extract_items(text)[0]) == n


def test_backoff_grows_exponentially_is_capped_and_never_undercuts_retry_after():
    rng = random.Random(0)
    no_jitter = [backoff_delay(r, None, 1.0, 8.0, 0.0) for r in range(1, 7)]
    assert no_jitter == [1, 2, 4, 8, 8, 8]
    assert backoff_delay(1, 30.0, 1.0, 8.0, 0.0) == 30.0          # Retry-After beats a shorter backoff
    jittered = [backoff_delay(3, None, 1.0, 8.0, 0.5, rng) for _ in range(200)]
    assert 4.0 <= min(jittered) and max(jittered) <= 6.0 and len(set(jittered)) > 100


def test_retry_after_header_forms():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= parse_retry_after({"retry-after": date}) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None


def _status_error(cls, status, body, headers=None):
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, request=request)
    return cls(f"Error code: {status} - {body}", response=response, body=body)


def test_api_errors_are_classified_and_an_echoed_key_is_redacted():
    key = "sk-test-PLANTED-123"
    auth = to_request_error(_status_error(openai.AuthenticationError, 401,
                                          {"error": {"message": f"Incorrect API key provided: {key}"}}), key)
    assert not auth.transient and auth.kind == "HTTP 401" and key not in str(auth) and "***" in str(auth)
    limited = to_request_error(_status_error(openai.RateLimitError, 429, {"error": {"message": "slow down"}},
                                             {"retry-after": "3"}), key)
    assert limited.transient and limited.retry_after == 3.0
    assert to_request_error(_status_error(openai.InternalServerError, 503, None), key).transient
    request = httpx2.Request("POST", "http://127.0.0.1:1/v1/chat/completions")
    assert to_request_error(openai.APITimeoutError(request), key).kind == "timeout"


def test_config_is_validated_before_any_work(tmp_path):
    with pytest.raises(ValidationError, match="endpoint must be"):
        SynthesisConfig(endpoint="my-key-block")
    with pytest.raises(ValidationError, match="extra_forbidden|Extra inputs"):
        SynthesisConfig(endpoint="openai-compatible-endpoint/x", batchsize=3)
    with pytest.raises(ValidationError, match="greater than 0"):
        SynthesisConfig(endpoint="openai-compatible-endpoint/x", n=0)
    bad = tmp_path / "bad.txt"
    bad.write_text("Write some scenarios about $topic")
    with pytest.raises(ValidationError, match=r"needs \$count"):
        SynthesisConfig(endpoint="openai-compatible-endpoint/x", prompt_template=str(bad))
    assert SynthesisConfig(method="templates").endpoint is None
    assert SynthesisConfig().endpoint is None   # the flow may be given a Block object instead


def test_cli_rejects_a_bad_config_with_one_message():
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "synthesize", "-n", "5"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--endpoint" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "synthesize", "-n", "-5", "--endpoint",
                           "openai-compatible-endpoint/x", "--set", "concurency=2"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "n\n  Input should be greater than 0" in proc.stderr and "concurency" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_batches_cover_n_with_distinct_prompts_and_seeds():
    specs = plan_batches.fn(SynthesisConfig(endpoint="openai-compatible-endpoint/x", n=60, batch_size=25))
    assert [(s.first, s.count) for s in specs] == [(0, 25), (25, 25), (50, 10)]
    assert "Write 10 different" in specs[2].prompt
    assert len({s.prompt for s in specs}) == 3 and len({s.seed for s in specs}) == 3


def test_cache_key_ignores_the_key_and_n_but_not_model_template_or_sampling(tmp_path):
    cfg = SynthesisConfig(endpoint="openai-compatible-endpoint/x", n=50, batch_size=25)
    spec = plan_batches.fn(cfg)[0]
    block = OpenAICompatibleEndpoint(provider="deepseek", model="deepseek-chat", api_key="sk-one")

    def key(spec=spec, block=block, cfg=cfg):
        return batch_cache_key(None, {"spec": spec, "endpoint": block, "cfg": cfg})

    assert key() == key(block=block.model_copy(update={"api_key": "sk-two"}))
    assert key() == key(cfg=cfg.model_copy(update={"n": 500}))              # batch 0 is the same request
    assert key() != key(block=block.model_copy(update={"model": "deepseek-reasoner"}))
    assert key() != key(cfg=cfg.model_copy(update={"temperature": 0.2}))
    template = tmp_path / "t.txt"
    template.write_text(PROMPT_TEMPLATE + "\nKeep instructions short.\n")
    changed = plan_batches.fn(cfg.model_copy(update={"prompt_template": str(template)}))[0]
    assert key() != key(spec=changed)
    azure = AzureOpenAIEndpoint(endpoint="https://r.openai.azure.com", deployment="gpt4o", api_key="k",
                                api_version="2024-10-21")
    assert endpoint_identity(azure) == {"provider": "azure", "base_url": "https://r.openai.azure.com",
                                        "model": "gpt4o", "api_version": "2024-10-21"}


def _spec(index, count, prompt="p"):
    return BatchSpec(index=index, first=index * 4, count=count, seed=index, prompt=prompt)


def _ok(index, text, finish="stop", cached=False):
    return {"index": index, "text": text, "finish_reason": finish, "prompt_tokens": 10, "completion_tokens": 5,
            "retries": [{"cause": "HTTP 429"}], "cached": cached}


def test_every_requested_record_is_accounted_for_and_duplicates_are_dropped():
    import json

    rec = dict(GOOD)
    long = "Please ask the code reviewer to check the new auth module before the release"
    batch0 = json.dumps([rec, {**rec, "instruction": "ask THE reviewer  to check the auth module"},
                         {**rec, "instruction": "Other task", "anchor": "request_task"}, {"anchor": "x"},
                         {**rec, "instruction": "Copy  THE example"}])
    batch1 = '```json\n[' + json.dumps({**rec, "instruction": long}) + ", " + \
        json.dumps({**rec, "instruction": long + " today"}) + ',]\n```'
    specs = [_spec(0, 5, prompt='Answer like [{"instruction": "Copy the example", "thought": "t"}]'),
             _spec(1, 4), _spec(2, 4), _spec(3, 3)]
    outcomes = [_ok(0, batch0), _ok(1, batch1, finish="length"),
                {"index": 2, "error": "HTTP 429 after 5 retries", "retries": [{"cause": "HTTP 429"}] * 5,
                 "prompt_tokens": 0, "completion_tokens": 0, "cached": False},
                _ok(3, json.dumps([rec] * 5), cached=True)]
    result = assemble_records.fn(specs, outcomes, "llm:test/m", 0.9)
    assert result["counts"] == {"requested": 16, "kept": 1, "repaired": 2, "dropped": 13, "written": 3}
    assert result["dropped_by_reason"] == {"request failed: HTTP 429 after 5 retries": 4, "duplicate prompt": 4,
                                           "not returned (cut at max_tokens)": 2, "missing instruction": 1,
                                           "copies the prompt's example": 1,
                                           "near-duplicate prompt (Jaccard >= 0.9)": 1}
    assert result["repairs_by_kind"] == {"anchor: case/spacing fixed": 1, "json: code fence stripped": 1,
                                         "json: trailing commas removed": 1}
    assert result["surplus_ignored"] == 2
    assert result["retries"] == {"total": 7, "by_cause": {"HTTP 429": 7}}   # the cached batch's are not this run's
    assert result["tokens"]["prompt"] == 20 and result["tokens"]["cached_prompt"] == 10
    ledger = result["ledger"]
    assert [e["id"] for e in ledger] == sorted({e["id"] for e in ledger}) and len(ledger) == 16
    kept = [e for e in ledger if e["status"] != "dropped"]
    assert [result["rows"][e["row"]]["conversations"][1]["value"] for e in kept] == \
        [GOOD["instruction"], "Other task", long]
    assert all(r["conversations"][0]["from"] == "system" for r in result["rows"])


def test_rows_written_by_synthesis_load_as_a_dataset(tmp_path):
    import json

    text = json.dumps([GOOD, {**GOOD, "instruction": "Hand the deploy over to ops", "anchor": "handoff"}])
    result = assemble_records.fn([_spec(0, 2)], [_ok(0, text)], "llm:test/m", 0.9)
    atomic_write_jsonl(tmp_path / "synthetic.jsonl", result["rows"])
    examples = load_examples(tmp_path / "synthetic.jsonl")
    assert [e.anchor for e in examples] == ["RequestReview", "MetaHandoff"]


def test_cost_is_estimated_from_prompt_size_batches_and_block_prices_and_can_stop_a_run():
    from prefect.logging import disable_run_logger

    cfg = SynthesisConfig(endpoint="openai-compatible-endpoint/x", n=100, batch_size=25, max_tokens=1000)
    specs = plan_batches.fn(cfg)
    block = OpenAICompatibleEndpoint(provider="deepseek", model="deepseek-chat", input_cost_per_mtok=0.27,
                                     output_cost_per_mtok=1.10)
    with disable_run_logger():
        est = estimate_cost.fn(block, specs, cfg)
        assert est["batches"] == 4 and est["completion_tokens"] == 4 * 1000   # 25 x 70 capped at max_tokens
        assert est["prompt_tokens"] == sum(-(-len(s.prompt) // 4) for s in specs)
        assert est["usd"] == round((est["prompt_tokens"] * 0.27 + est["completion_tokens"] * 1.10) / 1e6, 4)
        with pytest.raises(ValueError, match="exceeds max_cost_usd"):
            estimate_cost.fn(block, specs, cfg.model_copy(update={"max_cost_usd": 0.001}))
