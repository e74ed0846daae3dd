"""`prefect deployment run finetune/gerbil` through a real Prefect server and process worker, with the
worker's `together` client pointed at the local Together-compatible service: a run cancelled after its
job was created cancels the remote job; a run left alone completes with the verify prompts in its report."""

import importlib.util
import json
import re
import time

import pytest

from conftest import REPO
from tasks.together.local_service import LocalTogether

pytestmark = pytest.mark.integration

_spec = importlib.util.spec_from_file_location("prefect_deployment_helpers",
                                               REPO / "tests" / "flows" / "test_prefect_deployment.py")
_helpers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helpers)
prefect_stack = _helpers.prefect_stack          # server + deployments.up + a `cpu` worker (a fixture)
_prefect = _helpers._prefect

KEY = "tgp_PLANTED_deploy_5a4b3c2d1e0f"
SMALL = {"data.train_rows": 8, "training.epochs": 3, "data.eval_rows": 4, "eval.max_new_tokens": 32, "together.poll_seconds": 0.5}


@pytest.fixture
def service(tmp_path, monkeypatch):
    """The local service, and the variables the worker's flow runs inherit to reach it."""
    with LocalTogether(tmp_path / "svc", api_key=KEY) as svc:
        monkeypatch.setenv("TOGETHER_API_KEY", KEY)
        monkeypatch.setenv("TOGETHER_BASE_URL", svc.url)
        yield svc


def _params(out, name) -> str:
    return json.dumps({"recipe": "gerbil-local", "overrides": SMALL, "output_root": str(out), "run_name": name})


def _wait(predicate, seconds, what):
    deadline = time.time() + seconds
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def test_gerbil_deployment_cancels_its_remote_job_and_completes(service, prefect_stack, tmp_path):
    env, out = prefect_stack, tmp_path / "runs"
    started = _prefect(env, "deployment", "run", "finetune/gerbil", "--params", _params(out, "cancelled")).stdout
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)
    _wait(lambda: any(j["status"] == "running" for j in service.service.jobs.values()), 600, "the remote job")
    job = next(iter(service.service.jobs.values()))
    _prefect(env, "flow-run", "cancel", flow_run_id)
    _wait(lambda: job["status"] == "cancelled", 180, "the remote job to be cancelled")
    assert any(e["type"] == "cancel_requested" for e in job["events"])

    proc = _prefect(env, "deployment", "run", "finetune/gerbil", "--params", _params(out, "completed"), "--watch",
                    "--watch-timeout", "1500", timeout=1600, check=False)
    worker_log = (tmp_path / "worker.log").read_text()
    assert proc.returncode == 0 and "Completed" in proc.stdout, f"{proc.stdout}\n{worker_log[-4000:]}"
    run = out / "completed"
    assert (run / "COMPLETE").exists()
    assert "## Verify prompts on the deployed model" in (run / "report.md").read_text()
    assert [j["status"] for j in service.service.jobs.values()] == ["cancelled", "completed"]
    assert KEY not in worker_log
