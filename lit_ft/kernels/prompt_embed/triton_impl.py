"""Triton path of the fused prompt embedding (imported only when it runs: it imports triton).

Forward: one program per ``[BLOCK_M tokens, BLOCK_D columns]`` tile gathers the frozen table rows and adds
``scale * sum_k A[pos, k] * B[k, cols]`` (rank-r FMA loop in fp32; positions outside ``[0, S)`` add nothing, ids
outside ``[0, V)`` give NaN rows instead of reading out of bounds), then casts to the table's dtype.

Backward (deterministic, no atomics, no host sync): tokens are sorted by (clamped) position on the device and
``torch.searchsorted`` gives each position's segment; one program per ``[position, BLOCK_D]`` tile sums its
segment of ``dOut`` rows in fp32 -> ``G: [S, D]``. Then ``dA = scale * G @ B^T`` and ``dB = scale * A^T @ G`` are
two small torch GEMMs. fp64 inputs are delegated to the torch path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_impl
from .reference import compute_dtype_for


@triton.jit
def _fwd_kernel(
    ids_ptr, pos_ptr, w_ptr, a_ptr, b_ptr, out_ptr,
    N, D, V, S, R, scale,
    stride_wv, stride_wd, stride_as, stride_ar, stride_br, stride_bd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    rmask = rows < N
    cmask = cols < D
    ids = tl.load(ids_ptr + rows, mask=rmask, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + rows, mask=rmask, other=-1).to(tl.int64)
    id_ok = (ids >= 0) & (ids < V)
    valid = rmask & (pos >= 0) & (pos < S)
    safe_ids = tl.where(id_ok, ids, 0)
    safe_pos = tl.where(valid, pos, 0)
    w = tl.load(w_ptr + safe_ids[:, None] * stride_wv + cols[None, :] * stride_wd,
                mask=(rmask & id_ok)[:, None] & cmask[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k in range(0, R):
        a_k = tl.load(a_ptr + safe_pos * stride_as + k * stride_ar, mask=valid, other=0.0).to(tl.float32)
        b_k = tl.load(b_ptr + k * stride_br + cols * stride_bd, mask=cmask, other=0.0).to(tl.float32)
        acc += a_k[:, None] * b_k[None, :]
    out = w + acc * scale
    out = tl.where(id_ok[:, None], out, float("nan"))
    tl.store(out_ptr + rows[:, None] * D + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=rmask[:, None] & cmask[None, :])


@triton.jit
def _reduce_kernel(
    g_ptr, order_ptr, start_ptr, end_ptr, out_ptr, D,
    BLOCK_D: tl.constexpr,
):
    """out[s, cols] = sum_{i in [start[s], end[s])} g[order[i], cols] (fp32)."""
    s = tl.program_id(0)
    pid_d = tl.program_id(1)
    cols = (pid_d * BLOCK_D + tl.arange(0, BLOCK_D)).to(tl.int64)
    cmask = cols < D
    lo = tl.load(start_ptr + s)
    hi = tl.load(end_ptr + s)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for i in range(lo, hi):
        row = tl.load(order_ptr + i).to(tl.int64)
        acc += tl.load(g_ptr + row * D + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(out_ptr + s.to(tl.int64) * D + cols, acc, mask=cmask)


def _block_d(d: int) -> int:
    return min(128, triton.next_power_of_2(max(d, 16)))


def forward(input_ids: Tensor, weight: Tensor, position_ids: Tensor, lora_a: Tensor, lora_b: Tensor,
            scale: float) -> Tensor:
    if compute_dtype_for(weight, lora_a, lora_b) == torch.float64:
        return torch_impl.forward(input_ids, weight, position_ids, lora_a, lora_b, scale)
    v, d = weight.shape
    s, r = lora_a.shape
    ids = input_ids.reshape(-1).contiguous()
    pos = position_ids.reshape(-1).contiguous()
    n = ids.shape[0]
    out = torch.empty((n, d), dtype=weight.dtype, device=weight.device)
    if n:
        block_m, block_d = 32, _block_d(d)
        grid = (triton.cdiv(n, block_m), triton.cdiv(d, block_d))
        _fwd_kernel[grid](ids, pos, weight, lora_a, lora_b, out, n, d, v, s, r, float(scale),
                          weight.stride(0), weight.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0),
                          lora_b.stride(1), BLOCK_M=block_m, BLOCK_D=block_d)
    return out.reshape(*input_ids.shape, d)


def reduce_positions(grad_out: Tensor, position_ids: Tensor, num_positions: int) -> Tensor:
    """``G[s] = sum over tokens at position s of grad_out`` -> ``[S, D]`` fp32, deterministic."""
    d = grad_out.shape[-1]
    g = grad_out.reshape(-1, d).contiguous()
    pos = torch_impl.clamp_positions(position_ids.reshape(-1), num_positions)  # out of range -> S (dropped)
    sorted_pos, order = torch.sort(pos, stable=True)
    targets = torch.arange(num_positions, device=pos.device, dtype=sorted_pos.dtype)
    start = torch.searchsorted(sorted_pos, targets, right=False)
    end = torch.searchsorted(sorted_pos, targets, right=True)
    out = torch.empty((num_positions, d), dtype=torch.float32, device=grad_out.device)
    block_d = _block_d(d)
    _reduce_kernel[(num_positions, triton.cdiv(d, block_d))](g, order, start, end, out, d, BLOCK_D=block_d)
    return out


def backward(grad_out: Tensor, position_ids: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
             need_a: bool = True, need_b: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    if compute_dtype_for(grad_out, lora_a, lora_b) == torch.float64:
        return torch_impl.backward(grad_out, position_ids, lora_a, lora_b, scale, need_a, need_b)
    g = reduce_positions(grad_out, position_ids, lora_a.shape[0])
    return torch_impl.lora_grads(g, lora_a, lora_b, scale, need_a, need_b)
