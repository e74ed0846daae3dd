"""Config rot checks: prefect.yaml entrypoints import and their parameters validate; accelerate configs parse."""

import importlib
import json

import pytest
import yaml

from deployments.up import load_pools
from tasks.tasktypes import check_recipe
from tasks.recipe import load_recipe
from conftest import REPO

DEPLOYMENTS = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]


@pytest.mark.parametrize("deployment", DEPLOYMENTS, ids=lambda d: d["name"])
def test_deployment_entrypoint_and_parameters(deployment):
    module_path, _, attr = deployment["entrypoint"].partition(":")
    module = importlib.import_module(module_path.removesuffix(".py").replace("/", "."))
    flow = getattr(module, attr)
    params = deployment.get("parameters", {})
    flow.validate_parameters(params)   # Prefect's own check of names and types
    for recipe in params.get("recipes") or [params["recipe"]]:   # a tracks deployment names several
        check_recipe(load_recipe(recipe, params.get("overrides")))
    assert deployment["work_pool"]["name"] in load_pools().pools


def test_slipstream_deployment_exists():
    assert any(d["name"] == "slipstream" and d["entrypoint"] == "flows/finetune.py:finetune" for d in DEPLOYMENTS)


@pytest.mark.parametrize("path", sorted((REPO / "accelerate_config").glob("*.yaml")), ids=lambda p: p.stem)
def test_accelerate_configs_parse(path):
    cfg = yaml.safe_load(path.read_text())
    if cfg["distributed_type"] == "NO":
        assert cfg["num_processes"] == 1
    else:   # one process per visible GPU: tasks/train/command.py passes --num_processes
        assert "num_processes" not in cfg
    ds = cfg.get("deepspeed_config", {}).get("deepspeed_config_file")
    if ds:
        assert json.loads((REPO / ds).read_text())["zero_optimization"]["stage"] == 2
