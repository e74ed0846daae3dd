"""The training process's allocator (tasks/train/allocator.py): mimalloc preloaded into a CPU process, the
system's malloc left alone on a GPU or when the recipe says so."""

import json
import subprocess
import sys

import pytest

from tasks.recipe import REPO_ROOT, Recipe
from tasks.train import allocator
from tasks.train.allocator import AllocatorError, allocator_env, mimalloc_library
from tasks.train.command import training_env


def test_the_mimalloc_dependency_ships_a_shared_library():
    library = mimalloc_library()
    assert library is not None and library.is_file() and library.name.startswith("libmimalloc.so")


def test_auto_preloads_mimalloc_on_a_cpu_and_keeps_what_the_user_set():
    library = str(mimalloc_library())
    env = allocator_env("auto", on_cpu=True, environ={"PATH": "/bin", "LD_PRELOAD": "/opt/libfoo.so",
                                                      "MIMALLOC_PURGE_DELAY": "10"})
    assert env["LD_PRELOAD"] == f"/opt/libfoo.so:{library}"      # the user's own preload stays first
    assert env["MIMALLOC_PURGE_DELAY"] == "10"                     # the user's option wins over ours
    assert env["MIMALLOC_ARENA_EAGER_COMMIT"] == "1" and env["PATH"] == "/bin"
    again = allocator_env("auto", on_cpu=True, environ=env)
    assert again["LD_PRELOAD"] == env["LD_PRELOAD"]                # not preloaded twice


@pytest.mark.parametrize("choice,on_cpu", [("auto", False), ("system", True), ("system", False)])
def test_a_gpu_process_or_system_leaves_malloc_alone(choice, on_cpu):
    environ = {"PATH": "/bin"}
    assert allocator_env(choice, on_cpu=on_cpu, environ=environ) == environ


def test_mimalloc_asked_for_where_it_is_missing_is_refused(monkeypatch):
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    with pytest.raises(AllocatorError, match="cmeel-mimalloc"):
        allocator_env("mimalloc", on_cpu=True, environ={})
    assert allocator_env("auto", on_cpu=True, environ={}) == {}   # auto falls back to the system's


def test_the_training_process_runs_torch_on_mimalloc():
    """A process started with the training environment of a CPU recipe has mimalloc mapped and runs a
    forward and backward pass on it; the recipe's 'system' starts one without it."""
    script = ("import json, torch; from tasks.train.allocator import loaded_allocator; "
              "x = torch.randn(256, 256, requires_grad=True); (x @ x).sum().backward(); "
              "print(json.dumps({'allocator': loaded_allocator(), 'grad': float(x.grad.abs().sum())}))")
    for choice, expected in (("auto", "mimalloc"), ("system", "system")):
        recipe = Recipe(name="tiny")
        recipe.training.allocator = choice
        out = subprocess.run([sys.executable, "-c", script], env=training_env(recipe, gpus=0), cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
        report = json.loads(out.strip().splitlines()[-1])
        assert report["allocator"] == expected and report["grad"] > 0
