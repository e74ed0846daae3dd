"""A run that fails never looks complete; bad input stops the flow with the file and line (a bad recipe stops
`slipway` before the flow starts: tests/flows/test_cli.py)."""

import pytest

from conftest import ASSETS
from flows.finetune import finetune
from tasks.run import is_complete

pytestmark = pytest.mark.integration


def test_bad_dataset_line_fails_the_flow_and_the_run_folder_is_not_complete(tmp_path, base_model_dir):
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

