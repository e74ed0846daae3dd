"""training.loss_type 'completion_nll': the vocabulary projection on the answer tokens only.

A causal LM's forward projects every position onto the vocabulary, then the loss ignores the prompt's
positions. For SmolLM2 (49k-token vocabulary, 576-wide hidden state) that projection, its backward pass and
TRL's per-step entropy / token-accuracy metrics over the full logits are ~1/5 of a CPU step, and about half of
a Slipstream row is prompt. Here the decoder runs as usual, then only the hidden states that predict a label
token are gathered and projected: the same loss (next-token cross-entropy over the label tokens, summed and
divided like transformers' ForCausalLMLoss), the same gradients, 0.84x the step on the demo machine
(bench/loss_step.py). TRL's 'chunked_nll' projects only the answers too, but in
checkpointed chunks recomputed in the backward pass (slower than 'nll' here).
"""
from __future__ import annotations

from tasks.train.packing import IGNORE_INDEX


def completion_logits(model, inputs: dict):
    """(logits, targets): the vocabulary logits of exactly the positions whose next token is a label
    (float32, one row per label token, in batch order) and those label ids.

    `model` is a causal LM, bare or PEFT-wrapped; `inputs` holds input_ids, labels and whatever else its
    decoder takes (attention_mask, position_ids for packed rows). Final-logit soft-capping (Gemma 2) is
    applied as the model's own forward applies it.
    """
    import torch

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    labels = inputs["labels"]
    decoder_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    hidden = causal_lm.get_decoder()(**decoder_inputs, use_cache=False).last_hidden_state
    targets = labels[:, 1:]
    predicts_label = targets != IGNORE_INDEX
    logits = causal_lm.get_output_embeddings()(hidden[:, :-1][predicts_label]).float()
    softcap = getattr(causal_lm.config.get_text_config(), "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits, targets[predicts_label]


def completion_nll(model, inputs: dict, num_items_in_batch=None):
    """(loss, logits, targets): next-token cross-entropy over the label tokens, divided by
    `num_items_in_batch` when the Trainer counts them across gradient-accumulation steps (as transformers'
    ForCausalLMLoss divides), else the mean."""
    import torch

    logits, targets = completion_logits(model, inputs)
    if num_items_in_batch is None:
        return torch.nn.functional.cross_entropy(logits, targets), logits, targets
    loss = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device)
    return loss / num_items_in_batch, logits, targets


def completion_nll_trainer(sft_trainer_class):
    """A subclass of TRL's SFTTrainer whose training loss is `completion_nll`; evaluation (which may want the
    logits) keeps TRL's own path. Logs TRL's entropy and mean_token_accuracy over the label tokens, which is
    what TRL averages them over too."""
    import torch

    class CompletionNLLTrainer(sft_trainer_class):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not model.training:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            # Accelerate applies mixed precision by wrapping the model's forward, which this bypasses:
            # without its autocast the fp32 LoRA weights ran in fp32 and the step was no faster than nll.
            with self.accelerator.autocast():
                loss, logits, targets = completion_nll(model, inputs, num_items_in_batch)
            with torch.no_grad():
                log_p = torch.log_softmax(logits, dim=-1)
                entropy = -(log_p.exp() * log_p).sum(-1).mean() if len(targets) else logits.new_zeros(())
                accuracy = (logits.argmax(-1) == targets).float().mean() if len(targets) else logits.new_zeros(())
            metrics = self._metrics["train"]
            metrics["entropy"].append(entropy.item())
            metrics["mean_token_accuracy"].append(accuracy.item())
            self._total_train_tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs \
                else inputs["input_ids"].numel()
            metrics["num_tokens"] = [self._total_train_tokens]
            return loss

    return CompletionNLLTrainer
