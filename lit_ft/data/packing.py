"""Padding-free packing of SFT examples: one training batch's examples placed end to end in as few rows as fit.

What TRL calls padding-free / ``DataCollatorWithFlattening``, per batch: the batch's examples (as the length-bucketed
sampler gives them, so resume and epochs work as without packing) are placed first-fit-decreasing into rows of at
most ``max_length`` tokens. Each example keeps its own attention and positions:

* ``position_ids`` restart at 0 for every example; the batch carries **no** ``attention_mask``, so transformers
  (masking_utils) reads the example boundaries from the position resets and builds a block-diagonal causal mask (its
  packed-sequence path; it needs ``use_cache=False`` in the forward — lit_ft's loss always passes it, and
  :class:`~lit_ft.data.SFTDataModule` turns the model's ``config.use_cache`` off for a plain ``model(**batch)``);
* the label of each example's first token is -100: it would otherwise be predicted from the previous example;
* the tail of a row is padding (pad id, label -100) whose positions continue 0, 1, ... as one more "example" that
  attends only to itself and carries no loss;
* ``packed_sample_idx`` ([R, L], long): which example (its ``sample_idx``) each token belongs to, -1 on padding.

Tokens per step are those of the unpacked batch; only the padding is gone.
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE_INDEX = -100

__all__ = ["pack_rows", "collate_packed"]


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing: example indices per row (each row's lengths sum to <= ``capacity``; order within a row
    follows decreasing length, ties by index). Every length must be in ``[1, capacity]``."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        n = int(lengths[i])
        if not 1 <= n <= capacity:
            raise ValueError(f"pack_rows: example {i} has {n} tokens; packing needs 1..{capacity} (max_length)")
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def collate_packed(examples: Sequence[dict], capacity: int, pad_id: int,
                   token_keys: Sequence[tuple[str, int]] = ()) -> dict[str, torch.Tensor]:
    """A packed batch of ``examples`` (dicts with ``input_ids``, ``labels``, ``sample_idx`` and the per-token lists
    named in ``token_keys`` as ``(key, pad value)``). Returns ``input_ids``, ``labels``, ``position_ids``,
    ``packed_sample_idx`` and each ``token_keys`` key, all ``[R, L]`` with ``L`` the longest packed row."""
    layout = pack_rows([len(e["input_ids"]) for e in examples], capacity)
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in layout)
    R = len(layout)
    ids = torch.full((R, width), pad_id, dtype=torch.long)
    labels = torch.full((R, width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((R, width), dtype=torch.long)
    owner = torch.full((R, width), -1, dtype=torch.long)
    extra = {k: torch.full((R, width), v, dtype=torch.long) for k, v in token_keys}
    for r, row in enumerate(layout):
        at = 0
        for i in row:
            e = examples[i]
            n = len(e["input_ids"])
            ids[r, at: at + n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
            labels[r, at: at + n] = torch.as_tensor(e["labels"], dtype=torch.long)
            labels[r, at] = IGNORE_INDEX  # predicted from the previous example's last token otherwise
            positions[r, at: at + n] = torch.arange(n)
            owner[r, at: at + n] = int(e["sample_idx"])
            for k, _ in token_keys:
                extra[k][r, at: at + n] = torch.as_tensor([int(v) for v in e[k]], dtype=torch.long)
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding tail: one more block, no loss
    return {"input_ids": ids, "labels": labels, "position_ids": positions, "packed_sample_idx": owner, **extra}
