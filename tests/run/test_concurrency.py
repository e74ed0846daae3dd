"""Runs started at the same moment: each claims its own folder, and the shared caches are built once
and never read half-built (tasks.run.claim_dir / cache_lock). Real processes, not threads: the claim
and the lock must hold across processes."""

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone

import pytest

from conftest import ASSETS, REPO

PY = sys.executable


def _start_together(code: str, n: int, env: dict | None = None, timeout: float = 600) -> list[str]:
    """Run `code` in n processes that all wait for one shared start instant; returns their stdouts."""
    start_at = time.time() + 3
    procs = [subprocess.Popen([PY, "-c", textwrap.dedent(code), str(start_at), str(i)], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **(env or {})}) for i in range(n)]
    outs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outs]


def test_two_processes_claiming_the_same_names_get_distinct_folders(tmp_path):
    code = f"""
        import sys, time
        from tasks.run import new_run_dir, new_synth_dir
        time.sleep(max(0, float(sys.argv[1]) - time.time()))
        for _ in range(40):
            print(new_run_dir({str(tmp_path)!r}, "same"))
            print(new_synth_dir({str(tmp_path)!r}))
    """
    outs = _start_together(code, 2)
    claimed = [line for out in outs for line in out.splitlines()]
    assert len(claimed) == 160 and len(set(claimed)) == 160
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({c.rsplit("/", 1)[1] for c in claimed})


def test_persisted_results_that_are_data_are_json_not_pickle():
    """Every task that persists its result (a Prefect cache) stores it as JSON, readable and never unpickled."""
    import importlib
    import pkgutil

    import tasks
    from prefect import Task
    from prefect.serializers import JSONSerializer

    persisted = {}
    for info in pkgutil.walk_packages(tasks.__path__, "tasks."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, Task) and obj.persist_result:
                persisted[obj.name] = obj.result_serializer
    # bootstrap-base-model persists nothing: each model source is its own cache (tasks/models/bootstrap.py)
    assert {"prepare-splits", "request-batch", "synthesize-from-templates"} <= set(persisted)
    assert all(isinstance(s, JSONSerializer) or s == "json" for s in persisted.values()), persisted


@pytest.mark.integration
def test_two_slipway_runs_at_once_claim_two_folders_and_share_one_bootstrapped_model(tmp_path):
    """Two `slipway run` at the same second, on a fresh model cache: one converts the base model while the
    other waits for it, each claims its own run folder, and each CLI names the folder it really used. The
    data source has a bad line, so both runs stop at the splits (cheap) after those stages."""
    lines = (ASSETS / "slipstream-tiny.jsonl").read_text().splitlines()
    lines[3] = "not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    runs = tmp_path / "runs"
    # Every default name of the next minutes is taken already, so the runs must claim `-2`, `-3`, and the
    # CLI must print those, not the name it would have guessed.
    now = datetime.now(timezone.utc)
    for s in range(-5, 300):
        (runs / f"slipstream-{(now + timedelta(seconds=s)).strftime('%Y%m%d-%H%M%S')}").mkdir(parents=True)
    taken = set(os.listdir(runs))
    code = f"""
        import logging, sys, time
        time.sleep(max(0, float(sys.argv[1]) - time.time()))
        bootstrap_log = logging.getLogger("tasks.models.bootstrap")   # what the bootstrap did, on stdout
        bootstrap_log.setLevel(logging.INFO)
        bootstrap_log.addHandler(logging.StreamHandler(sys.stdout))
        from flows.cli import app
        app(["run", "slipstream", "--output-root", {str(runs)!r}, "--set", "data.source={bad}"],
            prog_name="slipway", standalone_mode=False)
    """
    home = tmp_path / "slipway-home"
    env = {"SLIPWAY_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    logs = [tmp_path / f"run-{i}.out" for i in range(2)]   # files: a full pipe would stall a run
    start = str(time.time() + 5)
    procs = [subprocess.Popen([PY, "-c", textwrap.dedent(code), start], cwd=REPO, text=True, stdout=open(log, "w"),
                              stderr=subprocess.STDOUT, env={**os.environ, **env}) for log in logs]
    for p in procs:
        p.wait(timeout=900)
    outs = [log.read_text() for log in logs]
    folders = []
    for out in outs:
        assert "not valid JSON" in out, out[-3000:]
        stopped = [line for line in out.splitlines() if line.startswith("No report: the run stopped early (")]
        assert len(stopped) == 1, out[-3000:]
        folders.append(stopped[0].split("(", 1)[1].rstrip(")"))
    assert folders[0] != folders[1]
    for folder in folders:
        assert os.path.basename(folder) not in taken and os.path.isdir(folder)
        assert json.loads(open(os.path.join(folder, "recipe.json")).read())["name"] == "slipstream"
    converted = sum("converting " in out for out in outs)       # processes that converted the model
    reused = sum("base model cached at " in out for out in outs)  # processes that waited and reused it
    assert (converted, reused) == (1, 1), outs
    models = [p for p in (home / "models").iterdir() if not p.name.startswith(".")]
    assert len(models) == 1 and (models[0] / "slipway-source.json").exists()
