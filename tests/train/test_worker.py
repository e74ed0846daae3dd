"""The training worker and its launcher without training: what the worker imports, the command that
starts it, the tokenizer it trains with (the recipe's chat template) and the loss-mask view."""

import re
import subprocess
import sys

import pytest

from conftest import REPO
from tasks.models.chat_templates import NAMED_TEMPLATES, render_named
from tasks.recipe import ModelConfig, Recipe
from tasks.train.launch import resolve_accelerate_config, training_command
from tasks.train.mask_view import highlight_mask, main
from tasks.train.worker import prepare_tokenizer, tokenize_row


@pytest.fixture
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


def test_the_worker_imports_nothing_of_prefect():
    """What `accelerate launch` starts on a GPU machine: importing it and reading its recipe needs no Prefect."""
    code = ("import sys\nimport tasks.train.worker\nfrom tasks.recipe import Recipe\n"
            "Recipe.model_validate_json(Recipe(name='x').model_dump_json())\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_accelerate_configs_resolve_and_unknown_names_fail(tmp_path):
    assert resolve_accelerate_config("ddp").name == "ddp.yaml"
    with pytest.raises(ValueError, match=r"not a file and not one of \['ddp', 'single_gpu', 'zero2'\]"):
        resolve_accelerate_config("fsdp9")
    recipe = Recipe(name="x")
    assert training_command(recipe, tmp_path, tmp_path)[1:] == ["-m", "tasks.train.worker", str(tmp_path),
                                                                "--base", str(tmp_path)]
    recipe.training.accelerate_config = "zero2"
    cmd = training_command(recipe, tmp_path, tmp_path, gpus=2)
    assert cmd[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert cmd[-5:-3] == ["-m", "tasks.train.worker"]


def test_a_named_chat_template_is_trained_on_and_saved_with_the_adapter(tokenizer, tiny_rows, tmp_path):
    from transformers import AutoTokenizer

    own_template = tokenizer.chat_template
    row = {"messages": tiny_rows[0]["messages"][1:]}   # no system turn: SmolLM2's own template adds one
    own = tokenizer.decode(tokenize_row(row, tokenizer, 512)["input_ids"])
    assert own.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")

    prepare_tokenizer(tokenizer, ModelConfig(chat_template="chatml"))
    assert tokenizer.chat_template == NAMED_TEMPLATES["chatml"].jinja
    tokenized = tokenizer.decode(tokenize_row(row, tokenizer, 512)["input_ids"])
    assert tokenized == render_named(row["messages"], "chatml")
    tokenizer.save_pretrained(tmp_path)   # what the worker writes into lora/, which export and deploy read
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == NAMED_TEMPLATES["chatml"].jinja

    prepare_tokenizer(tokenizer, ModelConfig())   # 'model' keeps whatever template the tokenizer has
    assert tokenizer.chat_template == NAMED_TEMPLATES["chatml"].jinja != own_template


def test_a_template_whose_turns_the_vocabulary_cannot_end_is_refused(tokenizer):
    with pytest.raises(ValueError, match=r"'llama-3\.1' ends a turn with '<\|eot_id\|>', which is not a token"):
        prepare_tokenizer(tokenizer, ModelConfig(chat_template="llama-3.1"))


def test_mask_view_brackets_exactly_the_assistant_answer(tokenizer, tiny_rows):
    row = tiny_rows[0]
    tok = tokenize_row(row, tokenizer, 512)
    plain = highlight_mask(tokenizer, tok["input_ids"], tok["completion_mask"], color=False)
    assert plain.count("[[") == 1 and plain.count("]]") == 1
    before, inside = plain.split("[[")
    inside, after = inside.split("]]")
    assert inside == row["messages"][-1]["content"] + "<|im_end|>\n" and after == ""
    assert before == tokenizer.apply_chat_template(row["messages"][:-1], tokenize=False, add_generation_prompt=True)
    colored = highlight_mask(tokenizer, tok["input_ids"], tok["completion_mask"], color=True)
    assert colored == before + "\x1b[1;32m" + inside + "\x1b[0m"


def test_mask_view_prints_a_recipe_row_with_the_mask(capsys):
    assert main(["--recipe", "slipstream", "--row", "3"]) == 0
    header, body = capsys.readouterr().out.split("\n", 1)
    assert header.startswith("# recipe slipstream, train row 3, template model")
    assert "[[THOUGHT: " in body and body.rstrip("\n").endswith("<|im_end|>\n]]".rstrip("\n"))
    assert main(["--recipe", "slipstream", "--row", "3", "--template", "chatml"]) == 0
    assert capsys.readouterr().out.startswith("# recipe slipstream, train row 3, template chatml")
    assert main(["--recipe", "slipstream", "--row", "100000"]) == 2
    assert re.search(r"--row 100000: the train split has rows 0\.\.\d+", capsys.readouterr().err)


def test_last_layers_puts_adapters_on_the_top_layers_only(base_model_dir):
    """lora.last_layers: adapters (the only trainable weights) in the last N decoder layers, so the
    backward pass stops there; more layers than the model has is refused with both numbers."""
    from tasks.train.worker import load_model

    recipe = Recipe(name="x")
    recipe.lora.last_layers = 4
    model, _ = load_model(recipe, base_model_dir)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert {int(re.search(r"layers\.(\d+)\.", n).group(1)) for n in trained} == {26, 27, 28, 29}
    assert len(trained) == 4 * 7 * 2   # 7 target modules, A and B each
    recipe.lora.last_layers = 31
    with pytest.raises(ValueError, match="lora.last_layers is 31, but the model has 30 decoder layers"):
        load_model(recipe, base_model_dir)


def test_the_time_budget_keeps_the_rows_whose_steps_fit():
    """training.time_budget_s: after the probe's own seconds and the validation pass, as many whole optimizer
    steps as fit at the probed step time; the rows of those steps are kept."""
    from tasks.train.worker import rows_within_budget

    plan = rows_within_budget(100.0, step_s=1.0, probe_s=4.0, rows=1000, val_rows=0, batch_size=4, grad_accum=1,
                              epochs=1)
    steps = plan["rows_kept"] // 4
    assert plan["rows_kept"] % 4 == 0 and plan["rows_available"] == 1000
    assert 4.0 + steps * 1.0 <= 100.0 < 4.0 + (steps + 1) * 1.0   # the last step that fits
    assert plan["predicted_train_s"] == pytest.approx(4.0 + steps * 1.0, abs=0.1)
    # Validation batches (forward only) and a second epoch are paid for out of the same budget.
    with_val = rows_within_budget(100.0, 1.0, 4.0, 1000, val_rows=60, batch_size=4, grad_accum=1, epochs=1)
    assert with_val["rows_kept"] < plan["rows_kept"]
    two_epochs = rows_within_budget(100.0, 1.0, 4.0, 1000, val_rows=0, batch_size=4, grad_accum=1, epochs=2)
    assert two_epochs["rows_kept"] == pytest.approx(plan["rows_kept"] / 2, abs=4)
    # Never more rows than there are, never less than one optimizer step's worth.
    assert rows_within_budget(1e6, 1.0, 4.0, 1000, 0, 4, 1, 1)["rows_kept"] == 1000
    assert rows_within_budget(1.0, 1.0, 4.0, 1000, 0, 4, 2, 1)["rows_kept"] == 8


def test_a_flow_time_budget_shrinks_training_on_a_slow_machine_only():
    """training.flow_time_budget_s: the other stages cost other_stages_steps probed steps, so a slower step leaves
    training less of the flow's time; a fast machine stays at time_budget_s."""
    from tasks.recipe import TrainingConfig
    from tasks.train.worker import training_budget_s

    cfg = TrainingConfig(time_budget_s=600, flow_time_budget_s=900, other_stages_steps=500)
    assert training_budget_s(cfg, 0.4) == 600          # 900 - 200 = 700: capped at time_budget_s
    assert training_budget_s(cfg, 0.8) == 500          # 900 - 400
    assert training_budget_s(cfg, 1.0) == 400          # twice as slow a step: the others take 100 s more
    assert training_budget_s(TrainingConfig(time_budget_s=600), 5.0) == 600   # no flow budget: the budget as set
    # A machine too slow to end the flow in time keeps the floor: a few dozen rows would train nothing of use.
    floored = TrainingConfig(time_budget_s=600, flow_time_budget_s=900, other_stages_steps=500, min_time_budget_s=450)
    assert training_budget_s(floored, 0.8) == 500 and training_budget_s(floored, 2.0) == 450


@pytest.mark.parametrize("override, message", [
    ({"training.engine": "together"}, "Together trains every row it is sent"),
    ({"training.accelerate_config": "ddp", "training.loss_type": "nll"}, "for one training process"),
    ({"training.packing": True}, "times unpacked batches"),
])
def test_a_time_budget_with_what_it_cannot_time_is_refused(override, message):
    from tasks.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe("slipstream", {"training.time_budget_s": 300, **override})
