"""training.compile_layers (tasks/train/worker.py compile_decoder_layers): every decoder layer compiled in place
must train the model eager PyTorch trains (same loss, same gradients, over batches of different lengths with
one dynamic graph), leave parameter names and the saved adapter as they were, and run inside the real worker."""

import copy

import pytest

from tasks.train.packing import IGNORE_INDEX
from tasks.train.worker import compile_decoder_layers


def _tiny_llama():
    """A random-init three-layer Llama (SmolLM2's architecture) with LoRA on the top two layers' q/v, fp32."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager"))
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                            layers_to_transform=[1, 2], task_type="CAUSAL_LM")).train()


def _batch(width: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 512, (2, width), generator=g)
    mask = torch.ones_like(ids)
    mask[1, width - 3:] = 0                       # the second row padded, as a length-grouped batch pads
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[:, : width // 2] = IGNORE_INDEX        # prompt tokens carry no loss
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_compiled_layers_train_as_eager_ones_over_batches_of_different_lengths():
    import torch
    from peft import get_peft_model_state_dict

    eager = _tiny_llama()
    compiled = copy.deepcopy(eager)
    names = [n for n, _ in compiled.named_parameters()]
    assert compile_decoder_layers(compiled) == 3
    assert [n for n, _ in compiled.named_parameters()] == names
    assert get_peft_model_state_dict(compiled).keys() == get_peft_model_state_dict(eager).keys()
    for width, seed in ((17, 0), (29, 1), (23, 2)):   # three lengths: one dynamic graph serves them all
        batch = _batch(width, seed)
        results = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            loss = model(**batch).loss
            loss.backward()
            results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        (ref_loss, ref_grads), (loss, grads) = results
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        assert grads.keys() == ref_grads.keys() and len(grads) == 8
        for name in grads:
            assert torch.allclose(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6), (width, name)


@pytest.mark.integration
def test_the_worker_trains_and_saves_with_compiled_layers(tmp_path, base_model_dir, tiny_rows):
    """The real worker on SmolLM2 with the slipstream recipe's loss and precision: every layer compiled, the
    adapter trained and saved under the names an uncompiled run saves."""
    from safetensors import safe_open

    from tasks.recipe import Recipe
    from tasks.run import RunFolder, atomic_write_jsonl, new_run_dir
    from tasks.train import worker

    recipe = Recipe(name="compiled")
    recipe.training.loss_type = "completion_nll"
    recipe.training.attention = "eager"
    recipe.training.compile_layers = True
    recipe.training.batch_size = 2
    recipe.training.max_steps = 3
    recipe.training.logging_steps = 1
    recipe.lora.last_layers = 4
    run_dir = new_run_dir(tmp_path, "compiled")
    atomic_write_jsonl(run_dir / "data" / "train.jsonl", tiny_rows[:6])
    atomic_write_jsonl(run_dir / "data" / "val.jsonl", tiny_rows[6:8])
    stats = worker.train(recipe, run_dir, base_model_dir)
    assert stats["compiled_layers"] == 30 and stats["steps"] == 3
    assert stats["trainable_tensors_changed"] == stats["trainable_tensors"] == 4 * 7 * 2   # 4 layers, 7 modules, A and B
    assert stats["eval_loss"] is not None and stats["final_loss"] > 0
    with safe_open(RunFolder(run_dir).lora_dir / "adapter_model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    assert len(keys) == stats["trainable_tensors"]
    assert all(k.startswith("base_model.model.model.layers.") and "_orig_mod" not in k for k in keys)


def test_compile_layers_is_refused_for_other_engines():
    from tasks.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="training.compile_layers is for engine 'trl'"):
        load_recipe("slipstream", {"training.engine": "unsloth", "training.loss_type": None,
                                   "training.compile_layers": True})
