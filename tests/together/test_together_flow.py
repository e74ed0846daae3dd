"""The finetune flow with training.engine: together, end to end against the local Together-compatible
service (which really trains SmolLM2 with Slipway's worker): the Gerbil recipe through upload -> job ->
events -> adapter -> GGUF adapter -> served over the base GGUF by llama.cpp -> verify prompts in the report;
with 30% of the API calls failing (429/500), the flow process killed after the job was created and the
run resumed (one job in the service's list), and a planted API key that must appear nowhere. A job that
fails remotely fails the flow with the remote error, leaving nothing that looks complete."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO
from flows.finetune import finetune
from tasks.run import RunFolder
from tasks.together.local_service import LocalTogether

pytestmark = pytest.mark.integration

KEY = "tgp_PLANTED_0f1e2d3c4b5a69788796a5b4c3d2e1f0"
SMALL = {"data.train_rows": 8, "training.epochs": 3, "data.eval_rows": 4, "eval.max_new_tokens": 32, "together.poll_seconds": 0.5}
SMALL_CLI = [f"--set={k}={v}" for k, v in SMALL.items()]


@pytest.fixture
def env(monkeypatch):
    def point_at(svc):
        monkeypatch.setenv("TOGETHER_API_KEY", KEY)
        monkeypatch.setenv("TOGETHER_BASE_URL", svc.url)
        return {**os.environ, "TOGETHER_API_KEY": KEY, "TOGETHER_BASE_URL": svc.url}
    return point_at


def _all_prefect_text(flow_run_id) -> str:
    """Every log line and artifact of the flow run (and its subflow and task runs) on the test's Prefect API."""
    from prefect.client.orchestration import get_client

    texts = []
    with get_client(sync_client=True) as client:
        offset = 0
        while True:
            logs = client.read_logs(offset=offset, limit=200)
            texts += [log.message for log in logs]
            offset += len(logs)
            if len(logs) < 200:
                break
        texts += [json.dumps(a.data, default=str) + str(a.description) for a in client.read_artifacts()]
    return "\n".join(texts)


def test_gerbil_remote_run_survives_faults_and_a_kill_and_shows_no_key(tmp_path, env):
    with LocalTogether(tmp_path / "svc", api_key=KEY, fault_rate=0.3, seed=7) as svc:
        child_env = env(svc) | {"PREFECT_HOME": str(tmp_path / "child-prefect")}
        out = tmp_path / "runs"
        child = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "gerbil-local", *SMALL_CLI,
                                  "--run-name", "gerbil", "--output-root", str(out)], cwd=REPO, env=child_env,
                                 stdout=open(tmp_path / "child.log", "w"), stderr=subprocess.STDOUT,
                                 start_new_session=True)
        run = RunFolder(out / "gerbil")
        deadline = time.time() + 600
        # Kill once the job exists on the service AND the run has recorded it: killed between the two (the
        # response in flight), the run folder would hold no job id yet (a fresh-clone `make test` hit that).
        while not (svc.service.jobs and run.remote_job.exists()) and child.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert svc.service.jobs and run.remote_job.exists(), (tmp_path / "child.log").read_text()[-3000:]
        os.killpg(child.pid, signal.SIGKILL)          # a crash after the job was created: no cleanup ran
        child.wait()
        assert json.loads(run.remote_job.read_text())["id"] == next(iter(svc.service.jobs))

        state = finetune(recipe="gerbil-local", overrides=SMALL, output_root=str(out), resume_from=str(run),
                         return_state=True)
        assert state.is_completed(), state.message
        import together
        listed = together.Together(api_key=KEY, base_url=svc.url).fine_tuning.list().data
        assert [j.status for j in listed] == ["completed"]   # the service's job list: one job, re-attached
        assert svc.service.faults["429"] + svc.service.faults["500"] >= 3
    stats = json.loads(run.training_stats.read_text())
    assert stats["engine"] == "together" and stats["remote"]["billed_tokens"] > 0
    assert stats["remote"]["estimate"]["estimated_total_price"] > 0 and stats["history"]
    adapter = json.loads((run.lora_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and adapter["r"] == 8
    deploy = json.loads(run.deploy_record.read_text())
    assert deploy["served_as"] == "base GGUF + LoRA GGUF (--lora)" and deploy["lora"].endswith("lora-f16.gguf")
    verify = json.loads(run.verify_results.read_text())
    assert verify["total"] == 12 and all(r["answer"] for r in verify["results"])
    report = run.report_md.read_text()
    section = report.split("## Verify prompts on the deployed model")[1].split("\n## ")[0]
    assert section.count("| PASS |") + section.count("| FAIL |") == 12
    assert "estimate before: $" in report and "billed after:" in report
    assert run.is_complete()
    # The planted key: in no file of the run, no log line, no artifact.
    for path in run.root.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in (tmp_path / "child.log").read_text()
    assert KEY not in _all_prefect_text(state.state_details.flow_run_id)


def test_a_remotely_failing_job_fails_the_flow_with_the_remote_error(tmp_path, env):
    with LocalTogether(tmp_path / "svc", api_key=KEY, fail_jobs=True) as svc:
        env(svc)
        state = finetune(recipe="gerbil-local", overrides=SMALL, output_root=str(tmp_path / "runs"),
                         run_name="fails", return_state=True)
    assert state.is_failed()
    assert "CUDA error: an illegal memory access was encountered (injected remote failure)" in state.message
    run = RunFolder(tmp_path / "runs" / "fails")
    assert not run.is_complete() and not (run.lora_dir / "adapter_config.json").exists()
    assert not run.training_stats.exists() and not run.report_md.exists()
    assert not list(run.remote_dir.glob("adapter*"))
