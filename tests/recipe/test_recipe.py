from pathlib import Path

import pytest

from tasks.tasktypes import check_recipe, primary_metric
from tasks.recipe import RECIPES_DIR, Recipe, RecipeError, load_recipe


@pytest.mark.parametrize("path", sorted(RECIPES_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    assert isinstance(check_recipe(load_recipe(path)), Recipe)


def test_name_resolves_to_recipes_folder():
    assert load_recipe("slipstream").name == "slipstream"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "name: x\ntraining:\n  epochs: 1\n  learnin_rate: 0.1\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{path}:4: training.learnin_rate: unknown key" in str(err.value)


def test_negative_learning_rate_names_field_and_bound(tmp_path):
    path = write(tmp_path, "name: x\ntraining:\n  learning_rate: -0.001\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert f"{path}:3: training.learning_rate:" in message
    assert "greater than 0" in message and "-0.001" in message


def test_bad_choice_lists_allowed_values(tmp_path):
    path = write(tmp_path, "name: x\nexport:\n  gguf_types: [f16, q3_weird]\n  serve_type: f16\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert "export.gguf_types.1" in str(err.value) and "'q4_k_m'" in str(err.value)


def test_cross_field_rule(tmp_path):
    path = write(tmp_path, "name: x\nexport:\n  gguf_types: [f16]\n  serve_type: q8_0\n")
    with pytest.raises(RecipeError, match="serve_type 'q8_0' must be one of gguf_types"):
        load_recipe(path)


def test_missing_recipe_lists_known(tmp_path):
    with pytest.raises(RecipeError, match="known recipes: .*slipstream"):
        load_recipe("no-such-recipe")


def test_overrides_are_validated_too():
    assert load_recipe("slipstream", {"training.max_steps": 3}).training.max_steps == 3
    with pytest.raises(RecipeError, match="training.batch_size"):
        load_recipe("slipstream", {"training.batch_size": 0})


def test_task_types_baseline_and_primary_metric_are_validated(tmp_path):
    assert primary_metric(load_recipe("fledgling-toolcall")) == "call_exact"
    assert primary_metric(load_recipe("slipstream")) == "anchor_accuracy"
    with pytest.raises(RecipeError, match="'valid_json' is not a slipstream metric"):
        check_recipe(load_recipe("slipstream", {"eval.primary_metric": "valid_json"}))
    with pytest.raises(RecipeError, match="baseline: .*needs block: '<block-type-slug>/<block-name>'"):
        load_recipe("fledgling-structured", {"baseline.source": "block"})
    with pytest.raises(RecipeError, match="label 'base' is taken"):
        load_recipe("fledgling-structured", {"baseline.label": "base"})
    with pytest.raises(RecipeError, match="task 'structured' reads data.format 'eval'"):
        check_recipe(load_recipe("fledgling-structured", {"data.format": "sharegpt"}))
    path = write(tmp_path, "name: x\ntask: translation\n")
    with pytest.raises(RecipeError, match=r"task 'translation' is not a registered task type; one of .*'toolcall'"):
        check_recipe(load_recipe(path))   # the registry, not the recipe model, knows the task types
