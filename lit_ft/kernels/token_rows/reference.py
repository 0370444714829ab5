"""Plain-torch ground truth for the token-row ops (the spec).

``gather_rows``: ``out[b, j] = x[b, index[b, j]]`` (``[B, k, D]``, rows in the order of ``index``).
``merge_rows``: ``out = base`` with row ``index[b, j]`` replaced by ``rows[b, j]``; every other row is ``base``'s
(a token eliminated at this layer passes through on the residual stream).

Indices within one batch row are distinct (the ops refuse duplicates); autograd through these functions gives the
reference gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _batch_index(index: Tensor) -> Tensor:
    """``[B, 1]`` batch positions that broadcast against ``index`` for advanced indexing."""
    return torch.arange(index.shape[0], device=index.device)[:, None]


def gather_rows_reference(x: Tensor, index: Tensor) -> Tensor:
    """``x[b, index[b, j]]`` for every ``(b, j)`` -> ``[B, k, D]``."""
    return x[_batch_index(index), index.long()]


def merge_rows_reference(base: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    """``base`` with rows ``index[b, j]`` replaced by ``rows[b, j]`` -> ``[B, T, D]`` (a new tensor)."""
    out = base.clone()
    out[_batch_index(index), index.long()] = rows
    return out
