"""Packed batches on a tiny random Llama (CPU, seconds): the same loss as one row at a time, no attention
across rows (with SDPA's mask and with FlexAttention's document mask), only answer tokens as targets, fixed
shapes."""

import pytest

from tasks.train.packing import IGNORE_INDEX, PackedCollator, pack_rows, sequences_per_step
from tasks.train.worker import tokenize_row


@pytest.fixture(scope="module")
def tokenizer(base_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base_model_dir)


@pytest.fixture(scope="module")
def tiny_llama():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    config._attn_implementation = "sdpa"
    # As the worker trains: with a KV cache, transformers skips the packed-sequence mask (it reads
    # position_ids only when past_key_values is None).
    config.use_cache = False
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tokenized(tokenizer, tiny_rows):
    return [tokenize_row(r, tokenizer, 256) for r in tiny_rows]


def _per_row_loss_sum(model, rows):
    """Sum of token losses, one unpadded row at a time: the reference."""
    import torch

    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.tensor([[t if m else IGNORE_INDEX for t, m in zip(row["input_ids"], row["completion_mask"])]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE_INDEX,
                                                 reduction="sum")
        total += loss.item()
        count += int((labels[0, 1:] != IGNORE_INDEX).sum())
    return total, count


def test_packed_batch_gives_the_unpacked_loss(tiny_llama, tokenized, tokenizer):
    import torch

    bins = pack_rows(tokenized, 640, tokenizer.pad_token_id)
    assert 1 < len(bins) < len(tokenized)          # several rows per sequence
    batch = PackedCollator()(bins)
    assert "attention_mask" not in batch and batch["input_ids"].shape == (len(bins), 640)
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
    labels = batch["labels"]
    packed = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                               labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                                               reduction="sum").item()
    reference, targets = _per_row_loss_sum(tiny_llama, tokenized)
    assert int((labels[:, 1:] != IGNORE_INDEX).sum()) == targets
    assert packed == pytest.approx(reference, rel=1e-4)
    # The model's own loss (what the Trainer uses) is the same mean.
    with torch.no_grad():
        hf = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels).loss
    assert hf.item() == pytest.approx(reference / targets, rel=1e-4)


def _sequence_with_its_first_row_perturbed(tokenized, tokenizer):
    """A packed sequence of 3+ rows as a batch, its first row's length, and its input_ids with every token
    of that first row changed."""
    bins = pack_rows(tokenized, 640, tokenizer.pad_token_id)
    packed = next(b for b in bins if len(b["seq_lengths"]) >= 3)
    batch = PackedCollator()([packed])
    first = packed["seq_lengths"][0]
    perturbed = batch["input_ids"].clone()
    perturbed[0, :first] = (perturbed[0, :first] + 1000) % 49152
    return batch, first, perturbed


def test_a_row_never_sees_the_other_rows_of_its_sequence(tiny_llama, tokenized, tokenizer):
    """Perturbing every token of one row leaves the logits of the other rows in its sequence unchanged."""
    import torch

    batch, first, perturbed = _sequence_with_its_first_row_perturbed(tokenized, tokenizer)
    with torch.no_grad():
        before = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        after = tiny_llama(input_ids=perturbed, position_ids=batch["position_ids"]).logits
    assert not torch.allclose(before[0, :first], after[0, :first])          # the perturbation is real
    torch.testing.assert_close(before[0, first:], after[0, first:], rtol=0, atol=1e-5)
    # Without the position_ids restart (a plain causal row) the later rows would change:
    with torch.no_grad():
        leak_before = tiny_llama(input_ids=batch["input_ids"]).logits
        leak_after = tiny_llama(input_ids=perturbed).logits
    assert not torch.allclose(leak_before[0, first:], leak_after[0, first:], atol=1e-5)


def test_bins_have_one_length_and_targets_only_in_answers(tokenized, tokenizer):
    bins = pack_rows(tokenized, 512, tokenizer.pad_token_id)
    assert {len(b["input_ids"]) for b in bins} == {512}
    assert sum(b["real_tokens"] for b in bins) == sum(len(t["input_ids"]) for t in tokenized)
    answer_targets = sum(sum(t["completion_mask"]) for t in tokenized)
    assert sum(sum(1 for x in b["labels"] if x != IGNORE_INDEX) for b in bins) == answer_targets
    for b in bins:
        starts = [i for i, p in enumerate(b["position_ids"]) if p == 0]
        assert all(b["labels"][i] == IGNORE_INDEX for i in starts)        # no row's first token is a target
        assert sum(b["seq_lengths"]) == 512 and len(starts) == len(b["seq_lengths"])
    assert pack_rows(tokenized, 512, tokenizer.pad_token_id) == bins         # deterministic
    with pytest.raises(ValueError, match="more than pack_length 64"):
        pack_rows(tokenized, 64, 0)


def test_flattened_batches_carry_unsloths_segment_lengths(tokenized, tokenizer):
    bins = pack_rows(tokenized, 512, tokenizer.pad_token_id)[:2]
    batch = PackedCollator(flatten=True)(bins)
    assert batch["input_ids"].shape == (1, 1024) and batch["position_ids"].shape == (1, 1024)
    assert batch["packed_seq_lengths"].tolist() == bins[0]["seq_lengths"] + bins[1]["seq_lengths"]


def test_the_token_budget_sets_sequences_per_step():
    assert sequences_per_step(8192, 1024, 8, 133.0) == 8
    assert sequences_per_step(0, 512, 8, 100.0) == 2          # the unpacked budget: 8 rows of 100 tokens
    assert sequences_per_step(0, 2048, 4, 100.0) == 1         # never zero


@pytest.mark.integration   # FlexAttention compiles its kernel on the first call (~30 s on 2 cores)
def test_flex_attention_document_mask_matches_sdpa_and_keeps_rows_apart(tiny_llama, tokenized, tokenizer):
    """training.attention 'flex_attention': transformers builds a document BlockMask from the packed
    position_ids; the logits equal SDPA's block-diagonal ones and a row still never sees its neighbours."""
    import copy

    import torch

    batch, first, perturbed = _sequence_with_its_first_row_perturbed(tokenized, tokenizer)
    flex = copy.deepcopy(tiny_llama)
    flex.set_attn_implementation("flex_attention")
    with torch.no_grad():
        sdpa_logits = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        before = flex(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
        after = flex(input_ids=perturbed, position_ids=batch["position_ids"]).logits
    torch.testing.assert_close(before, sdpa_logits, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(before[0, :first], after[0, :first])
    torch.testing.assert_close(before[0, first:], after[0, first:], rtol=0, atol=1e-5)


def test_position_ids_come_back_from_seq_lengths_when_the_trainer_dropped_them(tokenized, tokenizer):
    """TRL keeps only input_ids, labels and seq_lengths under use_liger_kernel: the collator rebuilds the same
    position_ids from the row lengths."""
    bins = pack_rows(tokenized, 640, tokenizer.pad_token_id)
    full = PackedCollator()(bins)
    trimmed = PackedCollator()([{k: b[k] for k in ("input_ids", "labels", "seq_lengths")} for b in bins])
    assert trimmed["position_ids"].equal(full["position_ids"]) and trimmed["input_ids"].equal(full["input_ids"])
