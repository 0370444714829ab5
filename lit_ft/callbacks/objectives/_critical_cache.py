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
whose tokens differ from the pair's digest is refused too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lit_ft.callbacks.objectives._critical_data import PairRecord, batch_records

FORMAT = "lit_ft.critical_token_weights"
VERSION = 1
WHO = "CriticalTokenScoring"


class StaleCacheError(ValueError):
    """A weights file made from other models, data or arguments than this run's."""


def _offsets(values: Sequence[torch.Tensor]) -> torch.Tensor:
    off = torch.zeros(len(values) + 1, dtype=torch.long)
    if values:
        off[1:] = torch.cumsum(torch.tensor([v.numel() for v in values], dtype=torch.long), 0)
    return off


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """The label positions ``t >= 1`` of an unpadded row that carry a loss (position 0 has no prediction)."""
    keep = labels != -100
    keep[:1] = False
    return keep.nonzero().squeeze(1)


@dataclass
class CriticalWeightsCache:
    """Per-pair contrastive probabilities keyed by ``sample_idx`` (see the module docstring)."""

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
        self._row = {int(s): i for i, s in enumerate(self.sample_idx.tolist())}

    def __len__(self) -> int:
        return len(self._row)

    @property
    def has_chosen(self) -> bool:
        return int(self.chosen_offsets.numel()) == len(self) + 1

    @classmethod
    def from_scores(cls, records: Sequence[PairRecord], rejected: Sequence[torch.Tensor],
                    chosen: Sequence[torch.Tensor] | None, *, split: str, fingerprint: str, data: str,
                    meta: Mapping[str, Any] | None = None) -> CriticalWeightsCache:
        """The cache of ``records`` (sorted by ``sample_idx``) with their scores (one tensor per pair and side)."""
        empty = torch.zeros(0, dtype=torch.float32)
        return cls(split=split, fingerprint=fingerprint, data=data,
                   sample_idx=torch.tensor([r.sample_idx for r in records], dtype=torch.long),
                   digest=torch.tensor([r.digest for r in records], dtype=torch.long),
                   rejected_offsets=_offsets(rejected), rejected_p=torch.cat(list(rejected)) if rejected else empty,
                   chosen_offsets=_offsets(chosen) if chosen is not None else torch.zeros(0, dtype=torch.long),
                   chosen_p=torch.cat(list(chosen)) if chosen else empty,
                   meta={k: str(v) for k, v in (meta or {}).items()})

    # -- file ----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (parent folders created; written under a temporary name, then renamed)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": FORMAT, "version": VERSION, "split": self.split, "fingerprint": self.fingerprint,
                    "data": self.data, "sample_idx": self.sample_idx, "digest": self.digest,
                    "rejected_offsets": self.rejected_offsets, "rejected_p": self.rejected_p,
                    "chosen_offsets": self.chosen_offsets, "chosen_p": self.chosen_p, "meta": dict(self.meta)}, tmp)
        os.replace(tmp, path)
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> CriticalWeightsCache:
        """Read a file written by :meth:`save`; another format or version is an error naming the path."""
        p = Path(os.path.expanduser(os.fspath(path)))
        if not p.is_file():
            raise FileNotFoundError(f"{WHO}: cache_path={os.fspath(path)!r} is not a file")
        raw = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise StaleCacheError(f"{WHO}: cache_path={os.fspath(path)!r} is not a critical-token weights file "
                                  f"(format {FORMAT!r}); point cache_path elsewhere or delete the file")
        if raw.get("version") != VERSION:
            raise StaleCacheError(f"{WHO}: cache_path={os.fspath(path)!r} has format version {raw.get('version')!r};"
                                  f" this lit-ft reads version {VERSION}: delete it to re-score")
        keys = ("split", "fingerprint", "data", "sample_idx", "digest", "rejected_offsets", "rejected_p",
                "chosen_offsets", "chosen_p", "meta")
        return cls(**{k: raw[k] for k in keys}, path=str(p))

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
        for b, (rec, positions) in enumerate(batch_records(batch)):
            row = self._row.get(rec.sample_idx)
            if row is None:
                raise KeyError(f"{WHO}: sample_idx {rec.sample_idx} is not in the weights file{where}, which holds "
                               f"{len(self)} pairs of split {self.split!r}; it was made for other data: delete it "
                               "to re-score")
            if int(self.digest[row]) != rec.digest:
                raise StaleCacheError(f"{WHO}: sample_idx {rec.sample_idx} has other tokens or labels here than in "
                                      f"the weights file{where}; delete it to re-score (or list callbacks that edit "
                                      "the batch after CriticalTokenScoring)")
            sides = ("rejected",) if only_neg else ("rejected", "chosen")
            for side in sides:
                offsets, values = (self.rejected_offsets, self.rejected_p) if side == "rejected" \
                    else (self.chosen_offsets, self.chosen_p)
                p = values[int(offsets[row]):int(offsets[row + 1])]
                sup = supervised_positions(getattr(rec, side).labels)
                if sup.numel() != p.numel():  # the digest matched: only a corrupt file gets here
                    raise StaleCacheError(f"{WHO}: the weights file{where} holds {p.numel()} scores for sample_idx "
                                          f"{rec.sample_idx}'s {side} response, which has {sup.numel()} supervised "
                                          "tokens; delete it to re-score")
                weights[side][b, positions[side][sup].cpu()] = (1.0 - p) if side == "rejected" else p
        device = batch["rejected_labels"].device
        return weights["chosen"].to(device), weights["rejected"].to(device)
