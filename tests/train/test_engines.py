"""Engine selection and its early checks, the launch command (one process per visible GPU), Unsloth's
import order in the training process, and that a cancelled launch leaves no rank behind. CPU, seconds."""

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO
from tasks.recipe import Recipe, load_recipe
from tasks.train.engines import EngineError, check_engine, import_engine
from tasks.train.launch import process_group, training_command, visible_gpus


def test_engine_is_the_new_name_of_backend(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("name: old\ntraining:\n  backend: unsloth\n")
    assert load_recipe(old).training.engine == "unsloth"
    assert load_recipe("slipstream").training.engine == "trl"
    assert load_recipe("slipstream-gpu-unsloth").training.engine == "unsloth"
    recipe = Recipe(name="x")
    recipe.training.engine = "unsloth"
    assert json.loads(recipe.model_dump_json())["training"]["engine"] == "unsloth"


@pytest.mark.parametrize("engine, fields, gpus, kind, message", [
    ("unsloth", {}, 0, None, "'unsloth' needs a CUDA GPU"),
    ("trl", {"load_in_4bit": True}, 0, None, "load_in_4bit .* needs a CUDA GPU"),
    ("unsloth", {}, 2, "DEEPSPEED", "does not run under DeepSpeed"),
    ("trl", {}, 0, "MULTI_GPU", "no CUDA GPU is visible"),
    ("trl", {"liger_kernel": True}, 0, None, "liger_kernel needs a CUDA GPU"),
    ("trl", {"attention": "flex_attention"}, 0, None, "no FlexAttention backward on CPU"),
    ("unsloth", {"attention": "flex_attention"}, 1, None, "applies to engine 'trl'"),
])
def test_combinations_that_cannot_run_are_refused_before_launch(engine, fields, gpus, kind, message):
    recipe = Recipe(name="x")
    recipe.training.engine = engine
    recipe.training.accelerate_config = {"DEEPSPEED": "zero2", "MULTI_GPU": "ddp"}.get(kind)
    for key, value in fields.items():
        setattr(recipe.model if key in type(recipe.model).model_fields else recipe.training, key, value)
    with pytest.raises(EngineError, match=message):
        check_engine(recipe, gpus, kind)


def test_combinations_that_can_run_pass():
    recipe = Recipe(name="x")
    check_engine(recipe, 0, None)                  # trl on a CPU
    recipe.training.engine = "unsloth"
    recipe.model.load_in_4bit = True
    check_engine(recipe, 1, None)                  # QLoRA through unsloth on one GPU
    check_engine(recipe, 2, "MULTI_GPU")           # ... and DDP


def test_accelerate_gets_one_process_per_visible_gpu(monkeypatch, tmp_path):
    recipe = Recipe(name="x")
    recipe.training.accelerate_config = "zero2"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5")
    assert visible_gpus() == 3
    cmd = training_command(recipe, tmp_path, tmp_path)
    assert cmd[cmd.index("--num_processes") + 1] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,-1,1")   # CUDA stops at the first invalid id
    assert visible_gpus() == 1
    recipe.training.accelerate_config = "single_gpu"
    assert training_command(recipe, tmp_path, tmp_path, gpus=4)[5:7] == ["--num_processes", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    recipe.training.accelerate_config = "ddp"
    with pytest.raises(EngineError, match="no CUDA GPU is visible"):
        training_command(recipe, tmp_path, tmp_path)


def test_the_training_process_imports_unsloth_before_transformers_trl_and_peft(tmp_path):
    """A stand-in `unsloth` package records what was already imported when the worker imported it."""
    fake = tmp_path / "fake" / "unsloth"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent("""
        import json, sys
        print("IMPORTED_BEFORE_UNSLOTH", json.dumps(sorted(m for m in ("transformers", "trl", "peft", "torch")
                                                           if m in sys.modules)))
        raise SystemExit(0)
    """))
    recipe = Recipe(name="x")
    recipe.training.engine = "unsloth"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "recipe.json").write_text(recipe.model_dump_json())
    env = {**os.environ, "PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"}
    proc = subprocess.run([sys.executable, "-m", "tasks.train.worker", str(run_dir), "--base", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = next(x for x in proc.stdout.splitlines() if x.startswith("IMPORTED_BEFORE_UNSLOTH"))
    assert json.loads(line.split(" ", 1)[1]) == [], proc.stderr


def test_unsloth_after_transformers_is_refused_in_process():
    code = "import transformers\nfrom tasks.train.engines import import_engine\nimport_engine('unsloth')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "must be imported before ['transformers']" in proc.stderr
    import_engine("trl")   # nothing to import first


def test_leaving_the_launch_block_ends_every_process_of_the_group(tmp_path):
    """What a Prefect cancellation or timeout does to a running `accelerate launch`: the launcher and the
    ranks it started (here a child that ignores nothing and sleeps) are all gone afterwards."""
    child_pid = tmp_path / "child.pid"
    code = (f"import subprocess, sys, time\n"
            f"c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])\n"
            f"open({str(child_pid)!r}, 'w').write(str(c.pid))\n"
            f"time.sleep(300)\n")
    with pytest.raises(KeyboardInterrupt):
        with process_group([sys.executable, "-c", code]) as proc:
            while not child_pid.exists() or not child_pid.read_text():
                time.sleep(0.05)
            raise KeyboardInterrupt   # stands in for the cancellation reaching the task
    pid = int(child_pid.read_text())
    assert proc.poll() is not None
    deadline = time.time() + 10
    while time.time() < deadline and _alive(pid):
        time.sleep(0.1)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"     # a zombie waits only for its (gone) parent's reaping
    except FileNotFoundError:
        return False
