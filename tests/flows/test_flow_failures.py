"""A run that fails never looks complete; bad input stops the flow with the file and line."""

import json
import subprocess
import sys

import pytest

from conftest import ASSETS, REPO

pytestmark = pytest.mark.integration


def test_bad_dataset_line_fails_the_flow_and_the_run_folder_is_not_complete(tmp_path, base_model_dir):
    from flows.finetune import finetune
    from tasks.run import is_complete

    lines = (ASSETS / "slipstream-tiny.jsonl").read_text().splitlines()
    lines[5] = "this is not json"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    state = finetune(recipe="slipstream", overrides={"data.source": str(bad)}, output_root=str(tmp_path / "runs"),
                     run_name="broken", return_state=True)
    assert state.is_failed()
    with pytest.raises(Exception, match=rf"{bad}:6: not valid JSON"):
        state.result()
    run_dir = tmp_path / "runs" / "broken"
    assert run_dir.exists() and not is_complete(run_dir) and not (run_dir / "report.md").exists()


def test_cli_rejects_a_bad_recipe_with_one_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntraining:\n  learning_rate: -1\n  epoches: 2\n")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", str(bad)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"{bad}:3: training.learning_rate: Input should be greater than 0" in proc.stderr
    assert f"{bad}:4: training.epoches: unknown key" in proc.stderr
    assert "Traceback" not in proc.stderr
