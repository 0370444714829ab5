"""The critical-token weights file of :class:`~lit_ft.callbacks.CriticalTokenScoring`: per preference pair, the
contrastive probabilities ``p_t`` of its responses' supervised tokens, keyed by split and ``sample_idx``.

File format (``torch.save`` of a plain dict, read with ``weights_only=True``)::

    format       "lit_ft.critical_token_weights"      version 1
    split        "train"
    fingerprint  hex digest of the contrastive models and β (what made the scores)
    data         hex digest of the split (every pair's sample_idx and token digest)
    sample_idx   long [N] sorted;  digest long [N]: a hash of each pair's token ids and labels
    rejected_offsets long [N+1], rejected_p float32: pair i's rejected p_t = rejected_p[off[i]:off[i+1]], one per
                 supervised label position t >= 1 of the (unpadded) response, in order
    chosen_offsets / chosen_p  the same for the chosen responses (empty when made with only_neg=True)
    meta         dict of str: how it was made (sources, β, contrastive training arguments)

A file whose fingerprint, data digest or split differs from the run's is refused, never silently reused; a batch row
whose tokens differ from the pair's digest is refused too. The file is a :mod:`lit_ft.core.sample_store` layout
(``LAYOUT``): that module writes, reads and checks it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_ft.callbacks.objectives._critical_data import PairRecord, batch_records
from lit_ft.core.sample_store import (
    PerSampleStore,
    Ragged,
    SampleMismatch,
    StoreFormatError,
    StoreLayout,
    StoreText,
)

FORMAT = "lit_ft.critical_token_weights"
VERSION = 1
WHO = "CriticalTokenScoring"
LAYOUT = StoreLayout(FORMAT, VERSION, ragged={"rejected_p": "rejected_offsets", "chosen_p": "chosen_offsets"},
                     fields=("split", "fingerprint", "data"))
_TEXT = StoreText(who=WHO, argument="cache_path", kind="weights file", digest_of="tokens or labels",
                  remedy="delete it to re-score, or set cache_path to another file",
                  mismatch="or list callbacks that edit the batch after CriticalTokenScoring",
                  make="CriticalTokenScoring writes it at the start of training when cache_path does not exist")


class StaleCacheError(ValueError):
    """A weights file made from other models, data or arguments than this run's."""


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The label positions ``t >= 1`` of an unpadded row that carry a loss (position 0 has no prediction)."""
    keep = labels != -100
    keep[:1] = False
    return keep.nonzero().squeeze(1)


@dataclass
class CriticalWeightsCache:
    """Per-pair contrastive probabilities keyed by ``sample_idx`` (see the module docstring); the file, the row
    lookup and the digest check are :class:`lit_ft.core.sample_store.PerSampleStore`'s."""

    split: str
    fingerprint: str
    data: str
    sample_idx: torch.Tensor
    digest: torch.Tensor
    rejected_offsets: torch.Tensor
    rejected_p: torch.Tensor
    chosen_offsets: torch.Tensor
    chosen_p: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        columns = {"rejected_p": Ragged(self.rejected_offsets, self.rejected_p),
                   "chosen_p": Ragged(self.chosen_offsets, self.chosen_p)}
        fields = {"split": self.split, "fingerprint": self.fingerprint, "data": self.data}
        try:
            self._store = PerSampleStore(LAYOUT, self.sample_idx, self.digest, columns, fields, self.meta, _TEXT,
                                         self.path)
        except StoreFormatError as e:
            raise StaleCacheError(str(e)) from e

    @classmethod
    def _of(cls, store: PerSampleStore) -> CriticalWeightsCache:
        rej, cho = store.columns["rejected_p"], store.columns["chosen_p"]
        return cls(split=store.fields["split"], fingerprint=store.fields["fingerprint"], data=store.fields["data"],
                   sample_idx=store.sample_idx, digest=store.digest, rejected_offsets=rej.offsets,
                   rejected_p=rej.values, chosen_offsets=cho.offsets, chosen_p=cho.values, meta=store.meta,
                   path=store.path)

    def __len__(self) -> int:
        return len(self._store)

    @property
    def has_chosen(self) -> bool:
        return self._store.columns["chosen_p"].present

    @classmethod
    def from_scores(cls, records: Sequence[PairRecord], rejected: Sequence[torch.Tensor],
                    chosen: Sequence[torch.Tensor] | None, *, split: str, fingerprint: str, data: str,
                    meta: Mapping[str, Any] | None = None) -> CriticalWeightsCache:
        """The cache of ``records`` with their scores (one tensor per pair and side, in the order of ``records``)."""
        columns = {"rejected_p": list(rejected), "chosen_p": None if chosen is None else list(chosen)}
        store = PerSampleStore.build(LAYOUT, [r.sample_idx for r in records], [r.digest for r in records], columns,
                                     fields={"split": split, "fingerprint": fingerprint, "data": data}, meta=meta,
                                     text=_TEXT)
        return cls._of(store)

    # -- file ----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (parent folders created; written under a temporary name, then renamed)."""
        path = self._store.save(path)
        self.path = self._store.path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CriticalWeightsCache:
        """Read a file written by :meth:`save`; another format or version is an error naming the path."""
        try:
            return cls._of(PerSampleStore.load(path, LAYOUT, _TEXT))
        except StoreFormatError as e:
            raise StaleCacheError(str(e)) from e

    def check(self, *, split: str, fingerprint: str, data: str | None, need_chosen: bool) -> None:
        """Refuse (:class:`StaleCacheError`) a file made for another split, other models / β, other data, or
        without the chosen scores this run needs."""
        where = self.path or "the cache"
        problems = []
        if self.split != split:
            problems.append(f"it scores split {self.split!r}, this run trains on {split!r}")
        if self.fingerprint != fingerprint:
            problems.append(f"it was made with other contrastive models or β (made with {self.meta.get('models', '?')}"
                            f", β {self.meta.get('beta', '?')})")
        if data is not None and self.data != data:
            problems.append("it was made from other preference data (another data set, tokenizer, max length or "
                            "template)")
        if need_chosen and not self.has_chosen:
            problems.append("it holds no chosen-response scores (made with only_neg=True) and this run has "
                            "only_neg=False")
        if problems:
            raise StaleCacheError(f"{WHO}: the weights file {where} is stale: {'; '.join(problems)}. Delete it to "
                                  "re-score, or set cache_path to another file.")

    # -- use -----------------------------------------------------------------------------------------------------
    def lookup(self, batch: Mapping[str, Any], only_neg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(chosen_token_weights, rejected_token_weights)`` ``[B, T]`` float32 on the batch's device, aligned with
        the labels: rejected ``1 − p_t`` and chosen ``p_t`` (all 1 with ``only_neg``) at supervised positions,
        1 elsewhere."""
        where = f" ({self.path})" if self.path else ""
        shape = tuple(batch["rejected_labels"].shape)
        weights = {"chosen": torch.ones(tuple(batch["chosen_labels"].shape), dtype=torch.float32),
                   "rejected": torch.ones(shape, dtype=torch.float32)}
        records = batch_records(batch)
        try:
            rows = self._store.rows([rec.sample_idx for rec, _ in records], [rec.digest for rec, _ in records],
                                    context=f" of split {self.split!r}")
        except SampleMismatch as e:
            raise StaleCacheError(str(e)) from e
        sides = ("rejected",) if only_neg else ("rejected", "chosen")
        for b, ((rec, positions), row) in enumerate(zip(records, rows)):
            for side in sides:
                p = self._store.values(f"{side}_p", row)
                sup = supervised_positions(getattr(rec, side).labels)
                if sup.numel() != p.numel():  # the digest matched: only a corrupt file gets here
                    raise StaleCacheError(f"{WHO}: the weights file{where} holds {p.numel()} scores for sample_idx "
                                          f"{rec.sample_idx}'s {side} response, which has {sup.numel()} supervised "
                                          "tokens; delete it to re-score")
                weights[side][b, positions[side][sup].cpu()] = (1.0 - p) if side == "rejected" else p
        device = batch["rejected_labels"].device
        return weights["chosen"].to(device), weights["rejected"].to(device)
