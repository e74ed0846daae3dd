"""Names are slugs: recipe, run and release names are checked with one message, `../..` never leaves the
runs folder, and a name with a dot (`qwen2.5-7b`) still gives valid Prefect artifact keys."""

import pytest
from typer.testing import CliRunner

from flows.cli import app
from tasks.names import InvalidName, artifact_key, check_slug
from tasks.recipe import Recipe, RecipeError, load_recipe
from tasks.run import new_run_dir
from tasks.start import create_run_folder

BAD = ["../../x", "runs/../../x", "/etc", "Qwen", "a b", "-x", "x" * 64, "", "a..b", "x;rm"]


@pytest.mark.parametrize("name", ["qwen2.5-7b", "slipstream", "a", "fledgling_toolcall-2", "x" * 63])
def test_slugs_are_accepted(name):
    assert check_slug("run name", name) == name


@pytest.mark.parametrize("name", BAD)
def test_non_slugs_are_refused_with_one_message(name):
    with pytest.raises(InvalidName, match=r"^run name .* is not a valid name: use 1-63 lowercase letters"):
        check_slug("run name", name)


def test_run_folders_never_leave_the_output_root(tmp_path):
    with pytest.raises(InvalidName, match="run name '../../x' is not a valid name"):
        new_run_dir(tmp_path / "runs", "slipstream", "../../x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.rglob("data"))
    with pytest.raises(ValueError, match=r"resume_from 'runs/../../x': a path with '\.\.' is refused"):
        create_run_folder.fn(str(tmp_path / "runs"), Recipe(name="r"), resume_from="runs/../../x")


def test_recipe_and_release_names_are_validated_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: My Recipe\ndeploy:\n  ollama_model: ../evil\nrelease:\n  hub_model_repo: a/b/c\n"
                   "  hub_token_block: hf\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(bad)
    text = str(err.value)
    assert f"{bad}:1: name: Value error, recipe name 'My Recipe' is not a valid name" in text
    assert f"{bad}:3: deploy.ollama_model: Value error, ollama_model '../evil' is not a valid name" in text
    assert f"{bad}:5: release.hub_model_repo: Value error, hub_model_repo 'a/b/c' is not a valid Hub repo id" in text
    assert Recipe(name="qwen2.5-7b").name == "qwen2.5-7b"


def test_the_cli_refuses_a_traversing_run_name_before_prefect_starts(tmp_path):
    result = CliRunner().invoke(app, ["run", "slipstream", "--run-name", "runs/../../x",
                                      "--output-root", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "run name 'runs/../../x' is not a valid name" in result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_artifact_keys_derived_from_any_slug_are_valid():
    assert artifact_key("report", "qwen2.5-7b") == "report-qwen2-5-7b"
    assert artifact_key("evaluation", "fledgling_toolcall") == "evaluation-fledgling-toolcall"


def test_a_report_for_a_dotted_recipe_name_publishes_its_artifact(tmp_path):
    """Today's key `report-qwen2.5-7b` made Prefect raise after the whole run, before COMPLETE."""
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.release.report import _publish
    from tasks.run import RunFolder

    run = RunFolder(new_run_dir(tmp_path, "qwen2.5-7b"))

    @flow
    def publish():
        return _publish(Recipe(name="qwen2.5-7b"), run, "# report", "report")

    assert publish() == run.report_md
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert "report-qwen2-5-7b" in keys
