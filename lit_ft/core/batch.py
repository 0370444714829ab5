"""Batch keys and their validation.

The batch contract (docs/data.md, docs/architecture.md): HF conventions — ``input_ids``, ``attention_mask``, ``labels`` (unshifted, -100 =
ignored) — plus optional ``token_weights`` (float, same shape as labels) and ``sample_idx`` (long [B]). A technique
that needs a key names it with :func:`require_keys`; the error says which key is missing and what provides it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

IGNORE_INDEX = -100

#: Who provides each standard key — quoted in errors so the user knows what to change.
KEY_PROVIDERS: dict[str, str] = {
    "input_ids": "any tokenizing DataModule (e.g. lit_ft.data.SFTDataModule)",
    "attention_mask": "any tokenizing DataModule (e.g. lit_ft.data.SFTDataModule)",
    "labels": (
        "lit_ft.data.SFTDataModule (completion-only labels, prompt tokens = -100) or your collate_fn "
        "(labels = input_ids with ignored positions set to -100)"
    ),
    "sample_idx": "lit_ft.data.SFTDataModule / ClassificationDataModule (always added), or add a long [B] "
    "'sample_idx' tensor in your collate_fn",
    "token_weights": "lit_ft.callbacks.KeyTokenWeighting or a collate_fn that adds a float 'token_weights' tensor",
}


class BatchKeyError(KeyError):
    """A batch lacks a key that a technique needs. ``str()`` gives the full explanation."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable
        return str(self.args[0]) if self.args else ""


def require_keys(batch: Any, keys: Iterable[str], who: str, providers: Mapping[str, str] | None = None) -> None:
    """Raise :class:`BatchKeyError` unless ``batch`` (a mapping) has every key in ``keys``.

    Args:
        batch: the batch as the training step receives it.
        keys: the keys needed.
        who: the technique asking (quoted in the error).
        providers: extra "key -> what provides it" hints, merged over :data:`KEY_PROVIDERS`.
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"{who} needs a dict-like batch with keys {sorted(keys)}; got {type(batch).__name__}. "
            "Return a dict from your collate_fn (HF tokenizers' BatchEncoding works)."
        )
    hints = {**KEY_PROVIDERS, **(providers or {})}
    missing = [k for k in keys if k not in batch]
    if missing:
        lines = [f"  - '{k}': provided by {hints.get(k, 'your DataModule / collate_fn')}" for k in missing]
        raise BatchKeyError(
            f"{who} needs batch key(s) {missing} but the batch has {sorted(batch.keys())}.\n" + "\n".join(lines)
        )


#: the key SFTDataModule(packing=True) adds: which example owns each token of a packed row (-1 on padding)
PACKED_KEY = "packed_sample_idx"


def is_packed(batch: Any) -> bool:
    """Whether ``batch`` is a padding-free packed batch (several examples per row; :mod:`lit_ft.data.packing`)."""
    return isinstance(batch, Mapping) and PACKED_KEY in batch


def refuse_packed(batch: Any, who: str, why: str) -> None:
    """Raise :class:`ValueError` for a packed batch: ``who`` treats a row as one example (``why`` says how)."""
    if is_packed(batch):
        raise ValueError(
            f"{who} does not accept packed batches (SFTDataModule(packing=True) puts several examples in one row): "
            f"{why}. Turn packing off for this technique."
        )


def check_token_tensor(batch: Mapping[str, Any], key: str, like: str, who: str, dtype_kind: str) -> torch.Tensor:
    """Return ``batch[key]`` after checking it is a tensor shaped like ``batch[like]`` with the right dtype kind.

    ``dtype_kind`` is ``"int"``, ``"float"`` or ``"bool"``.
    """
    value = batch[key]
    ref = batch[like]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{who}: batch['{key}'] must be a tensor, got {type(value).__name__}")
    if value.shape != ref.shape:
        raise ValueError(
            f"{who}: batch['{key}'] has shape {tuple(value.shape)} but batch['{like}'] has {tuple(ref.shape)}; "
            "they must match token for token"
        )
    ok = {
        "int": not value.is_floating_point() and value.dtype != torch.bool,
        "float": value.is_floating_point(),
        "bool": value.dtype == torch.bool,
    }[dtype_kind]
    if not ok:
        raise TypeError(f"{who}: batch['{key}'] must have a {dtype_kind} dtype, got {value.dtype}")
    return value
