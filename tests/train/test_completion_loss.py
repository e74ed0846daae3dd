"""training.loss_type 'completion_nll' (tasks/train/completion_loss.py): the vocabulary projection on the
answer tokens only must be the model's own loss, with the model's own gradients, on padded and packed batches
and on a model that soft-caps its logits; the probe that sizes a time budget times the loss training uses."""

import pytest

from tasks.train.completion_loss import completion_nll
from tasks.train.packing import IGNORE_INDEX, PackedCollator, pack_rows
from tasks.train.worker import PROBE_STEPS, probe_rows, tokenize_row


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module")
def tokenized(tokenizer, tiny_rows):
    return [tokenize_row(r, tokenizer, 256) for r in tiny_rows]


def _tiny(family: str):
    """A random-init two-layer model of the family's real architecture, with LoRA on q/v (PEFT-wrapped, as the
    worker trains it), in fp32 so the two losses can be compared to rounding."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:   # Gemma 2 soft-caps its final logits at 30: the gathered projection must too
        model = Gemma2ForCausalLM(Gemma2Config(**shape, head_dim=16, final_logit_softcapping=3.0))
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                             task_type="CAUSAL_LM"))
    return model.train()


def _padded_batch(tokenized, tokenizer, n=4):
    import torch

    rows = tokenized[:n]
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((n, width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for j, r in enumerate(rows):
        k = len(r["input_ids"])
        ids[j, :k], mask[j, :k] = torch.tensor(r["input_ids"]), 1
        labels[j, :k] = torch.tensor([t if m else IGNORE_INDEX for t, m in zip(r["input_ids"], r["completion_mask"])])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("packed", [False, True])
def test_completion_nll_is_the_models_own_loss_with_its_gradients(family, packed, tokenized, tokenizer):
    import torch

    model = _tiny(family)
    if packed:
        batch = PackedCollator()(pack_rows(tokenized, 640, tokenizer.pad_token_id))
    else:
        batch = _padded_batch(tokenized, tokenizer)
    reference, ref_grads = _loss_and_grads(model, lambda: model(**batch).loss)
    ours, grads = _loss_and_grads(model, lambda: completion_nll(model, batch)[0])
    assert ours == pytest.approx(reference, rel=1e-5)
    assert grads.keys() == ref_grads.keys() and len(grads) == 8
    for name in grads:
        assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-7), name
    # Only the label tokens were projected: one logit row per target, the targets are the answers' tokens.
    _, logits, targets = completion_nll(model, batch)
    labels = batch["labels"][:, 1:]
    assert logits.shape == (int((labels != IGNORE_INDEX).sum()), 49152)
    assert targets.tolist() == labels[labels != IGNORE_INDEX].tolist()
    # Summed and divided by the Trainer's token count (gradient accumulation), as transformers' loss divides.
    count = torch.tensor(3 * len(targets))
    divided = completion_nll(model, batch, num_items_in_batch=count)[0].item()
    assert divided == pytest.approx(model(**batch, num_items_in_batch=count).loss.item(), rel=1e-5)
    assert divided == pytest.approx(ours / 3, rel=1e-5)


def test_the_probe_rows_spread_over_the_lengths_and_are_always_the_same(tokenized):
    rows = probe_rows(tokenized, 4)
    lengths = sorted(len(r["input_ids"]) for r in tokenized)
    picked = [len(r["input_ids"]) for r in rows]
    assert len(rows) == 4 and picked == sorted(picked)
    assert picked[0] <= lengths[len(lengths) // 4] and picked[-1] >= lengths[len(lengths) * 3 // 4]
    assert probe_rows(tokenized, 4) == rows and len(probe_rows(tokenized, 100)) == len(tokenized)


def test_the_probe_times_the_real_trainer_and_trains_nothing(tmp_path, base_model_dir, tokenized, tokenizer):
    """The time budget's probe runs the trainer training will use (here completion_nll, bf16 where the CPU has
    it) for a few steps, then puts the adapter back as it was and undoes Accelerate's forward wrapper."""
    import torch

    from tasks.recipe import Recipe
    from tasks.train.worker import batching, build_trainer, load_model, probe_step_seconds, resolve_mixed_precision

    recipe = Recipe(name="probe")
    recipe.training.loss_type = "completion_nll"
    recipe.training.batch_size = 2
    model, tok = load_model(recipe, base_model_dir)
    model.config.use_cache = False
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    built = []

    def build(rows, steps, progress, scratch):
        data, _, extras = batching(recipe, rows, [], tok)
        built.append((len(rows), steps))
        return build_trainer(recipe, model, tok, data, [], extras, resolve_mixed_precision("auto"), progress,
                             output_dir=scratch, max_steps=steps, save_strategy="no", gradient_accumulation_steps=1,
                             train_sampling_strategy="sequential")

    step_s = probe_step_seconds(build, model, tokenized, 2)
    assert 0 < step_s < 60
    # Every probe batch is trained twice (the second pass is the one timed): twice the rows, twice the steps.
    steps = min(len(tokenized), 2 * PROBE_STEPS) // 2
    assert built == [(2 * steps * 2, 2 * steps)]
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert "_original_forward" not in model.__dict__


def test_completion_nll_trains_under_the_trainers_mixed_precision(tmp_path, base_model_dir, tiny_rows, monkeypatch):
    """Accelerate applies bf16 autocast by wrapping the model's forward, which completion_nll bypasses: the
    trainer must open the autocast itself (without it the fp32 LoRA matmuls ran in fp32, no faster than nll)."""
    import torch

    from tasks.recipe import Recipe
    from tasks.run import atomic_write_jsonl, new_run_dir
    from tasks.train import worker

    if worker.resolve_mixed_precision("auto") != "bf16":
        pytest.skip("this CPU has no native bf16: the recipe trains in fp32, with no autocast to check")
    seen = []
    original = worker.load_model

    def load_and_watch(recipe, base):
        model, tok = original(recipe, base)
        layer = model.get_base_model().get_decoder().layers[-1]
        layer.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
        return model, tok

    recipe = Recipe(name="autocast")
    recipe.training.loss_type = "completion_nll"
    recipe.training.batch_size = 4
    recipe.training.max_steps = 2
    run_dir = new_run_dir(tmp_path, "autocast")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:8])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", [])
    monkeypatch.setattr(worker, "load_model", load_and_watch)
    stats = worker.train(recipe, run_dir, base_model_dir)
    assert stats["mixed_precision"] == "bf16" and stats["steps"] == 2
    assert seen and all(seen), seen


@pytest.mark.parametrize("override, message", [
    ({"training.engine": "unsloth"}, "training.engine is 'unsloth'"),
    ({"training.liger_kernel": True}, "training.liger_kernel is True"),
    ({"training.accelerate_config": "ddp", "training.time_budget_s": None}, "training.accelerate_config is 'ddp'"),
])
def test_completion_nll_is_refused_where_its_own_forward_would_be_bypassed(override, message):
    from tasks.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe("slipstream", {"training.loss_type": "completion_nll", **override})
