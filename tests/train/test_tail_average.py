"""training.average_tail (tasks/train/averaging.py): the weights a run keeps are the mean of the iterates over
the schedule's tail, computed by a real Trainer on a small random Llama; the evaluation at the end of training
scores that mean; an early stop (the time budget's deadline) averages what it trained of the tail; the worker
wires it and reports it."""

import pytest

from tasks.train.averaging import TailAverage


def _tiny_peft_llama():
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def _trainable(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(tmp_path, tail: float, stop_at: int | None = None):
    """12 steps planned (24 rows, batch 2, one epoch) at a constant, large learning rate, every iterate recorded
    before TailAverage sees it; `stop_at`: a callback ahead of it stops training there, as the deadline does."""
    import torch
    from datasets import Dataset
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = _tiny_peft_llama()
    iterates: dict[int, dict] = {}

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            iterates[state.global_step] = _trainable(model)
            if stop_at is not None and state.global_step == stop_at:
                control.should_training_stop = True

    ids = torch.randint(0, 256, (24, 10), generator=torch.Generator().manual_seed(1)).tolist()
    rows = [{"input_ids": r, "labels": r} for r in ids]
    args = TrainingArguments(output_dir=str(tmp_path), num_train_epochs=1, per_device_train_batch_size=2,
                             per_device_eval_batch_size=4, learning_rate=1e-2, lr_scheduler_type="constant",
                             eval_strategy="epoch", save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_steps=1)
    averaging = TailAverage(model, tail)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      eval_dataset=Dataset.from_list(rows[:8]), callbacks=[Record(), averaging])
    trainer.train()
    return trainer, model, averaging, iterates


def _mean(snapshots: list[dict]) -> dict:
    import torch

    return {n: torch.stack([s[n] for s in snapshots]).mean(0) for n in snapshots[0]}


def test_the_kept_weights_are_the_mean_of_the_tail_and_the_evaluation_scores_them(tmp_path):
    import torch

    trainer, model, averaging, iterates = _train(tmp_path, tail=0.25)
    assert sorted(iterates) == list(range(1, 13))
    assert averaging.report() == {"steps": 3, "from_step": 10, "to_step": 12}   # the last quarter of 12 steps
    kept, expected, last = _trainable(model), _mean([iterates[s] for s in (10, 11, 12)]), iterates[12]
    assert kept.keys() == expected.keys() and len(kept) == 8   # 2 layers x q/v x A/B
    for name in kept:
        assert torch.allclose(kept[name], expected[name], atol=1e-6), name
    # The learning rate moved the weights between those steps, so the mean is not the last iterate.
    assert any(not torch.allclose(kept[n], last[n], atol=1e-4) for n in kept)
    # The epoch's evaluation ran after the mean was written: it scored the weights that are kept.
    logged = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]
    assert len(logged) == 1
    assert logged[0] == pytest.approx(trainer.evaluate()["eval_loss"], rel=1e-6)


def test_an_early_stop_averages_what_it_trained_of_the_tail(tmp_path):
    import torch

    _, model, averaging, iterates = _train(tmp_path, tail=0.75, stop_at=5)
    assert sorted(iterates) == [1, 2, 3, 4, 5]
    assert averaging.report() == {"steps": 2, "from_step": 4, "to_step": 5}   # the tail began at step 4 of 12
    kept, expected = _trainable(model), _mean([iterates[4], iterates[5]])
    for name in kept:
        assert torch.allclose(kept[name], expected[name], atol=1e-6), name


def test_a_stop_before_the_tail_keeps_the_last_weights(tmp_path):
    import torch

    _, model, averaging, iterates = _train(tmp_path, tail=0.25, stop_at=4)
    assert averaging.report() is None
    kept = _trainable(model)
    assert all(torch.equal(kept[n], iterates[4][n]) for n in kept)


def test_the_share_is_validated():
    from tasks.recipe import RecipeError, load_recipe

    with pytest.raises(ValueError, match="average_tail must be in"):
        TailAverage(None, 1.0)
    with pytest.raises(RecipeError, match="training.average_tail"):
        load_recipe("slipstream", {"training.average_tail": 1.0})
    with pytest.raises(RecipeError, match="training.average_tail averages local training steps"):
        load_recipe("gerbil-local", {"together.model": "org/tiny", "training.average_tail": 0.3})
    assert load_recipe("slipstream", {"training.average_tail": 0.3}).training.average_tail == 0.3


@pytest.mark.integration
def test_the_worker_saves_the_tail_average(tmp_path, base_model_dir, tiny_rows):
    """The real worker (SFTTrainer, completion_nll) on a two-layer random Llama with SmolLM2's tokenizer: the
    last half of 4 steps averaged, reported in the training stats, the adapter saved."""
    from tasks.recipe import Recipe
    from tasks.run import RunFolder, atomic_write_jsonl, new_run_dir
    from tasks.train import worker
    from tests.tiny_models import tiny_model

    base = tiny_model("llama", base_model_dir, tmp_path / "tiny-llama")
    recipe = Recipe(name="averaged")
    recipe.training.loss_type = "completion_nll"
    recipe.training.batch_size = 2
    recipe.training.max_steps = 4
    recipe.training.average_tail = 0.5
    run_dir = new_run_dir(tmp_path, "averaged")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:8])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", tiny_rows[8:10])
    stats = worker.train(recipe, run_dir, base)
    assert stats["steps"] == 4
    assert stats["tail_average"] == {"steps": 2, "from_step": 3, "to_step": 4}
    assert (RunFolder(run_dir).lora_dir / "adapter_model.safetensors").exists()
