"""Real LoRA training of SmolLM2-135M on CPU: a few steps, asserting it learned something."""

import json

import pytest

from tasks.recipe import Recipe
from tasks.run import atomic_write_jsonl, new_run_dir
from tasks.train.worker import MaskError, check_mask, tokenize_row, train

pytestmark = pytest.mark.integration


def test_training_changes_every_lora_tensor_and_lowers_the_loss(trained_run):
    run_dir, stats = trained_run
    assert stats["steps"] == 8
    assert stats["trainable_tensors"] > 0
    assert stats["trainable_tensors_changed"] == stats["trainable_tensors"]
    losses = [h["loss"] for h in stats["history"] if "loss" in h]
    assert len(losses) == 8
    assert losses[-1] < 0.7 * losses[0], losses   # same batch 8 times at lr 1e-3: the loss must drop
    assert (run_dir / "lora" / "adapter_model.safetensors").exists()
    assert (run_dir / "metrics" / "loss-curve.png").stat().st_size > 10_000
    saved = json.loads((run_dir / "metrics" / "training-stats.json").read_text())
    assert saved["final_loss"] == losses[-1]
    # Warm-up and steady state are timed apart (bench/train_throughput.py reads both): step 1, then steps 2-8.
    assert 0 < saved["first_step_seconds"] < saved["seconds"]
    assert 0 < saved["steady_seconds"] < saved["seconds"] - saved["first_step_seconds"] + 0.5
    assert any(p.name.startswith("checkpoint-") for p in (run_dir / "checkpoints").iterdir())


def test_mask_covers_exactly_the_assistant_turn(trained_run, base_model_dir, tiny_rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenized = [tokenize_row(r, tokenizer, 256) for r in tiny_rows]
    report = check_mask(tokenized, tiny_rows, tokenizer)
    assert report["assistant_share_of_labels"] == 1.0
    assert 0.3 < report["label_token_share"] < 0.9
    first = tokenized[0]
    trained_text = tokenizer.decode([t for t, m in zip(first["input_ids"], first["completion_mask"]) if m])
    assert trained_text.startswith(tiny_rows[0]["messages"][-1]["content"])
    assert trained_text.rstrip().endswith("<|im_end|>")   # the model must learn to stop


def test_zero_trainable_tokens_fails(base_model_dir, tiny_rows):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_model_dir)
    tokenized = [tokenize_row(r, tokenizer, 20) for r in tiny_rows]   # cut before the answer starts
    with pytest.raises(MaskError, match="zero trainable label tokens"):
        check_mask(tokenized, tiny_rows, tokenizer)


def test_training_resumes_from_the_last_checkpoint(tmp_path, base_model_dir, tiny_rows):
    """A crash after step 2 loses nothing: the next attempt restarts from checkpoint-2, not from step 0."""
    recipe = Recipe(name="resume")
    recipe.training.batch_size = 4
    recipe.training.logging_steps = 1
    recipe.training.save_steps = 2
    recipe.training.max_steps = 2
    run_dir = new_run_dir(tmp_path, "resume")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:8])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", [])
    first = train(recipe, run_dir, base_model_dir)   # stands in for the attempt that died after its checkpoint
    assert (run_dir / "checkpoints" / "checkpoint-2").is_dir()
    recipe.training.max_steps = 4
    stats = train(recipe, run_dir, base_model_dir)
    losses = {h["step"]: h["loss"] for h in stats["history"] if "loss" in h}
    assert stats["steps"] == 4 and sorted(losses) == [1, 2, 3, 4]
    # Steps 1-2 come back from the checkpoint's state, byte for byte: they were not trained again.
    assert [losses[1], losses[2]] == [h["loss"] for h in first["history"] if "loss" in h]


def test_packed_training_learns_on_the_answers_only(tmp_path, base_model_dir, tiny_rows):
    """The fast path on CPU: rows packed into fixed 384-token sequences, as many optimizer steps as the
    padded path would take (tokens_per_step 0), loss on the answers, every LoRA tensor trained."""
    recipe = Recipe(name="packed")
    recipe.training.packing = True
    recipe.training.pack_length = 384
    recipe.training.epochs = 3
    recipe.training.batch_size = 2
    recipe.training.logging_steps = 1
    recipe.training.save_steps = 100
    recipe.training.warmup_ratio = 0.0
    recipe.training.lr_scheduler = "constant"
    run_dir = new_run_dir(tmp_path, "packed")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:8])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", tiny_rows[8:10])
    stats = train(recipe, run_dir, base_model_dir)
    packing = stats["packing"]
    assert packing["sequence_length"] == 384 and packing["sequences"] < 8       # several rows a sequence
    assert packing["sequences_per_device_batch"] == 1                          # 2 rows of ~150 tokens
    assert stats["steps"] == 3 * packing["sequences"]
    assert stats["trainable_tensors_changed"] == stats["trainable_tensors"]
    losses = [h["loss"] for h in stats["history"] if "loss" in h]
    assert losses[-1] < 0.8 * losses[0], losses
    assert stats["eval_loss"] is not None                                      # packed val rows evaluate


def test_loraplus_and_the_plain_nll_loss_train_the_adapter(tmp_path, base_model_dir, tiny_rows):
    """training.loraplus_lr_ratio builds PEFT's LoRA+ optimizer (B matrices at ratio x lr) and
    training.loss_type 'nll' and 'completion_nll' are the same loss as TRL's default 'chunked_nll': equal
    first-step loss."""
    first_losses = {}
    for loss_type, ratio in (("chunked_nll", None), ("nll", 16.0), ("completion_nll", None)):
        recipe = Recipe(name=f"loss-{loss_type}")
        recipe.training.batch_size = 4
        recipe.training.logging_steps = 1
        recipe.training.save_steps = 100
        recipe.training.max_steps = 4
        recipe.training.loss_type = loss_type
        recipe.training.loraplus_lr_ratio = ratio
        run_dir = new_run_dir(tmp_path, loss_type)
        atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:8])
        atomic_write_jsonl(run_dir / "data" / "val.jsonl", [])
        stats = train(recipe, run_dir, base_model_dir)
        losses = [h["loss"] for h in stats["history"] if "loss" in h]
        first_losses[loss_type] = losses[0]
        assert stats["trainable_tensors_changed"] == stats["trainable_tensors"]
        assert losses[-1] < losses[0], losses
        # TRL's per-step metrics are logged on every path (completion_nll computes them on the answer tokens)
        assert all(0 <= h["mean_token_accuracy"] <= 1 and h["entropy"] > 0 for h in stats["history"] if "loss" in h)
    # bf16 autocast on some CPUs: the losses round the same logits differently, not by more.
    assert first_losses["nll"] == pytest.approx(first_losses["chunked_nll"], rel=2e-2)
    assert first_losses["completion_nll"] == pytest.approx(first_losses["chunked_nll"], rel=2e-2)


def test_the_loraplus_optimizer_puts_b_matrices_at_the_ratio(base_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers import TrainingArguments

    from tasks.train.worker import loraplus_optimizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model_dir),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir="unused", learning_rate=2e-4, use_cpu=True, report_to=[])
    assert loraplus_optimizer(model, args, None) is None   # the Trainer builds its own
    opt = loraplus_optimizer(model, args, 8.0)
    assert isinstance(opt, torch.optim.AdamW)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert lr_of[id(p)] == pytest.approx(2e-4 * (8.0 if "lora_B" in name else 1.0)), name
    assert len(lr_of) == sum(p.requires_grad for p in model.parameters())


def test_a_time_budget_trains_the_rows_that_fit_and_a_resumed_run_keeps_them(tmp_path, base_model_dir, tiny_rows):
    """training.time_budget_s probes the step time on real rows, trains the first rows that fit, writes the
    decision to the run folder; a second attempt (a resumed run) reads it back instead of probing again."""
    recipe = Recipe(name="budget")
    recipe.training.batch_size = 2
    recipe.training.epochs = 1
    recipe.training.save_steps = 100
    recipe.training.time_budget_s = 1.0   # below the probe's own time: one optimizer step is the floor
    recipe.training.loss_type = "completion_nll"   # the probe times the loss training uses
    run_dir = new_run_dir(tmp_path, "budget")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:10])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", [])
    stats = train(recipe, run_dir, base_model_dir)
    decision = json.loads((run_dir / "metrics" / "training-budget.json").read_text())
    assert decision["rows_available"] == 10 and decision["rows_kept"] == 2
    assert decision["probe_step_s"] > 0 and decision["probe_s"] > 0
    assert stats["time_budget"] == {**decision, "stopped_at_step": None} and stats["train_rows"] == 2
    assert stats["steps"] == 1

    # The decision stands for the run: a later attempt trains the rows it names (here, edited to 6).
    decision["rows_kept"] = 6
    recipe.training.time_budget_s = 10_000.0
    run2 = new_run_dir(tmp_path, "budget")
    atomic_write_jsonl(run2 / "data" / "train.jsonl", tiny_rows[:10])
    atomic_write_jsonl(run2 / "data" / "val.jsonl", [])
    (run2 / "metrics").mkdir(parents=True, exist_ok=True)
    (run2 / "metrics" / "training-budget.json").write_text(json.dumps(decision))
    stats = train(recipe, run2, base_model_dir)
    assert stats["train_rows"] == 6 and stats["steps"] == 3
    assert 0 < stats["tokens_seen"] < stats["mask"]["tokens"]   # the kept rows' tokens, of all 10 rows'

    # training.max_steps wins over the budget: no probe, no decision, the steps asked for.
    recipe.training.max_steps = 2
    run3 = new_run_dir(tmp_path, "budget")
    atomic_write_jsonl(run3 / "data" / "train.jsonl", tiny_rows[:10])
    atomic_write_jsonl(run3 / "data" / "val.jsonl", [])
    stats = train(recipe, run3, base_model_dir)
    assert stats["time_budget"] is None and stats["steps"] == 2 and stats["train_rows"] == 10
    assert not (run3 / "metrics" / "training-budget.json").exists()


def test_a_budget_whose_probe_read_too_fast_stops_training_at_the_deadline(tmp_path, base_model_dir, tiny_rows,
                                                                            monkeypatch):
    """The probe decides the rows; the deadline (the budget less the probe and the validation pass) ends the run
    whatever the probe read: a probe that says a step takes a microsecond plans every row (5 steps), and a
    1 ms budget stops training after its first step."""
    from tasks.train import worker

    monkeypatch.setattr(worker, "probe_step_seconds", lambda *a, **k: 1e-6)
    recipe = Recipe(name="deadline")
    recipe.training.batch_size = 2
    recipe.training.save_steps = 100
    recipe.training.time_budget_s = 0.001
    run_dir = new_run_dir(tmp_path, "deadline")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:10])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", [])
    stats = train(recipe, run_dir, base_model_dir)
    assert stats["train_rows"] == 10 and stats["steps"] == 1
    assert stats["time_budget"]["rows_kept"] == 10 and stats["time_budget"]["stopped_at_step"] == 1
    assert (run_dir / "lora" / "adapter_model.safetensors").exists()   # what it trained is saved


def test_a_flow_time_budget_shrinks_the_training_budget_the_run_records(tmp_path, base_model_dir, tiny_rows,
                                                                        monkeypatch):
    """training.flow_time_budget_s through the real worker: at a probed 0.01 s a step, 500 steps of other stages
    leave 10 - 5 = 5 s of a 10,000 s time budget; the decision records both (the report says why)."""
    from tasks.train import worker

    monkeypatch.setattr(worker, "probe_step_seconds", lambda *a, **k: 0.01)
    recipe = Recipe(name="flow-budget")
    recipe.training.batch_size = 2
    recipe.training.save_steps = 100
    recipe.training.time_budget_s = 10_000.0
    recipe.training.flow_time_budget_s = 10.0
    recipe.training.other_stages_steps = 500
    run_dir = new_run_dir(tmp_path, "flow-budget")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:4])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", [])
    stats = train(recipe, run_dir, base_model_dir)
    decision = json.loads((run_dir / "metrics" / "training-budget.json").read_text())
    assert decision["budget_s"] == 5.0 and decision["shrunk_from_s"] == 10_000.0
    assert decision["rows_kept"] == 4 and stats["train_rows"] == 4
