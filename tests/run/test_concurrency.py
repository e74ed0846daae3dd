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

from conftest import REPO
from tasks.run import RunFolder

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


# The cheapest whole slipstream run: 12 real rows, 2 LoRA steps on one batch of 4 (the same rows each
# step, so the loss falls), 2 test rows with short answers, one f16 GGUF served and deployed, parity on one
# row. The gates' margins are explicit: a 2-step model is not expected to beat its base, only to get
# through every stage.
TINY_RUN = ["data.source=tests/assets/slipstream-tiny.jsonl", "data.synth_rows=0", "data.eval_files=[]",
            "data.test_ratio=0.2", "data.val_ratio=0.0", "data.train_rows=4", "data.eval_rows=2",
            "lora.r=8", "lora.alpha=16", "training.max_steps=2", "training.batch_size=4", "training.logging_steps=1",
            "training.save_steps=2", "training.warmup_ratio=0.0", "training.lr_scheduler=constant",
            "export.gguf_types=[f16]", "export.serve_type=f16", "export.lora_gguf=false", "export.parity_rows=1",
            "export.template_samples=1", "eval.max_new_tokens=16", "eval.min_improvement=0.0",
            "eval.max_quant_drop=1.0", "training.compile_layers=false"]   # compiling costs more than 2 steps train


@pytest.mark.integration
def test_two_slipway_runs_at_once_both_complete_in_their_own_folders_sharing_one_bootstrapped_model(tmp_path):
    """Two `slipway run slipstream` at the same second, on a fresh model cache, both go all the way: one
    converts the base model (and its f16 GGUF) while the other waits and reuses it; each claims its own run
    folder, trains, merges, exports, serves and evaluates on its own llama-server ports, passes its gates,
    deploys, writes its report, and its CLI names the folder it really used."""
    from tasks.llamacpp.build import home as llamacpp_home

    runs = tmp_path / "runs"
    # Every default name of the next minutes is taken already, so the runs must claim `-2`, `-3`, and the
    # CLI must print those, not the name it would have guessed.
    now = datetime.now(timezone.utc)
    for s in range(-5, 300):
        (runs / f"slipstream-{(now + timedelta(seconds=s)).strftime('%Y%m%d-%H%M%S')}").mkdir(parents=True)
    taken = set(os.listdir(runs))
    overrides = [a for s in TINY_RUN for a in ("--set", s)]
    # Each run on a core of its own, as runs sharing a host are meant to be given (tasks/llamacpp/serve.py sizes a
    # server's threads to the process's CPUs, and torch's thread count follows them too: 1 on one CPU). Both on
    # both cores, each llama.cpp server's spin-waiting threads fought the other run: 3.5 s a token, 400 s for this
    # test.
    code = f"""
        import logging, os, sys, time
        if hasattr(os, "sched_setaffinity"):   # Linux
            cpus = sorted(os.sched_getaffinity(0))
            os.sched_setaffinity(0, {{cpus[int(sys.argv[2]) % len(cpus)]}})
        time.sleep(max(0, float(sys.argv[1]) - time.time()))
        bootstrap_log = logging.getLogger("tasks.models.bootstrap")   # what the bootstrap did, on stdout
        bootstrap_log.setLevel(logging.INFO)
        bootstrap_log.addHandler(logging.StreamHandler(sys.stdout))
        from flows.cli import app
        app(["run", "slipstream", "--output-root", {str(runs)!r}, *{overrides!r}],
            prog_name="slipway", standalone_mode=False)
    """
    home = tmp_path / "slipway-home"
    # A fresh model cache, but the llama.cpp tools `make setup` built (never built at run time).
    env = {"SLIPWAY_HOME": str(home), "SLIPWAY_LLAMA_CPP": str(llamacpp_home()),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    logs = [tmp_path / f"run-{i}.out" for i in range(2)]   # files: a full pipe would stall a run
    start = str(time.time() + 5)
    procs = [subprocess.Popen([PY, "-c", textwrap.dedent(code), start, str(i)], cwd=REPO, text=True,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env={**os.environ, **env})
             for i, log in enumerate(logs)]
    for p in procs:
        p.wait(timeout=1200)
    outs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(out[-4000:] for out in outs)
    folders = []
    for out in outs:
        reports = [line.removeprefix("Report: ") for line in out.splitlines() if line.startswith("Report: ")]
        assert len(reports) == 1, out[-3000:]
        folders.append(RunFolder(os.path.dirname(reports[0])))
    assert folders[0].root != folders[1].root
    for run in folders:
        assert run.name not in taken and run.root.parent == runs
        assert run.is_complete() and run.report_md.exists()
        assert json.loads(run.recipe_json.read_text())["training"]["max_steps"] == 2
        assert [h["step"] for h in json.loads(run.training_stats.read_text())["history"] if "loss" in h] == [1, 2]
        assert (run.merged_dir / "config.json").exists() and run.gguf("f16").stat().st_size > 50_000_000
        assert set(json.loads(run.gguf_manifest.read_text())) == {"f16", "merged", "adapter"}
        for label in ("base", "merged", "gguf-f16"):   # each evaluated through its own llama-server
            assert json.loads(run.eval_metrics(label).read_text())["rows"] == 2
            assert run.server_log(label).exists()
        assert run.parity.exists()
        deployed = json.loads(run.deploy_record.read_text())
        assert deployed["target"] == "llamacpp" and deployed["test_chat"]["answer"].strip()
        report = run.report_md.read_text()
        assert "FAIL" not in report and run.name in report
    converted = sum("converting " in out for out in outs)       # processes that converted the model
    reused = sum("base model cached at " in out for out in outs)  # processes that waited and reused it
    assert (converted, reused) == (1, 1), outs
    models = sorted(p.name for p in (home / "models").iterdir() if not p.name.startswith("."))
    assert len(models) == 2 and models[1] == f"{models[0]}-f16.gguf", models   # one HF folder, one base GGUF
    assert (home / "models" / models[0] / "slipway-source.json").exists()
