"""PyTorch path of the token-row ops (the CPU path; also the generic fallback on any device).

Every op works on the flattened ``[B * T, D]`` row view with one flat row index ``b * T + index[b, j]``, so each
op is one ``index_select`` / ``index_copy_`` / ``index_fill_`` of whole rows: no ``[B, k, D]`` index expansion, no
host synchronisation. Outputs are always new tensors (custom ops may not alias their inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def flat_index(index: Tensor, t: int) -> Tensor:
    """``[B * k]`` int64 rows of the flattened ``[B * T, D]`` view: ``b * T + index[b, j]``."""
    offsets = torch.arange(index.shape[0], device=index.device, dtype=torch.int64)[:, None] * t
    return (index.long() + offsets).reshape(-1)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``out[b, j] = x[b, index[b, j]]`` -> ``[B, k, D]``."""
    b, t, d = x.shape
    flat = x.reshape(b * t, d)  # a view when x is contiguous
    return flat.index_select(0, flat_index(index, t)).view(b, index.shape[1], d)


def scatter_rows(rows: Tensor, index: Tensor, t: int) -> Tensor:
    """Zeros ``[B, T, D]`` with ``rows[b, j]`` at row ``index[b, j]`` (the gradient of :func:`gather_rows`)."""
    b, k, d = rows.shape
    out = rows.new_zeros((b, t, d))
    out.view(b * t, d).index_copy_(0, flat_index(index, t), rows.reshape(b * k, d))
    return out


def merge_rows(base: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    """``base`` with rows ``index[b, j]`` replaced by ``rows[b, j]`` -> a new ``[B, T, D]``."""
    b, t, d = base.shape
    out = base.clone(memory_format=torch.contiguous_format)
    out.view(b * t, d).index_copy_(0, flat_index(index, t), rows.reshape(b * index.shape[1], d))
    return out


def zero_rows(grad: Tensor, index: Tensor) -> Tensor:
    """A copy of ``grad`` with rows ``index[b, j]`` set to zero (the gradient of :func:`merge_rows` w.r.t. base)."""
    b, t, d = grad.shape
    out = grad.clone(memory_format=torch.contiguous_format)
    out.view(b * t, d).index_fill_(0, flat_index(index, t), 0)
    return out
