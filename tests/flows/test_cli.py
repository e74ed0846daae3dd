"""`slipway`: every command answers --help, bad input stops with one message, and real commands run."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import ASSETS, REPO
from flows.cli import app, parse_overrides

COMMANDS = ("run", "evaluate", "synthesize", "tracks", "serve", "check-template", "convert", "deploy")
runner = CliRunner()


def test_the_installed_script_is_this_app():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"slipway": "flows.cli:app"}


def test_help_lists_every_command_and_each_has_its_own_help():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.output
        sub = runner.invoke(app, [command, "--help"])
        assert sub.exit_code == 0 and "Usage:" in sub.output, (command, sub.output)


def test_set_values_are_read_as_yaml():
    assert parse_overrides(["training.max_steps=5", "data.source=a=b.jsonl", "eval.flag=true", "x=[1, 2]"]) == \
        {"training.max_steps": 5, "data.source": "a=b.jsonl", "eval.flag": True, "x": [1, 2]}
    assert parse_overrides(None) == {}


def test_a_bad_recipe_stops_before_prefect_with_one_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntraining:\n  learning_rate: -1\n  epoches: 2\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(bad), "--output-root", str(tmp_path / "runs")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{bad}:3: training.learning_rate: Input should be greater than 0" in proc.stderr
    assert f"{bad}:4: training.epoches: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_tracks_check_every_recipe_before_prefect_starts(tmp_path):
    result = runner.invoke(app, ["tracks", "fledgling-structured", "no-such-recipe", "--set", "training.max_steps=2",
                                 "--output-root", str(tmp_path / "runs")])
    assert result.exit_code == 2 and "no-such-recipe.yaml: recipe not found" in result.output
    assert not (tmp_path / "runs").exists()


def test_convert_writes_the_target_format(tmp_path):
    out = tmp_path / "tiny-together.jsonl"
    result = runner.invoke(app, ["convert", str(ASSETS / "slipstream-tiny.jsonl"), str(out), "--to", "together"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert f"wrote {len(rows)} rows to {out} (together)" in result.output
    assert len(rows) == 12 and set(rows[0]) == {"messages"}
    assert runner.invoke(app, ["convert", str(out), str(out), "--to", "toml"]).exit_code == 2   # not a format


def test_synthesize_runs_the_flow_and_prints_its_report(tmp_path):
    """In its own process, as `slipway` runs: the flow starts Prefect's temporary server."""
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "synthesize", "--set", "method=templates", "-n", "20",
                           "--set", "seed=3", "--output-dir", str(tmp_path / "synth")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"Report: {tmp_path / 'synth' / 'synthesis-report.md'}" in proc.stdout
    assert json.loads((tmp_path / "synth" / "synthesis-report.json").read_text())["counts"]["written"] == 20


@pytest.mark.integration
def test_run_with_a_tiny_override_set_writes_the_report(tmp_path, base_model_dir):
    small = ["training.max_steps=3", "training.logging_steps=1", "data.train_rows=12", "data.eval_rows=4",
             "eval.max_new_tokens=24", "eval.min_improvement=0.0", "eval.max_quant_drop=1.0",
             # The recipe's export (f16, q8_0, q4_k_m, LoRA GGUF) stays; parity on 2 rows, not 12.
             "export.parity_rows=2", "data.synth_rows=200",
             # three steps: compiling the layers would cost more than they train (tests/train/test_compile_layers.py)
             "training.compile_layers=false"]
    args = ["run", "slipstream", "--run-name", "via-cli", "--output-root", str(tmp_path / "runs")]
    proc = subprocess.run([sys.executable, "-m", "flows.cli", *args, *[a for s in small for a in ("--set", s)]],
                          cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"Report: {tmp_path / 'runs' / 'via-cli' / 'report.md'}" in proc.stdout
    assert (tmp_path / "runs" / "via-cli" / "COMPLETE").exists()


@pytest.mark.integration
def test_a_run_that_stops_early_names_the_folder_it_claimed(tmp_path):
    """A failed run's CLI finds its folder by the flow run (tasks.run.find_run_of_flow_run), never by the name
    it would have guessed: with every default name of the next minutes taken, that folder is a `-2`."""
    from datetime import datetime, timedelta, timezone

    lines = (ASSETS / "slipstream-tiny.jsonl").read_text().splitlines()
    lines[3] = "not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    runs = tmp_path / "runs"
    now = datetime.now(timezone.utc)
    for s in range(-5, 300):
        (runs / f"slipstream-{(now + timedelta(seconds=s)).strftime('%Y%m%d-%H%M%S')}").mkdir(parents=True)
    taken = {p.name for p in runs.iterdir()}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "slipstream", "--output-root", str(runs),
                           "--set", f"data.source={bad}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1 and f"{bad}:4: not valid JSON" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    stopped = [line for line in proc.stdout.splitlines() if line.startswith("No report: the run stopped early (")]
    assert len(stopped) == 1, proc.stdout[-3000:]
    folder = Path(stopped[0].split("(", 1)[1].rstrip(")"))
    assert folder.parent == runs and folder.name not in taken and folder.name.endswith("-2")
    assert json.loads((folder / "recipe.json").read_text())["name"] == "slipstream"
