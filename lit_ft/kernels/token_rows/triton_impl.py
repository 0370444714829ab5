"""Triton path of the token-row ops (imported only when it runs: it imports triton).

Two row kernels, each one program per ``(b, j)`` (row ``j`` of batch ``b`` in ``index``) that copies the ``D``
columns in ``BLOCK_D`` tiles:

* ``_gather_kernel``: ``out[b, j] = x[b, index[b, j]]`` (``x`` with any strides, ``out`` contiguous). An index
  outside ``[0, T)`` gives a NaN row instead of an out-of-bounds read.
* ``_scatter_kernel``: writes ``src[b, j]`` (or zeros, ``ZERO``) into row ``index[b, j]`` of a contiguous
  ``[B, T, D]`` output; an index outside ``[0, T)`` writes nothing.

``merge_rows`` = a copy of ``base`` + scatter, ``scatter_rows`` = zeros + scatter, ``zero_rows`` = a copy + scatter
of zeros. Indices within a batch row are distinct (the public ops refuse duplicates on CPU), so no two programs
write the same row: no atomics, deterministic, no host sync. Pure copies: every dtype is exact.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

#: the widest column tile one program copies per loop step
MAX_BLOCK_D = 1024


@triton.jit
def _gather_kernel(
    x_ptr, idx_ptr, out_ptr,
    K, T, D, stride_xb, stride_xt, stride_xd,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # = b * K + j, also the output row
    b = pid // K
    row = tl.load(idx_ptr + pid).to(tl.int64)
    # the range test as a [BLOCK_D] vector: a scalar-and-block mask is not supported by the interpreter
    rv = tl.zeros((BLOCK_D,), dtype=tl.int64) + row
    ok = (rv >= 0) & (rv < T)
    src = x_ptr + b * stride_xb + tl.where(ok, rv, 0) * stride_xt
    dst = out_ptr + pid * D
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        cmask = cols < D
        v = tl.load(src + cols * stride_xd, mask=cmask & ok, other=0.0)
        v = tl.where(ok, v, float("nan"))
        tl.store(dst + cols, v.to(out_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _scatter_kernel(
    src_ptr, idx_ptr, out_ptr,
    K, T, D, stride_sb, stride_sk, stride_sd,
    ZERO: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # = b * K + j
    b = pid // K
    j = pid - b * K
    row = tl.load(idx_ptr + pid).to(tl.int64)
    rv = tl.zeros((BLOCK_D,), dtype=tl.int64) + row  # a [BLOCK_D] range mask, as in _gather_kernel
    ok = (rv >= 0) & (rv < T)
    dst = out_ptr + (b * T + tl.where(ok, rv, 0)) * D
    src = src_ptr + b * stride_sb + j * stride_sk
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        cmask = (cols < D) & ok
        if ZERO:
            v = tl.zeros((BLOCK_D,), dtype=out_ptr.dtype.element_ty)
        else:
            v = tl.load(src + cols * stride_sd, mask=cmask, other=0.0).to(out_ptr.dtype.element_ty)
        tl.store(dst + cols, v, mask=cmask)


def _block_d(d: int) -> int:
    return min(MAX_BLOCK_D, triton.next_power_of_2(max(d, 16)))


def _scatter_into(out: Tensor, src: Tensor | None, index: Tensor) -> Tensor:
    """Rows of ``src`` (zeros when ``None``) into the contiguous ``out [B, T, D]`` at ``index``; returns ``out``."""
    b, t, d = out.shape
    k = index.shape[1]
    if b * k and d:
        s = out if src is None else src  # ZERO never reads src: any pointer will do
        idx = index.contiguous()
        _scatter_kernel[(b * k,)](s, idx, out, k, t, d, s.stride(0), s.stride(1), s.stride(2), ZERO=src is None,
                                  BLOCK_D=_block_d(d))
    return out


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    b, t, d = x.shape
    k = index.shape[1]
    out = torch.empty((b, k, d), dtype=x.dtype, device=x.device)
    if b * k and d:
        _gather_kernel[(b * k,)](x, index.contiguous(), out, k, t, d, x.stride(0), x.stride(1), x.stride(2),
                                 BLOCK_D=_block_d(d))
    return out


def scatter_rows(rows: Tensor, index: Tensor, t: int) -> Tensor:
    b, _, d = rows.shape
    return _scatter_into(torch.zeros((b, t, d), dtype=rows.dtype, device=rows.device), rows, index)


def merge_rows(base: Tensor, rows: Tensor, index: Tensor) -> Tensor:
    return _scatter_into(base.clone(memory_format=torch.contiguous_format), rows, index)


def zero_rows(grad: Tensor, index: Tensor) -> Tensor:
    return _scatter_into(grad.clone(memory_format=torch.contiguous_format), None, index)
