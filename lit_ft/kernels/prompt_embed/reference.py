"""Plain-torch ground truth for the fused prompt embedding (the spec).

``out[b, t] = weight[input_ids[b, t]] + scale * (lora_a[position_ids[b, t]] @ lora_b)`` for ``0 <= position < S``
(``S = lora_a.shape[0]``); tokens whose position is outside ``[0, S)`` (negative, or beyond DePT's ``max_length``)
get no update. The low-rank term is computed in fp32 (fp64 when any input is fp64), added to the gathered row and
the sum is cast to ``weight``'s dtype. Autograd through this function gives the reference gradients; pass fp64
inputs to get a ground truth for accuracy checks.

:func:`prompt_embed_repeat_reference` is the DePT way (``(A @ B)`` repeated over the batch, positions ``0..T-1``),
kept for benchmarks and as a second cross-check.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def compute_dtype_for(*tensors: Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def prompt_embed_reference(
    input_ids: Tensor,
    weight: Tensor,
    position_ids: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: float,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """Reference semantics (see the module docstring). ``position_ids`` broadcasts against ``input_ids``."""
    cd = compute_dtype or compute_dtype_for(weight, lora_a, lora_b)
    s = lora_a.shape[0]
    position_ids = position_ids.expand(input_ids.shape)
    valid = (position_ids >= 0) & (position_ids < s)
    safe = torch.where(valid, position_ids, torch.zeros_like(position_ids))
    emb = weight[input_ids].to(cd)  # [B, T, D]
    delta = (lora_a.to(cd)[safe] @ lora_b.to(cd)) * scale  # [B, T, D]: per-position low-rank term
    delta = delta * valid.unsqueeze(-1).to(cd)
    return (emb + delta).to(weight.dtype)


def prompt_embed_repeat_reference(input_ids: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                                  scale: float) -> Tensor:
    """DePT's formulation: positions ``0..T-1`` (``T <= S``), ``scale * (A[:T] @ B)`` repeated over the batch."""
    b, t = input_ids.shape
    cd = compute_dtype_for(weight, lora_a, lora_b)
    delta = (lora_a[:t].to(cd) @ lora_b.to(cd)) * scale  # [T, D]
    return (weight[input_ids].to(cd) + delta.unsqueeze(0).repeat(b, 1, 1)).to(weight.dtype)
