"""Packed batches: several chat rows per fixed-length sequence, the GPU fast path of training.

Why: short chat rows padded to the longest row of each batch give the GPU a new tensor shape every step
(cuDNN attention rebuilds its graph for each new padded length) and little work per kernel launch (an
8B-shape LoRA step is ~8,200 launches whatever its size). Packing rows best-fit-decreasing into bins of
`pack_length` tokens gives one shape for every step and no padding, and a token budget per step makes
each step as large as the recipe asks.

Rows never see each other: position_ids restart at 0 for every row and no attention_mask is passed, so
transformers (5.x `find_packed_sequence_indices`) builds a block-diagonal causal mask from them for SDPA;
Unsloth gets the same boundaries as `packed_seq_lengths` on one flattened row (its padding-free format).
The loss stays on the assistant answers: a row's prompt tokens, the filler at a bin's end and the first
token of each row carry label -100, so no token is predicted from another row.
"""

from __future__ import annotations

import math

IGNORE_INDEX = -100


def pack_rows(tokenized: list[dict], pack_length: int, pad_id: int) -> list[dict]:
    """Best-fit-decreasing bins of at most `pack_length` tokens, each filled up to exactly that length.

    `tokenized` rows have input_ids and completion_mask (tasks.train.worker.tokenize_row). Returns one dict
    per bin: input_ids, labels (-100 outside answers), position_ids (restarting per row), seq_lengths (the
    rows' lengths, then the filler's), real_tokens (the rows' tokens, without the filler). Deterministic: same rows, same bins.

    Raises:
        ValueError: a row longer than pack_length (tokenize_row truncates to max_length; pack_length must
            be at least that).
    """
    order = sorted(range(len(tokenized)), key=lambda i: (-len(tokenized[i]["input_ids"]), i))
    bins: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = len(tokenized[i]["input_ids"])
        if n > pack_length:
            raise ValueError(f"row {i} has {n} tokens, more than pack_length {pack_length}")
        # Best fit: the fullest bin that still has room (a linear scan: thousands of rows, milliseconds).
        best = min((b for b in range(len(bins)) if free[b] >= n), key=lambda b: free[b], default=None)
        if best is None:
            bins.append([i])
            free.append(pack_length - n)
        else:
            bins[best].append(i)
            free[best] -= n
    return [_fill_bin([tokenized[i] for i in sorted(members)], pack_length, pad_id) for members in bins]


def _fill_bin(rows: list[dict], pack_length: int, pad_id: int) -> dict:
    input_ids: list[int] = []
    labels: list[int] = []
    position_ids: list[int] = []
    seq_lengths: list[int] = []
    for row in rows:
        ids, mask = row["input_ids"], row["completion_mask"]
        input_ids += ids
        # A row's first token is never a target: nothing before it in the row predicts it.
        labels += [IGNORE_INDEX] + [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
        position_ids += list(range(len(ids)))
        seq_lengths.append(len(ids))
    real_tokens = len(input_ids)
    filler = pack_length - real_tokens
    if filler:
        # Its own segment (positions restart), never a target: one shape for every step.
        input_ids += [pad_id] * filler
        labels += [IGNORE_INDEX] * filler
        position_ids += list(range(filler))
        seq_lengths.append(filler)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "seq_lengths": seq_lengths,
            "real_tokens": real_tokens}


def sequences_per_step(tokens_per_step: int, pack_length: int, batch_size: int, mean_row_tokens: float) -> int:
    """Packed sequences in one device batch: the token budget over the sequence length, at least 1.

    tokens_per_step 0 means the unpacked recipe's budget (batch_size rows of the mean length), so a packed
    run takes about as many optimizer steps as the padded one and its learning-rate schedule carries over.
    """
    budget = tokens_per_step or batch_size * mean_row_tokens
    return max(1, math.floor(budget / pack_length + 0.5))


class PackedCollator:
    """Stacks packed sequences into a batch with no attention_mask (the boundaries live in position_ids).

    flatten=False: [B, pack_length] rows, what transformers' SDPA/flex masks read (block-diagonal per row).
    flatten=True: one [1, B*pack_length] row plus `packed_seq_lengths`, Unsloth's padding-free format (its
    attention runs each segment on its own instead of one masked square).
    """

    def __init__(self, flatten: bool = False):
        self.flatten = flatten

    def __call__(self, features: list[dict]) -> dict:
        import torch

        # position_ids are rebuilt from seq_lengths when the trainer kept only {input_ids, labels, seq_lengths}
        # (TRL does with use_liger_kernel): the row boundaries are the same information.
        positions = [f["position_ids"] if "position_ids" in f else [p for n in f["seq_lengths"] for p in range(n)]
                     for f in features]
        batch = {key: torch.tensor([f[key] for f in features], dtype=torch.long) for key in ("input_ids", "labels")}
        batch["position_ids"] = torch.tensor(positions, dtype=torch.long)
        if self.flatten:
            batch = {key: value.reshape(1, -1) for key, value in batch.items()}
            batch["packed_seq_lengths"] = torch.tensor([n for f in features for n in f["seq_lengths"]],
                                                       dtype=torch.int32)
        return batch
