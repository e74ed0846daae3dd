"""Stand Slipway's Prefect side up from nothing, against the configured PREFECT_API_URL.

    prefect server start --background
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m deployments.up          # or: slipway deploy

Three steps, each idempotent (run it again after editing a pool, a block or prefect.yaml):
1. the work pools of deployments/pools.yaml, created or updated with their base job templates;
2. every Block type in blocks/ registered, so the UI can create LLM endpoint, Hub and Langfuse blocks;
3. `prefect deploy --all`: every deployment in prefect.yaml, with this checkout as the working directory.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import yaml
from prefect.blocks.core import Block
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.settings import get_current_settings
from prefect.workers.process import ProcessWorker

import blocks
from tasks.recipe import REPO_ROOT

POOLS_FILE = Path(__file__).resolve().parent / "pools.yaml"


def work_pools(path: Path = POOLS_FILE) -> list[WorkPoolCreate]:
    """The pools of deployments/pools.yaml: process pools whose base job template defaults `env` to theirs."""
    pools = []
    for name, spec in yaml.safe_load(path.read_text()).items():
        template = ProcessWorker.get_default_base_job_template()   # a fresh dict each call
        template["variables"]["properties"]["env"]["default"] = spec.get("env", {})
        pools.append(WorkPoolCreate(name=name, type="process", description=spec.get("description"),
                                    concurrency_limit=spec.get("concurrency_limit"), base_job_template=template))
    return pools


def block_types() -> list[type[Block]]:
    """Every Block class defined in a module of the blocks/ package."""
    found = []
    for info in pkgutil.iter_modules(blocks.__path__, f"{blocks.__name__}."):
        module = importlib.import_module(info.name)
        found += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                  if Block.is_block_class(cls) and cls.__module__ == module.__name__]
    return found


def require_api_url() -> str:
    """The server to stand up on. Without PREFECT_API_URL Prefect would start a throwaway in-process server,
    and the pools and deployments would vanish with this command.

    Raises:
        SystemExit: PREFECT_API_URL is not set.
    """
    url = get_current_settings().api.url
    if not url:
        raise SystemExit("PREFECT_API_URL is not set: start a server (`prefect server start --background`) and "
                         "`prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api` first")
    return url


def create_pools(pools: list[WorkPoolCreate]) -> list[str]:
    """Create each pool, or update an existing one to its definition (template, limit, description)."""
    with get_client(sync_client=True) as client:
        return [client.create_work_pool(pool, overwrite=True).name for pool in pools]


def register_blocks(types: list[type[Block]]) -> list[str]:
    for block_type in types:
        block_type.register_type_and_schema()
    return [block_type.get_block_type_slug() for block_type in types]


def deploy_all(prefect_file: Path = REPO_ROOT / "prefect.yaml") -> str:
    """`prefect --no-prompt deploy --all` from the repo root; returns its output.

    Raises:
        RuntimeError: with prefect's output, when a deployment could not be created.
    """
    proc = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all", "--prefect-file",
                           str(prefect_file)], cwd=REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"prefect deploy --all failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def stand_up() -> None:
    """Pools, block types and deployments on the configured Prefect server, printing what it did."""
    url = require_api_url()
    print(f"Prefect API: {url}")
    print("work pools:", ", ".join(create_pools(work_pools())))
    print("block types:", ", ".join(register_blocks(block_types())))
    print(deploy_all())


if __name__ == "__main__":
    stand_up()
