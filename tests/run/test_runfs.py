import json
import os

import pytest

from tasks.run import (RUN_SUBDIRS, atomic_dir, atomic_write_json, is_complete, mark_complete, new_run_dir,
                         stage_timer)


def test_run_folders_are_isolated_and_never_reused(tmp_path):
    first = new_run_dir(tmp_path, "r", "same")
    assert all((first / sub).is_dir() for sub in RUN_SUBDIRS)
    with pytest.raises(FileExistsError, match="same exists: choose another name"):
        new_run_dir(tmp_path, "r", "same")     # a name the user chose is theirs exactly, or refused
    default = new_run_dir(tmp_path, "r")
    again = new_run_dir(tmp_path, "r")         # the same second: the default name gets a suffix
    assert default != again and again.name.startswith(default.name[:len("r-20261130-")])


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 1}   # the old content survives
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]   # no temp file left behind


def test_atomic_dir_appears_only_on_success(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "half.bin").write_bytes(b"1")
            raise RuntimeError("crash mid-write")
    assert not (tmp_path / "merged").exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "whole.bin").write_bytes(b"1")
    assert (tmp_path / "merged" / "whole.bin").exists()


def test_stage_timer_records_failures_and_complete_marker(tmp_path):
    run = new_run_dir(tmp_path, "r")
    with stage_timer(run, "ok-stage"):
        pass
    with pytest.raises(ValueError):
        with stage_timer(run, "bad-stage"):
            raise ValueError("boom")
    timings = json.loads((run / "metrics" / "timings.json").read_text())
    assert timings["ok-stage"]["status"] == "ok" and timings["bad-stage"]["status"] == "failed"
    assert not is_complete(run)
    mark_complete(run, {"gates": []})
    assert is_complete(run)


def test_resume_refuses_complete_or_foreign_runs(tmp_path):
    from tasks.recipe import Recipe
    from tasks.start import create_run_folder

    recipe = Recipe(name="r")
    run = create_run_folder.fn(str(tmp_path), recipe, "first")
    assert create_run_folder.fn(str(tmp_path), recipe, resume_from=str(run)) == run
    other = Recipe(name="r")
    other.training.learning_rate = 0.5
    with pytest.raises(ValueError, match="different recipe"):
        create_run_folder.fn(str(tmp_path), other, resume_from=str(run))
    mark_complete(run, {})
    with pytest.raises(ValueError, match="that run completed"):
        create_run_folder.fn(str(tmp_path), recipe, resume_from=str(run))
    with pytest.raises(ValueError, match="not a run folder"):
        create_run_folder.fn(str(tmp_path), recipe, resume_from=str(tmp_path / "nope"))


def test_a_completed_stage_is_recorded_and_not_run_again_in_that_folder(tmp_path):
    from pathlib import Path

    from tasks.run import RunFolder, resumable_stage, rotate_log

    calls = []

    @resumable_stage(lambda args: f"eval-{args['label']}")
    def measure(run_dir, label: str) -> dict:
        calls.append(label)
        return {"label": label, "model": Path("/models/x"), "scores": [1.0, 0.5]}

    run = new_run_dir(tmp_path, "r")
    first = measure(run, "base")
    assert measure(run, "base") == first and isinstance(first["model"], Path)   # the recorded result, paths intact
    measure(run, "merged")
    assert calls == ["base", "merged"]
    assert json.loads(RunFolder(run).stage_record("eval-base").read_text())["result"]["scores"] == [1.0, 0.5]
    # A stage that raised is not recorded: the resumed run runs it again.

    @resumable_stage("train")
    def broken(run_dir):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        broken(run)
    assert not RunFolder(run).stage_record("train").exists()
    log = RunFolder(run).train_log
    log.write_text("attempt 1\n")
    assert rotate_log(log).name == "train.1.log" and not log.exists()
    log.write_text("attempt 2\n")
    assert rotate_log(log).name == "train.2.log"
    assert (log.parent / "train.1.log").read_text() == "attempt 1\n"
