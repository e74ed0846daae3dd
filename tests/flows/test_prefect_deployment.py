"""A real Prefect server (SQLite) on loopback, stood up from nothing by `python -m deployments.up` (pools, block
types, every deployment of prefect.yaml); a process worker then runs `finetune/slipstream` through it."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.integration

SMALL = {"training.max_steps": 3, "training.logging_steps": 1, "data.train_rows": 12, "data.eval_rows": 4,
         "eval.max_new_tokens": 24, "eval.min_improvement": 0.0, "eval.max_quant_drop": 1.0,
         "training.compile_layers": False}   # three steps: compiling would cost more than they train


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _prefect(env, *args, timeout=120, check=True):
    proc = subprocess.run([str(Path(sys.executable).parent / "prefect"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _stop(*procs):
    """SIGTERM to every process group at once, then SIGKILL to those still running 5 s later. A Prefect worker
    forwards the signal to its runner and was at times still running 20 s later: stopped one at a time with 20 s
    each, the tracks test's three workers took 62 s of teardown. Nothing here tests a graceful stop."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def prefect_stack(tmp_path):
    """Server + what `python -m deployments.up` creates + a `cpu` worker, on loopback in a throwaway PREFECT_HOME."""
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO"}
    server_log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "server", "start", "--host",
                               "127.0.0.1", "--port", str(port)], cwd=REPO, env=env, stdout=server_log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        _prefect(env, "server", "status", "--wait", "--timeout", "120", timeout=150)
        up = subprocess.run([sys.executable, "-m", "deployments.up"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
        worker_log = open(tmp_path / "worker.log", "w")
        worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "cpu",
                                   "--limit", "1"], cwd=REPO, env=env, stdout=worker_log,
                                  stderr=subprocess.STDOUT, start_new_session=True)
        yield env
    finally:
        _stop(*[p for p in (worker, server) if p is not None])


def cfg_eval_files() -> list[str]:
    from tasks.recipe import load_recipe

    return load_recipe("slipstream").data.eval_files


def test_deployment_run_completes_and_writes_the_report(prefect_stack, tmp_path, base_model_dir):
    env = prefect_stack
    for pool, gpus in (("cpu", ""), ("gpu-a", "0,1"), ("gpu-b", "2,3"), ("gpu-all", "0,1,2,3")):
        inspected = json.loads(_prefect(env, "work-pool", "inspect", pool, "--output", "json").stdout)
        assert inspected["type"] == "process"
        assert inspected["base_job_template"]["variables"]["properties"]["env"]["default"] == \
            {"CUDA_VISIBLE_DEVICES": gpus}
    wide = {**env, "COLUMNS": "250"}   # rich tables: no name cut short
    listed = _prefect(wide, "deployment", "ls").stdout
    for name in ("finetune/slipstream ", "finetune/slipstream-gpu ", "finetune/slipstream-gpu-ddp ",
                 "evaluate/fledgling-structured ", "evaluate/fledgling-toolcall ", "finetune/gpu-all ",
                 "train/gpu-a ", "train/gpu-b ", "tracks/fledgling "):
        assert name in listed, listed
    blocks = _prefect(wide, "block", "type", "ls").stdout
    assert "openai-compatible-endpoint" in blocks and "langfuse-credentials" in blocks
    out = tmp_path / "runs"
    params = json.dumps({"overrides": SMALL, "output_root": str(out), "run_name": "via-deployment"})
    start = time.time()
    proc = _prefect(env, "deployment", "run", "finetune/slipstream", "--params", params, "--watch",
                    "--watch-timeout", "1500", timeout=1600, check=False)
    worker_log = (tmp_path / "worker.log").read_text()
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n--- worker ---\n{worker_log[-4000:]}"
    assert "Completed" in proc.stdout
    run_dir = out / "via-deployment"
    assert (run_dir / "COMPLETE").exists() and (run_dir / "report.md").exists()
    report = (run_dir / "report.md").read_text()
    for label in ("| base |", "| merged |", "| gguf-q8_0 |", "Stage timings"):
        assert label in report
    evals = json.loads((run_dir / "metrics" / "eval.json").read_text())
    # base, merged and served on the test split, plus the merged model on each of the recipe's eval files
    assert set(evals) == {"base", "merged", "gguf-q8_0"} | {f"merged@{Path(f).stem}" for f in cfg_eval_files()}
    assert (run_dir / "gguf" / "model-q8_0.gguf").exists() and (run_dir / "gguf" / "lora-f16.gguf").exists()
    print(f"deployment run took {time.time() - start:.0f}s")
