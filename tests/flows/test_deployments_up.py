"""deployments/: the pool definitions as Prefect will receive them, and the block types it registers."""

import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from deployments.up import POOLS_FILE, PoolsError, block_types, load_pools, work_pools


def _devices(host_gpus: int) -> dict[str, str]:
    return {pool.name: pool.base_job_template["variables"]["properties"]["env"]["default"]["CUDA_VISIBLE_DEVICES"]
            for pool in work_pools(host_gpus)}


def test_pools_are_process_pools_whose_job_template_carries_their_gpus():
    pools = {pool.name: pool for pool in work_pools()}
    assert set(pools) == {"cpu", "gpu-a", "gpu-b", "gpu-all"}
    env = {name: pool.base_job_template["variables"]["properties"]["env"]["default"] for name, pool in pools.items()}
    assert env == {"cpu": {"CUDA_VISIBLE_DEVICES": ""}, "gpu-a": {"CUDA_VISIBLE_DEVICES": "0,1"},
                   "gpu-b": {"CUDA_VISIBLE_DEVICES": "2,3"}, "gpu-all": {"CUDA_VISIBLE_DEVICES": "0,1,2,3"}}
    assert {pool.type for pool in pools.values()} == {"process"}
    assert pools["gpu-a"].concurrency_limit == pools["gpu-b"].concurrency_limit == pools["gpu-all"].concurrency_limit == 1
    assert pools["cpu"].base_job_template["job_configuration"]["env"] == "{{ env }}"   # the worker applies it


def test_the_same_pools_lay_out_one_two_or_four_gpus():
    assert _devices(1) == {"cpu": "", "gpu-a": "0", "gpu-b": "0", "gpu-all": "0"}
    assert _devices(2) == {"cpu": "", "gpu-a": "0", "gpu-b": "1", "gpu-all": "0,1"}
    assert _devices(4) == {"cpu": "", "gpu-a": "0,1", "gpu-b": "2,3", "gpu-all": "0,1,2,3"}


def test_a_host_size_without_a_layout_is_refused_naming_the_known_ones():
    with pytest.raises(PoolsError, match=r"no gpu_layouts entry for a host of 3 GPU\(s\); known: \[1, 2, 4, 8\]"):
        work_pools(3)


@pytest.mark.parametrize("text, message", [
    ("pools:\n  gpu-a:\n    description: a\ngpu_layouts:\n  2: {gpu-a: '0,2'}\n",
     "gpu_layouts.2.gpu-a: '0,2' is not a comma list of GPU indices below 2"),
    ("pools:\n  gpu-a:\n    description: a\n    env: {CUDA_VISIBLE_DEVICES: '1'}\ngpu_layouts:\n  1: {gpu-a: '0'}\n",
     "pools ['gpu-a'] set CUDA_VISIBLE_DEVICES in `env`"),
    ("pools:\n  gpu-a:\n    description: a\n    concurency_limit: 1\n", "pools.yaml:4: pools.gpu-a.concurency_limit: unknown key"),
    ("pools:\n  gpu-a:\n    description: a\ngpu_layouts:\n  2: {gpu-b: '1'}\n", "pools that `pools` does not define: ['gpu-b']"),
])
def test_a_bad_pools_file_is_refused_with_its_reason(tmp_path, text, message):
    path = tmp_path / "pools.yaml"
    path.write_text(text)
    with pytest.raises(PoolsError) as raised:
        load_pools(path)
    assert message in str(raised.value)


def test_every_pool_a_deployment_names_is_defined():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} <= set(load_pools().pools)


def test_every_block_type_in_blocks_is_found():
    assert sorted(b.get_block_type_slug() for b in block_types()) == [
        "azure-openai-endpoint", "hugging-face-hub-credentials", "langfuse-credentials", "openai-compatible-endpoint",
        "together-credentials"]


def test_without_a_server_url_it_stops_before_touching_anything(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PREFECT_HOME": str(tmp_path / "prefect")}
    proc = subprocess.run([sys.executable, "-m", "deployments.up"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and "PREFECT_API_URL is not set" in proc.stderr and "Traceback" not in proc.stderr


def test_no_flow_module_shadows_an_installed_package():
    """Prefect runs a deployment's entrypoint with its folder (flows/) on sys.path: a flows/together.py made
    `from together import Together` import the flow module instead of Together's client."""
    import importlib.metadata
    import pkgutil

    flows_dir = REPO / "flows"
    installed = {name for dist in importlib.metadata.distributions()
                 for name in (dist.read_text("top_level.txt") or "").split()}
    installed |= {m.name for m in pkgutil.iter_modules() if m.module_finder.path != str(flows_dir)
                  and not str(m.module_finder.path).startswith(str(REPO))}
    ours = {p.stem for p in flows_dir.glob("*.py") if p.stem != "__init__"}
    assert "together_training" in ours and not ours & installed, ours & installed
