"""PyTorch path of the fused prompt embedding (the CPU path; also the fp64 path everywhere).

Forward: ``delta = scale * lora_a @ lora_b`` is computed once (``[S, D]``, fp32) with one extra zero row ``S`` that
every out-of-range position points at, then ``out = weight[ids]`` and ``out += delta[pos']`` in place, in token
chunks (fp32 temporaries of ~4 MiB). No ``[B, S, D]`` repeat; besides the output, no ``[B, T, D]`` tensor exists.

Backward: ``G[s] = sum_{(b,t): pos=s} dOut[b, t]`` with one ``index_add_`` into ``[S + 1, D]`` (row ``S`` collects
the out-of-range positions and is dropped), then ``dA = scale * G @ B^T`` and ``dB = scale * A^T @ G``. No host
synchronisation.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import compute_dtype_for


def clamp_positions(position_ids: Tensor, num_positions: int) -> Tensor:
    """Positions outside ``[0, S)`` -> ``S`` (the sentinel row), int64."""
    pos = position_ids.long()
    valid = (pos >= 0) & (pos < num_positions)
    return torch.where(valid, pos, torch.full_like(pos, num_positions))


def chunk_rows(d: int) -> int:
    """Tokens per chunk: fp32 temporaries of about 2**20 elements (4 MiB) each."""
    return max(1, (1 << 20) // max(d, 1))


def forward(input_ids: Tensor, weight: Tensor, position_ids: Tensor, lora_a: Tensor, lora_b: Tensor,
            scale: float) -> Tensor:
    cd = compute_dtype_for(weight, lora_a, lora_b)
    s, d = lora_a.shape[0], lora_b.shape[1]
    delta = torch.empty((s + 1, d), dtype=cd, device=weight.device)
    torch.matmul(lora_a.to(cd), lora_b.to(cd), out=delta[:s])
    delta[:s].mul_(scale)
    delta[s].zero_()
    idx = clamp_positions(position_ids, s).reshape(-1)
    out = torch.nn.functional.embedding(input_ids, weight)  # the output buffer, updated in place chunk by chunk
    flat = out.view(-1, d)
    step = chunk_rows(d)
    for i in range(0, flat.shape[0], step):
        rows = flat[i:i + step]
        upd = torch.nn.functional.embedding(idx[i:i + step], delta)
        if rows.dtype == cd:
            rows.add_(upd)
        else:  # low-precision table: add in the compute dtype, cast once
            rows.copy_(upd.add_(rows.to(cd)))
    return out


def reduce_positions(grad_out: Tensor, position_ids: Tensor, num_positions: int, dtype: torch.dtype) -> Tensor:
    """``G[s] = sum over tokens at position s of grad_out`` -> ``[S, D]`` in ``dtype``."""
    d = grad_out.shape[-1]
    idx = clamp_positions(position_ids, num_positions).reshape(-1)
    flat = grad_out.reshape(-1, d)
    g = torch.zeros((num_positions + 1, d), dtype=dtype, device=grad_out.device)
    step = chunk_rows(d)
    for i in range(0, flat.shape[0], step):  # chunked so a low-precision dOut is upcast a chunk at a time
        g.index_add_(0, idx[i:i + step], flat[i:i + step].to(dtype))
    return g[:num_positions]


def lora_grads(g: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float, need_a: bool = True,
               need_b: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """``dA = scale * G @ B^T``, ``dB = scale * A^T @ G`` from the reduced ``G`` (computed in G's dtype)."""
    ga = (g @ lora_b.to(g.dtype).T).mul_(scale).to(lora_a.dtype) if need_a else None
    gb = (lora_a.to(g.dtype).T @ g).mul_(scale).to(lora_b.dtype) if need_b else None
    return ga, gb


def backward(grad_out: Tensor, position_ids: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
             need_a: bool = True, need_b: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    cd = compute_dtype_for(grad_out, lora_a, lora_b)
    g = reduce_positions(grad_out, position_ids, lora_a.shape[0], cd)
    return lora_grads(g, lora_a, lora_b, scale, need_a, need_b)
