"""The Together engine's parts that need no training: the official client against the local service's
files API (302 handshake, same-checksum reuse), the recipe's rules, the adapter checks, the price estimate,
job creation parameters, the remote failure path and the cancellation path (on a job that never trains
because the service is told to fail or is cancelled at once)."""

import io
import json
import tarfile
from pathlib import Path

import pytest
import zstandard

from conftest import REPO
from tasks.recipe import RecipeError, load_recipe
from tasks.together import engine
from tasks.together.local_service import LocalTogether, check_jsonl

KEY = "tgp_PLANTED_fast_0123456789abcdef"


@pytest.fixture
def service(tmp_path):
    # A model name mapped to a folder that is never trained on here (jobs in these tests do not train).
    # Jobs wait in the queue for the whole test unless a test lets them go (queue_s = 0).
    with LocalTogether(tmp_path / "svc", {"org/tiny": tmp_path}, api_key=KEY, queue_s=600) as svc:
        yield svc


@pytest.fixture
def recipe(service, monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", KEY)
    monkeypatch.setenv("TOGETHER_BASE_URL", service.url)
    return load_recipe("gerbil-local", {"together.model": "org/tiny"})


def _train_file(tmp_path, rows=4) -> Path:
    path = tmp_path / "together-train.jsonl"
    lines = [json.loads(line) for line in open(REPO / "data" / "gerbil-qa.jsonl")][:rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return path


def test_upload_uses_the_302_handshake_and_reuses_a_file_with_the_same_checksum(service, recipe, tmp_path):
    client = engine.make_client(recipe.together)
    first, reused_first = engine._upload(client, _train_file(tmp_path))
    second, reused_second = engine._upload(client, _train_file(tmp_path))
    assert (reused_first, reused_second) == (False, True)
    assert first["id"] == second["id"] and first["status"] == "COMPLETED"
    assert len(service.service.files) == 1
    assert service.service.file_blob(first["id"]).read_bytes() == _train_file(tmp_path).read_bytes()


def test_service_refuses_a_wrong_key_and_a_mixed_format_file(service, recipe, tmp_path):
    import together

    bad = together.Together(api_key="wrong", base_url=service.url, max_retries=0)
    with pytest.raises(together.AuthenticationError):
        bad.fine_tuning.list()
    assert check_jsonl(b'{"text": "a"}\n{"prompt": "p", "completion": "c"}\n')[0] is False
    assert check_jsonl(b'{"messages": [{"role": "user", "content": "q"}], "anchor": 1}\n')[3].startswith("line 1")


def test_submit_estimates_then_creates_once_and_a_second_submit_reattaches(service, recipe, tmp_path):
    run = _run_folder(tmp_path, recipe)
    files = engine.upload_training_files.fn(run, recipe, {"train": str(_train_file(tmp_path))})
    record = engine.submit_job.fn(run, recipe, files)
    again = engine.submit_job.fn(run, recipe, files)
    assert again["id"] == record["id"] and len(service.service.jobs) == 1
    assert record["estimate"]["estimation_available"] and record["estimate"]["estimated_total_price"] > 0
    job = service.service.jobs[record["id"]]
    assert job["training_type"] == {"type": "Lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                                    "lora_trainable_modules": ",".join(recipe.lora.target_modules)}
    assert job["training_method"]["train_on_inputs"] is False
    cfg = recipe.training
    assert (job["n_epochs"], job["batch_size"], job["learning_rate"]) == (cfg.epochs, cfg.batch_size, cfg.learning_rate)
    assert job["suffix"] == "gerbil-local"


def test_a_lost_create_answer_adopts_the_job_instead_of_creating_a_second(service, recipe, tmp_path):
    run = _run_folder(tmp_path, recipe)
    files = engine.upload_training_files.fn(run, recipe, {"train": str(_train_file(tmp_path))})
    first = engine.submit_job.fn(run, recipe, files)
    from tasks.run import RunFolder
    RunFolder(run).remote_job.unlink()        # as if the create's answer never arrived
    adopted = engine.submit_job.fn(run, recipe, files)
    assert adopted["id"] == first["id"] and len(service.service.jobs) == 1


def test_a_remotely_failing_job_fails_with_the_remote_message(service, recipe, tmp_path):
    service.service.fail_jobs, service.service.queue_s = True, 0
    service.service.models["org/tiny"] = Path("/nonexistent-base")   # the worker fails: a remote error
    run = _run_folder(tmp_path, recipe)
    files = engine.upload_training_files.fn(run, recipe, {"train": str(_train_file(tmp_path))})
    record = engine.submit_job.fn(run, recipe, files)
    with pytest.raises(engine.RemoteTrainingError, match=r"error: training process exited"):
        engine.wait_for_job.fn(run, recipe, record)


def test_transient_errors_are_retried_and_refusals_are_not(service, recipe):
    import httpx
    import together

    request = httpx.Request("GET", service.url)
    for status, transient in ((429, True), (500, True), (503, True), (400, False), (401, False), (404, False)):
        exc = together.APIStatusError("x", response=httpx.Response(status, request=request), body=None)
        assert engine.is_transient(exc) is transient, status
    assert engine.is_transient(together.APITimeoutError(request=request))
    assert not engine.is_transient(engine.RemoteTrainingError("job failed"))


def _adapter_archive(tmp_path, config: dict) -> Path:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("adapter_config.json", json.dumps(config).encode()),
                           ("adapter_model.safetensors", b"\0" * 16)):
            info = tarfile.TarInfo(f"out/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "a.tar.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(buf.getvalue()))
    return path


def test_adapter_archive_is_unpacked_and_checked_against_the_recipe(recipe, tmp_path):
    good = {"base_model_name_or_path": "org/tiny", "r": 8, "lora_alpha": 16}
    out = tmp_path / "lora"
    out.mkdir()
    assert sorted(engine.unpack_adapter(_adapter_archive(tmp_path, good), out)) == [
        "adapter_config.json", "adapter_model.safetensors"]
    assert engine.check_adapter(out, recipe)["r"] == 8
    (out / "adapter_config.json").write_text(json.dumps(good | {"r": 16, "base_model_name_or_path": "x/y"}))
    with pytest.raises(engine.RemoteTrainingError, match=r"r is 16, the recipe says 8.*|base_model"):
        engine.check_adapter(out, recipe)


def test_recipe_rules_for_the_together_engine():
    with pytest.raises(RecipeError, match="whole number"):
        load_recipe("gerbil-local", {"training.epochs": 1.5})
    with pytest.raises(RecipeError, match="lr_scheduler"):
        load_recipe("gerbil-local", {"training.lr_scheduler": "constant"})
    with pytest.raises(RecipeError, match="test_file"):
        load_recipe("gerbil-local", {"data.test_file": None})
    assert load_recipe("gerbil").together.model == "Qwen/Qwen2.5-7B-Instruct"


def test_no_key_is_a_clear_error_that_names_no_key(monkeypatch, recipe):
    monkeypatch.delenv("TOGETHER_API_KEY")
    with pytest.raises(engine.RemoteTrainingError, match="TOGETHER_API_KEY"):
        engine.make_client(recipe.together)


def _run_folder(tmp_path, recipe) -> Path:
    from tasks.run import atomic_write_text, new_run_dir

    run = new_run_dir(tmp_path / "runs", "t")
    atomic_write_text(run / "recipe.json", recipe.model_dump_json())
    return run


def test_the_key_can_come_from_a_block_and_is_never_shown(service, tmp_path, monkeypatch):
    from blocks.together import TogetherCredentials

    monkeypatch.delenv("TOGETHER_API_KEY", raising=False)
    monkeypatch.delenv("TOGETHER_BASE_URL", raising=False)
    TogetherCredentials(api_key=KEY, base_url=service.url).save("together-test", overwrite=True)
    recipe = load_recipe("gerbil-local", {"together.model": "org/tiny", "together.credentials_block": "together-test"})
    assert engine.make_client(recipe.together).fine_tuning.list().data == []   # the service accepted the key
    block = TogetherCredentials.load("together-test")
    assert KEY not in repr(block) and KEY not in str(block.model_dump()) and KEY not in block.model_dump_json()


def test_a_stopped_wait_cancels_the_remote_job(service, recipe, tmp_path, monkeypatch):
    run = _run_folder(tmp_path, recipe)
    files = engine.upload_training_files.fn(run, recipe, {"train": str(_train_file(tmp_path))})
    record = engine.submit_job.fn(run, recipe, files)

    def stop(_seconds):   # the flow run is being stopped while the wait task sleeps between polls
        raise KeyboardInterrupt
    monkeypatch.setattr(engine, "_pause", stop)
    with pytest.raises(KeyboardInterrupt):
        engine.wait_for_job.fn(run, recipe, record)
    job = service.service.jobs[record["id"]]
    import time
    deadline = time.time() + 30
    while job["status"] != "cancelled" and time.time() < deadline:
        time.sleep(0.2)
    assert job["status"] == "cancelled" and [e for e in job["events"] if e["type"] == "cancel_requested"]


def test_the_cancellation_hook_cancels_the_job_its_flow_run_created(service, recipe, tmp_path):
    import time
    import uuid
    from types import SimpleNamespace

    from prefect.variables import Variable

    from tasks.together.hooks import cancel_remote_job

    run = _run_folder(tmp_path, recipe)
    files = engine.upload_training_files.fn(run, recipe, {"train": str(_train_file(tmp_path))})
    record = engine.submit_job.fn(run, recipe, files)
    flow_run = SimpleNamespace(id=uuid.uuid4())
    cancel_remote_job(None, flow_run, None)              # another flow run's cancellation: nothing to do
    assert service.service.jobs[record["id"]]["status"] != "cancel_requested"
    Variable.set(f"together-job-{flow_run.id}", {"run_dir": str(run), "job_id": record["id"]}, overwrite=True)
    cancel_remote_job(None, flow_run, None)
    job = service.service.jobs[record["id"]]
    deadline = time.time() + 30
    while job["status"] != "cancelled" and time.time() < deadline:
        time.sleep(0.2)
    assert job["status"] == "cancelled"


def test_half_the_calls_failing_still_uploads_and_creates_one_job_and_says_so(service, recipe, tmp_path, caplog):
    service.service.fault_rate = 0.5
    run = _run_folder(tmp_path, recipe)
    with caplog.at_level("WARNING", logger="slipway.together"):
        files = engine.upload_training_files.fn(run, recipe, {"train": str(_train_file(tmp_path))})
        engine.submit_job.fn(run, recipe, files)
    faults = service.service.faults["429"] + service.service.faults["500"]
    retried = [r.getMessage() for r in caplog.records if "Retrying request to /v1/" in r.getMessage()]
    assert faults >= 2 and len(retried) == faults
    assert len(service.service.jobs) == 1 and len(service.service.files) == 1
    assert KEY not in caplog.text
