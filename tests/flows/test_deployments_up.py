"""deployments/: the pool definitions as Prefect will receive them, and the block types it registers."""

import subprocess
import sys

import yaml

from conftest import REPO
from deployments.up import POOLS_FILE, block_types, work_pools


def test_pools_are_process_pools_whose_job_template_carries_their_gpus():
    pools = {pool.name: pool for pool in work_pools()}
    assert set(pools) == {"cpu", "gpu-a", "gpu-b"}
    env = {name: pool.base_job_template["variables"]["properties"]["env"]["default"] for name, pool in pools.items()}
    assert env == {"cpu": {"CUDA_VISIBLE_DEVICES": ""}, "gpu-a": {"CUDA_VISIBLE_DEVICES": "0,1"},
                   "gpu-b": {"CUDA_VISIBLE_DEVICES": "2,3"}}
    assert {pool.type for pool in pools.values()} == {"process"}
    assert pools["gpu-a"].concurrency_limit == pools["gpu-b"].concurrency_limit == 1
    assert pools["cpu"].base_job_template["job_configuration"]["env"] == "{{ env }}"   # the worker applies it


def test_every_pool_a_deployment_names_is_defined():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} <= set(yaml.safe_load(POOLS_FILE.read_text()))


def test_every_block_type_in_blocks_is_found():
    assert sorted(b.get_block_type_slug() for b in block_types()) == [
        "azure-openai-endpoint", "hugging-face-hub-credentials", "langfuse-credentials", "openai-compatible-endpoint",
        "together-credentials"]


def test_without_a_server_url_it_stops_before_touching_anything(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run([sys.executable, "-m", "deployments.up"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "PREFECT_API_URL is not set" in proc.stderr and "Traceback" not in proc.stderr
