"""CriticalTokenScoring's view of the preference data: each pair as unpadded token rows, re-batched for scoring.

The preference batch contract (``lit_ft.data.PreferenceDataModule``): ``chosen_input_ids`` / ``chosen_attention_mask``
/ ``chosen_labels`` and the same three for ``rejected`` (``[B, T]``, labels unshifted, -100 on prompt and padding),
plus ``sample_idx`` ``[B]``. A row is trimmed to its attended tokens (left or right padding alike), so the scoring
batches (``score_batch_size`` rows, sorted by length, right-padded here) need not match the training batches, and a
training batch is matched to its cached weights by ``sample_idx`` and a digest of its tokens.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.sample_store import digest_tokens

SIDES = ("chosen", "rejected")
PREFERENCE_KEYS = tuple(f"{s}_{k}" for s in SIDES for k in ("input_ids", "attention_mask", "labels")) + ("sample_idx",)
_PROVIDER = "lit_ft.data.PreferenceDataModule (one chosen/rejected pair per row), or a collate_fn that adds it"
PROVIDERS = {k: _PROVIDER for k in PREFERENCE_KEYS}


@dataclass
class Row:
    """One response of a pair, unpadded: its token ids and labels (unshifted, -100 = not supervised)."""

    ids: torch.Tensor
    labels: torch.Tensor


@dataclass
class PairRecord:
    """One preference pair: ``sample_idx``, both responses and a digest of their tokens and labels."""

    sample_idx: int
    chosen: Row
    rejected: Row
    digest: int


def require_preference_batch(batch: Any, who: str) -> None:
    """Raise naming the missing key and PreferenceDataModule, which provides it."""
    require_keys(batch, PREFERENCE_KEYS, who=who, providers=PROVIDERS)


def trim(ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor) -> tuple[Row, torch.Tensor]:
    """A padded row's attended tokens (``Row``) and their positions in the padded row."""
    pos = torch.arange(ids.shape[0], device=ids.device) if mask is None else mask.bool().nonzero().squeeze(1)
    return Row(ids.index_select(0, pos).cpu(), labels.index_select(0, pos).cpu()), pos


def pair_digest(chosen: Row, rejected: Row) -> int:
    """A signed 64-bit hash of a pair's token ids and labels (blake2b: the same on every process and machine)."""
    return digest_tokens(chosen.ids, chosen.labels, rejected.ids, rejected.labels, separator=b"|")


def batch_records(batch: Mapping[str, Any]) -> list[tuple[PairRecord, dict[str, torch.Tensor]]]:
    """Every row of a preference batch as a :class:`PairRecord` with, per side, the positions of its tokens in the
    padded row."""
    out = []
    sidx = batch["sample_idx"]
    for b in range(int(batch["chosen_input_ids"].shape[0])):
        rows, where = {}, {}
        for side in SIDES:
            mask = batch.get(f"{side}_attention_mask")
            rows[side], where[side] = trim(batch[f"{side}_input_ids"][b], None if mask is None else mask[b],
                                           batch[f"{side}_labels"][b])
        out.append((PairRecord(int(sidx[b]), rows["chosen"], rows["rejected"],
                               pair_digest(rows["chosen"], rows["rejected"])), where))
    return out


def collect(batches: Iterable[Mapping[str, Any]], who: str) -> list[PairRecord]:
    """The pairs of one pass over ``batches``, sorted by ``sample_idx`` (a sample seen twice must be the same)."""
    seen: dict[int, PairRecord] = {}
    for batch in batches:
        require_preference_batch(batch, who)
        for rec, _ in batch_records(batch):
            old = seen.get(rec.sample_idx)
            if old is not None and old.digest != rec.digest:
                raise ValueError(f"{who}: sample_idx {rec.sample_idx} occurs twice with different tokens; sample_idx "
                                 "must identify a pair within its split")
            seen[rec.sample_idx] = rec
    if not seen:
        raise ValueError(f"{who}: the training split has no preference pair to score")
    return [seen[k] for k in sorted(seen)]


def data_digest(records: Sequence[PairRecord]) -> str:
    """A hex digest of the whole split: every pair's ``sample_idx`` and digest."""
    h = hashlib.blake2b(digest_size=16)
    for r in records:
        h.update(f"{r.sample_idx}:{r.digest};".encode())
    return h.hexdigest()


def pad(rows: Sequence[Row], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` of ``rows``."""
    width = max(int(r.ids.numel()) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        n = int(r.ids.numel())
        ids[i, :n], mask[i, :n], labels[i, :n] = r.ids, 1, r.labels
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_batches(rows: Sequence[Row], batch_size: int) -> list[list[int]]:
    """Indices of ``rows`` in batches of ``batch_size``, by decreasing length (little padding)."""
    order = sorted(range(len(rows)), key=lambda i: -int(rows[i].ids.numel()))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
