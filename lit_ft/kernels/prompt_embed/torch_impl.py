"""PyTorch path of the fused prompt embedding (the CPU path; also the fp64 path everywhere).

Forward: ``delta = scale * lora_a @ lora_b`` is computed once (``[S, D]``, fp32) with one extra zero row ``S`` that
every out-of-range position points at, then ``out = weight[ids] + delta[pos']``. No ``[B, S, D]`` repeat; nothing
of size ``[B, T, D]`` survives the forward (only the output).

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


def forward(input_ids: Tensor, weight: Tensor, position_ids: Tensor, lora_a: Tensor, lora_b: Tensor,
            scale: float) -> Tensor:
    cd = compute_dtype_for(weight, lora_a, lora_b)
    s, d = lora_a.shape[0], lora_b.shape[1]
    delta = torch.empty((s + 1, d), dtype=cd, device=weight.device)
    torch.matmul(lora_a.to(cd), lora_b.to(cd), out=delta[:s])
    delta[:s].mul_(scale)
    delta[s].zero_()
    idx = clamp_positions(position_ids, s)
    out = torch.nn.functional.embedding(input_ids, weight)
    if out.dtype == cd:
        out.add_(torch.nn.functional.embedding(idx, delta))
        return out
    return (out.to(cd) + torch.nn.functional.embedding(idx, delta)).to(weight.dtype)


def reduce_positions(grad_out: Tensor, position_ids: Tensor, num_positions: int, dtype: torch.dtype) -> Tensor:
    """``G[s] = sum over tokens at position s of grad_out`` -> ``[S, D]`` in ``dtype``."""
    d = grad_out.shape[-1]
    idx = clamp_positions(position_ids, num_positions).reshape(-1)
    g = torch.zeros((num_positions + 1, d), dtype=dtype, device=grad_out.device)
    g.index_add_(0, idx, grad_out.reshape(-1, d).to(dtype))
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
