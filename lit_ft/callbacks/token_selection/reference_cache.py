"""Offline reference losses for :class:`~lit_ft.callbacks.ExcessLossSelection` (Rho-1's "score the corpus once").

Rho-1 scores every training token with the reference model once, before selective training; training then needs no
reference forward. This module writes and reads that score: a per-token reference NLL for each training sample,
keyed by the sample's ``sample_idx`` (the row's index in its split, which lit-ft's DataModules put in every batch).

File format (``torch.save`` of a plain dict, loaded with ``weights_only=True``)::

    format      "lit_ft.reference_nll"       version  1
    sample_idx  long [N]   the samples, sorted
    offsets     long [N+1] sample i's NLLs are nll[offsets[i]:offsets[i+1]]
    nll         float32 [sum of (length-1)]   NLL of target t = token t+1 given tokens 0..t, for every non-pad
                token of the sample, prompt tokens included (so the cache does not depend on which tokens are
                supervised)
    digest      long [N]   a hash of the sample's token ids: a batch whose sample differs (other data, tokenizer,
                max_length, a callback that edited input_ids first) is refused, not silently mis-scored
    meta        dict of str: reference, tokenizer, max_length, data (what it was made with; checked at setup)

(the :mod:`lit_ft.core.sample_store` layout ``LAYOUT``: that module writes, reads and checks the file).

Make one from a config (the DataModule of its ``data:`` section is set up and its whole training set scored)::

    python -m lit_ft.callbacks.token_selection.reference_cache --config configs/rho1/excess_loss.yaml \\
        --reference runs/rho1/reference.ckpt --out runs/rho1/reference_nll.pt

or from Python with :func:`score_batches` / :func:`build_cache`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Iterable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX
from lit_ft.core.loss import causal_lm_token_nll
from lit_ft.core.progress import progress
from lit_ft.core.sample_store import PerSampleStore, Ragged, StoreLayout, StoreText, digest_tokens

__all__ = ["FORMAT", "LAYOUT", "VERSION", "ReferenceLossCache", "build_cache", "datamodule_meta", "digest_ids", "main",
           "score_batches"]

FORMAT = "lit_ft.reference_nll"
VERSION = 1
_WHO = "ExcessLossSelection(reference_losses=...)"
_MAKE = ("`python -m lit_ft.callbacks.token_selection.reference_cache --config <your config> --reference <reference "
         "model> --out <file>`")
LAYOUT = StoreLayout(FORMAT, VERSION, ragged={"nll": "offsets"})
_TEXT = StoreText(who=_WHO, argument="reference_losses", kind="reference-loss cache", digest_of="token ids",
                  remedy=f"make it for this DataModule with {_MAKE}",
                  mismatch="or list callbacks that edit input_ids after ExcessLossSelection")


def digest_ids(ids: Iterable[int]) -> int:
    """A signed 64-bit hash of a sample's token ids (blake2b; stable across processes and machines)."""
    return digest_tokens(ids)


def _row_lengths(batch: Mapping[str, Any]) -> list[int]:
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is None:
        return [int(ids.shape[1])] * int(ids.shape[0])
    return [int(n) for n in mask.sum(dim=1).tolist()]


def _sample_idx(batch: Mapping[str, Any]) -> list[int]:
    sidx = batch.get("sample_idx")
    n = int(batch["input_ids"].shape[0])
    if not isinstance(sidx, torch.Tensor) or sidx.shape != (n,):
        got = "missing" if sidx is None else f"{type(sidx).__name__} {tuple(getattr(sidx, 'shape', ()))}"
        raise KeyError(f"{_WHO}: the batch needs 'sample_idx' (long [{n}], added by lit_ft's DataModules) to key the "
                       f"reference losses; got {got}")
    return [int(i) for i in sidx.tolist()]


@dataclass
class ReferenceLossCache:
    """Per-sample reference NLLs keyed by ``sample_idx`` (see the module docstring for the file format); the file,
    the row lookup and the digest check are :class:`lit_ft.core.sample_store.PerSampleStore`'s."""

    sample_idx: torch.Tensor
    offsets: torch.Tensor
    nll: torch.Tensor
    digest: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    def __post_init__(self) -> None:
        self._store = PerSampleStore(LAYOUT, self.sample_idx, self.digest, {"nll": Ragged(self.offsets, self.nll)},
                                     meta=self.meta, text=_TEXT, path=self.path)

    def __len__(self) -> int:
        return len(self._store)

    # -- file ------------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to ``path`` (parent folders created; never half-written under that name); returns it."""
        path = self._store.save(path)
        self.path = self._store.path
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceLossCache:
        """Read a cache written by :meth:`save`; a missing file or another format is an error naming the path."""
        store = PerSampleStore.load(path, LAYOUT, _TEXT)
        nll = store.columns["nll"]
        return cls(store.sample_idx, nll.offsets, nll.values, store.digest, store.meta, store.path)

    # -- use -------------------------------------------------------------------------------------------------------
    def lookup(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The reference NLL ``[B, T]`` (target space: target t is token t+1; float32, on the batch's device) of ``batch``, from the
        cache: the same tensor a live reference forward gives at every non-pad target (0 at pad targets).

        Raises ``KeyError`` when a sample is not in the cache and ``ValueError`` when its tokens differ from the
        ones the cache was scored on."""
        ids = batch["input_ids"]
        B, T = ids.shape
        made = (f" (made with tokenizer {self.meta.get('tokenizer', '?')!r}, max_length "
                f"{self.meta.get('max_length', '?')}, data {self.meta.get('data', '?')!r})")
        sidx, lengths = _sample_idx(batch), _row_lengths(batch)
        rows = self._store.rows(sidx, context=made)
        for s, n, row in zip(sidx, lengths, rows):  # a length change is the clearer message; the digest sees it too
            stored = self._store.columns["nll"].length(row)
            if stored != max(n - 1, 0):
                where = f" ({self.path})" if self.path else ""
                raise ValueError(f"{_WHO}: sample_idx {s} has {n} tokens here but {stored + 1} in the cache{where}"
                                 f"{made}. Re-make the cache for this DataModule, or list callbacks that edit "
                                 "input_ids after ExcessLossSelection")
        ids_cpu = ids.detach().cpu()
        self._store.check_digests(sidx, rows, [digest_tokens(ids_cpu[b, :n]) for b, n in enumerate(lengths)],
                                  context=made)
        out = torch.zeros(B, T, dtype=torch.float32)
        for b, row in enumerate(rows):
            values = self._store.values("nll", row)
            out[b, : values.numel()] = values
        return out.to(ids.device)


def _all_tokens_supervised(batch: Mapping[str, Any]) -> dict[str, Any]:
    """``batch`` with ``labels`` = the input ids at every non-pad position, so every token is scored."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    labels = ids.clone() if mask is None else torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    return {**batch, "labels": labels}


@torch.no_grad()
def score_batches(reference: nn.Module, batches: Iterable[Mapping[str, Any]], meta: Mapping[str, Any] | None = None,
                  device: str | torch.device | None = None) -> ReferenceLossCache:
    """Score every sample of ``batches`` (dicts with ``input_ids``, ``attention_mask``, ``sample_idx``) with the
    frozen ``reference`` and return the cache. A sample seen twice (a second epoch) must give the same tokens."""
    reference.eval()
    if device is not None:
        reference.to(device)
    dev = next(reference.parameters()).device
    rows: dict[int, tuple[torch.Tensor, int]] = {}
    total = len(batches) if isinstance(batches, Sized) else None
    for batch in progress(batches, "lit_ft: scoring the training set with the reference", total=total):
        moved = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        nll = causal_lm_token_nll(reference, _all_tokens_supervised(moved)).float().cpu()
        ids = batch["input_ids"].detach().cpu()
        for b, (s, n) in enumerate(zip(_sample_idx(batch), _row_lengths(batch))):
            d = digest_tokens(ids[b, :n])
            if s in rows and rows[s][1] != d:
                raise ValueError(f"{_WHO}: sample_idx {s} occurs twice with different tokens; sample_idx must "
                                 "identify a sample")
            rows[s] = (nll[b, : max(n - 1, 0)].clone(), d)
    if not rows:
        raise ValueError(f"{_WHO}: no batch to score (the training set is empty)")
    store = PerSampleStore.build(LAYOUT, list(rows), [d for _, d in rows.values()],
                                 {"nll": [v for v, _ in rows.values()]}, meta=meta, text=_TEXT)
    nll = store.columns["nll"]
    return ReferenceLossCache(store.sample_idx, nll.offsets, nll.values, store.digest, store.meta)


def datamodule_meta(datamodule: Any, reference: str) -> dict[str, str]:
    """What a cache records about how it was made (and :class:`ExcessLossSelection` compares at setup)."""
    meta = {"reference": reference}
    for key, attr in (("tokenizer", "tokenizer_name"), ("max_length", "max_length"), ("data", "data")):
        value = getattr(datamodule, attr, None)
        if value is not None:
            meta[key] = str(value)
    return meta


def build_cache(reference: str, datamodule: Any, out: str | os.PathLike, like: nn.Module | None = None,
                dtype: str = "float32", device: str | None = None) -> Path:
    """Set up ``datamodule``, score its whole training set (its ``train_dataloader``, one epoch) with the reference
    model ``reference`` (a local HF folder, a ``lit_ft.assets`` name or a lit-ft ``.ckpt``; ``like`` = the model
    trained later, needed for a ``.ckpt``: its architecture receives the checkpoint's weights) and write the cache
    to ``out``."""
    from lit_ft.callbacks.token_selection._reference import load_reference

    datamodule.setup("fit")
    model = load_reference(reference, like, "reference_cache", dtype)
    cache = score_batches(model, datamodule.train_dataloader(), datamodule_meta(datamodule, reference), device)
    return cache.save(out)


# -- CLI ---------------------------------------------------------------------------------------------------------
def _instantiate(section: Mapping[str, Any], what: str) -> Any:
    if not isinstance(section, Mapping) or "class_path" not in section:
        raise ValueError(f"--config: the {what!r} section needs a class_path (and init_args)")
    module, _, name = section["class_path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**dict(section.get("init_args") or {}))


def main(argv: list[str] | None = None) -> int:
    """``python -m lit_ft.callbacks.token_selection.reference_cache --config C --reference R --out F``."""
    p = argparse.ArgumentParser(prog="python -m lit_ft.callbacks.token_selection.reference_cache",
                                description="Score a config's training set once with a reference model and write "
                                            "the per-token reference-NLL cache ExcessLossSelection(reference_losses=)"
                                            " reads.")
    p.add_argument("--config", required=True, help="a lit-ft fit config; its data: section is scored (and its "
                                                   "model: section gives the architecture for a .ckpt reference)")
    p.add_argument("--reference", required=True, help="local HF folder, lit_ft.assets name, or lit-ft .ckpt")
    p.add_argument("--out", required=True, help="the cache file to write")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="e.g. cuda; default: where the model loads (cpu)")
    args = p.parse_args(argv)
    import yaml

    with open(args.config, encoding="utf-8") as f:
        config = yaml.safe_load(f) or {}
    datamodule = _instantiate(config.get("data"), "data")
    like = None
    if args.reference.endswith(".ckpt"):
        from lit_ft.core.introspect import find_hf_model

        module = _instantiate(config.get("model"), "model")
        if hasattr(module, "configure_model"):
            module.configure_model()
        like = find_hf_model(module, require_lm_head=True)
    path = build_cache(args.reference, datamodule, args.out, like=like, dtype=args.dtype, device=args.device)
    cache = ReferenceLossCache.load(path)
    print(f"reference_cache: {len(cache)} samples, {cache.nll.numel()} tokens scored with {args.reference!r} "
          f"-> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
