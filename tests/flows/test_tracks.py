"""The tracks flow through a real Prefect server (SQLite, loopback) and real process workers: the pools of
`python -m deployments.up --gpus 2` (gpu-a sees GPU 0, gpu-b GPU 1, gpu-all both, through their base job
templates), one worker per pool, and two tracks of the Fledgling recipes on a tiny random Llama with
SmolLM2's tokenizer — in parallel (the whole finetune pipeline, one track per pool) and in turn (training
only, on gpu-all). No GPU here: CUDA_VISIBLE_DEVICES is what each run was given and recorded; the workers
themselves run with a different value, so only the pools' job templates can have set it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_prefect_deployment import _free_port, _prefect, _stop
from tiny_models import tiny_model

pytestmark = pytest.mark.integration

POOLS = ("gpu-a", "gpu-b", "gpu-all")
TINY = ["training.max_steps=3", "training.logging_steps=1", "training.save_steps=100", "training.batch_size=2",
        "data.train_rows=2", "data.eval_rows=2", "eval.max_new_tokens=8", "eval.min_improvement=0",
        "eval.max_quant_drop=1", "export.gguf_types=[q8_0]", "export.lora_gguf=false", "export.parity_rows=1",
        "export.template_samples=1", "deploy.target=none", "baseline.source=none"]


@pytest.fixture
def gpu_pools_stack(tmp_path):
    """Server + `deployments.up --gpus 2` + a worker per GPU pool, the workers' own CUDA_VISIBLE_DEVICES wrong."""
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home"),
           "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO",
           "PREFECT_WORKER_QUERY_SECONDS": "2"}
    prefect = str(Path(sys.executable).parent / "prefect")
    server = subprocess.Popen([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], cwd=REPO,
                              env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    workers = []
    try:
        _prefect(env, "server", "status", "--wait", "--timeout", "120", timeout=150)
        up = subprocess.run([sys.executable, "-m", "deployments.up", "--gpus", "2"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
        assert up.returncode == 0, f"{up.stdout}\n{up.stderr}"
        for pool in POOLS:
            workers.append(subprocess.Popen(
                [prefect, "worker", "start", "--pool", pool, "--limit", "1"], cwd=REPO,
                env={**env, "CUDA_VISIBLE_DEVICES": "7"}, stdout=open(tmp_path / f"worker-{pool}.log", "w"),
                stderr=subprocess.STDOUT, start_new_session=True))
        yield env
    finally:
        _stop(*workers, server)


def _tracks(env, out, tiny_dir, *args):
    sets = [f"--set={s}" for s in [*TINY, "model.source=hf", f"model.name={tiny_dir}"]]
    return subprocess.run([sys.executable, "-m", "flows.cli", "tracks", *args, *sets, "--output-root", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def _overlap(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_tracks_run_on_their_pools_gpus_in_parallel_and_in_turn(gpu_pools_stack, tmp_path, base_model_dir):
    env, out = gpu_pools_stack, tmp_path / "runs"
    tiny_dir = tiny_model("llama", base_model_dir, tmp_path / "tiny-llama")
    logs = lambda: "\n".join(f"--- {p} ---\n{(tmp_path / f'worker-{p}.log').read_text()[-3000:]}" for p in POOLS)

    parallel = _tracks(env, out, tiny_dir, "--layout", "parallel", "--run-name", "par")
    assert parallel.returncode == 0, f"{parallel.stdout[-4000:]}\n{parallel.stderr[-4000:]}\n{logs()}"
    report = json.loads((out / "par" / "tracks-report.json").read_text())
    tracks = {t["track"]: t for t in report["tracks"]}
    assert set(tracks) == {"fledgling-structured", "fledgling-toolcall"}
    structured, toolcall = tracks["fledgling-structured"], tracks["fledgling-toolcall"]
    # each run saw its own pool's device, whatever its worker had
    assert (structured["work_pool"], structured["cuda_visible_devices"]) == ("gpu-a", "0")
    assert (toolcall["work_pool"], toolcall["cuda_visible_devices"]) == ("gpu-b", "1")
    for run in (out / "par" / "fledgling-structured", out / "par" / "fledgling-toolcall"):
        assert (run / "COMPLETE").exists() and (run / "gguf" / "model-q8_0.gguf").exists()
        assert json.loads((run / "metrics" / "devices.json").read_text())["cuda_device_count"] == 0  # no GPU here
    assert _overlap(structured, toolcall), "parallel tracks did not run at the same time"
    for t in tracks.values():
        assert {g["name"] for g in t["gates"]} >= {"baseline-established", "loss-converged", "quantization-verified"}
        assert t["tokens"] > 0 and not t["tokens_estimated"] and t["tokens_per_second_per_process"] > 0
        assert t["processes"] == 1 and t["device"] == "cpu"
    assert report["wall_seconds"] < report["sum_run_seconds"]

    sequential = _tracks(env, out, tiny_dir, "--layout", "sequential", "--flow", "train", "--run-name", "seq",
                         "--compare-with", str(out / "par"))
    assert sequential.returncode == 0, f"{sequential.stdout[-4000:]}\n{sequential.stderr[-4000:]}\n{logs()}"
    report = json.loads((out / "seq" / "tracks-report.json").read_text())
    first, second = report["tracks"]
    assert {(t["work_pool"], t["cuda_visible_devices"]) for t in report["tracks"]} == {("gpu-all", "0,1")}
    assert first["end"] <= second["start"], "sequential tracks overlapped"
    for t in report["tracks"]:
        assert t["state"] == "Completed" and [g["name"] for g in t["gates"]] == ["loss-converged"]
        assert not (Path(t["run_dir"]) / "gguf" / "model-q8_0.gguf").exists()   # training only
    assert report["compared_with"]["layout"] == "parallel"
    markdown = (out / "seq" / "tracks-report.md").read_text()
    assert "## Layouts compared" in markdown and "| gpu-all | `0,1` |" in markdown
    print(f"parallel wall {report['compared_with']['wall_seconds']:.0f}s, sequential wall {report['wall_seconds']:.0f}s")
