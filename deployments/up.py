"""Stand Slipway's Prefect side up from nothing, against the configured PREFECT_API_URL.

    prefect server start --background
    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m deployments.up          # or: slipway deploy     (--gpus 2 on a 2-GPU host; default 4)

Three steps, each idempotent (run it again after editing a pool, a block or prefect.yaml):
1. the work pools of deployments/pools.yaml, created or updated with their base job templates (the GPU
   pools' CUDA_VISIBLE_DEVICES from the file's layout for the host's GPU count);
2. every Block type in blocks/ registered, so the UI can create LLM endpoint, Hub and Langfuse blocks;
3. `prefect deploy --all`: every deployment in prefect.yaml, with this checkout as the working directory.
"""

from __future__ import annotations

import argparse
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
from pydantic import Field, ValidationError, model_validator

import blocks
from tasks.recipe import REPO_ROOT, StrictModel, located_errors

POOLS_FILE = Path(__file__).resolve().parent / "pools.yaml"
DEFAULT_HOST_GPUS = 4   # the 2+2 host the GPU pools were laid out for


class PoolsError(ValueError):
    """deployments/pools.yaml does not validate; the message names file, line and field."""


class PoolSpec(StrictModel):
    description: str
    concurrency_limit: int | None = Field(None, gt=0, description="Flow runs of this pool at once.")
    env: dict[str, str] = Field(default_factory=dict, description="Environment of every flow run of the pool.")


class PoolsFile(StrictModel):
    """pools.yaml: the pools, and which GPUs each GPU pool sees on a host of N GPUs."""

    pools: dict[str, PoolSpec]
    gpu_layouts: dict[int, dict[str, str]] = Field(
        default_factory=dict, description="host GPU count -> {GPU pool: CUDA_VISIBLE_DEVICES}")

    @property
    def gpu_pools(self) -> set[str]:
        """The pools whose devices depend on the host (every pool a layout names)."""
        return {name for layout in self.gpu_layouts.values() for name in layout}

    @model_validator(mode="after")
    def check_layouts(self) -> "PoolsFile":
        gpu_pools = self.gpu_pools
        if unknown := gpu_pools - set(self.pools):
            raise ValueError(f"gpu_layouts name pools that `pools` does not define: {sorted(unknown)}")
        for host_gpus, layout in self.gpu_layouts.items():
            if missing := gpu_pools - set(layout):
                raise ValueError(f"gpu_layouts.{host_gpus}: no devices for {sorted(missing)}")
            for name, devices in layout.items():
                ids = devices.split(",")
                if not all(i.strip().isdigit() and int(i) < host_gpus for i in ids):
                    raise ValueError(f"gpu_layouts.{host_gpus}.{name}: {devices!r} is not a comma list of GPU "
                                     f"indices below {host_gpus}")
        if pinned := sorted(n for n in gpu_pools if "CUDA_VISIBLE_DEVICES" in self.pools[n].env):
            raise ValueError(f"pools {pinned} set CUDA_VISIBLE_DEVICES in `env`; their devices come from gpu_layouts")
        return self


def load_pools(path: Path = POOLS_FILE) -> PoolsFile:
    """Read and validate pools.yaml.

    Raises:
        PoolsError: bad YAML or an invalid field (file:line: field: reason).
    """
    text = Path(path).read_text()
    try:
        node, raw = yaml.compose(text), yaml.safe_load(text)
        return PoolsFile.model_validate(raw)
    except yaml.YAMLError as exc:
        raise PoolsError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise PoolsError("invalid work pools\n" + "\n".join(located_errors(path, node, exc, "<file>"))) from None


def pool_env(pools: PoolsFile, name: str, host_gpus: int) -> dict[str, str]:
    """The environment a flow run of pool `name` gets on a host of `host_gpus` GPUs.

    Raises:
        PoolsError: GPU pools exist but pools.yaml has no layout for this GPU count.
    """
    env = dict(pools.pools[name].env)
    if name in pools.gpu_pools:
        if host_gpus not in pools.gpu_layouts:
            raise PoolsError(f"{POOLS_FILE.name}: no gpu_layouts entry for a host of {host_gpus} GPU(s); "
                             f"known: {sorted(pools.gpu_layouts)}")
        env["CUDA_VISIBLE_DEVICES"] = pools.gpu_layouts[host_gpus][name]
    return env


def work_pools(host_gpus: int = DEFAULT_HOST_GPUS, path: Path = POOLS_FILE) -> list[WorkPoolCreate]:
    """The pools of deployments/pools.yaml for a host of `host_gpus` GPUs: process pools whose base job
    template defaults `env` to theirs (the GPU pools' CUDA_VISIBLE_DEVICES from the host's layout)."""
    pools = load_pools(path)
    created = []
    for name, spec in pools.pools.items():
        template = ProcessWorker.get_default_base_job_template()   # a fresh dict each call
        template["variables"]["properties"]["env"]["default"] = pool_env(pools, name, host_gpus)
        created.append(WorkPoolCreate(name=name, type="process", description=spec.description,
                                      concurrency_limit=spec.concurrency_limit, base_job_template=template))
    return created


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


def stand_up(host_gpus: int = DEFAULT_HOST_GPUS) -> None:
    """Pools (laid out for a host of `host_gpus` GPUs), block types and deployments on the configured Prefect
    server, printing what it did."""
    url = require_api_url()
    pools = work_pools(host_gpus)   # a bad pools.yaml stops here, before anything is created
    print(f"Prefect API: {url}")
    for name, pool in zip(create_pools(pools), pools):
        devices = pool.base_job_template["variables"]["properties"]["env"]["default"].get("CUDA_VISIBLE_DEVICES")
        print(f"work pool {name}: CUDA_VISIBLE_DEVICES={devices!r}")
    print("block types:", ", ".join(register_blocks(block_types())))
    print(deploy_all())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stand Slipway's pools, block types and deployments up.")
    parser.add_argument("--gpus", type=int, default=DEFAULT_HOST_GPUS,
                        help="GPUs of the host the GPU workers run on (picks pools.yaml's gpu_layouts entry)")
    try:
        stand_up(parser.parse_args(argv).gpus)
    except PoolsError as exc:
        raise SystemExit(str(exc)) from None


if __name__ == "__main__":
    main()
