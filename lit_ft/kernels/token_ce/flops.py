"""FLOP formulas of the fused linear-CE custom ops, registered with ``torch.utils.flop_counter`` so that
``FlopCounterMode`` (GreenTrainer, benchmarks, users' own profiling) counts the lm_head matmuls that the op performs
internally — an unregistered custom op would count as 0 FLOPs."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import register_flop_formula

from .torch_impl import GRAD_HIDDEN, GRAD_WEIGHT


def token_ce_flops(hidden, weight, labels, bias, token_weights, keep, *rest, out_val: Any = None,  # noqa: ANN001
                   grad_tokens: Any = None) -> int:
    """The logits matmul, plus ``dX = dZ·W`` and ``dW = dZᵀX`` when ``grad_mask`` asks for them (computed inside the
    op), over the kept tokens only. Reads the kept count on the host (profiling only, never in training)."""
    ignore_index, grad_mask = rest[1 if grad_tokens is None else 0], rest[-2]  # rest ends (grad_mask, accumulation)
    kept = labels != ignore_index
    if keep is not None:
        kept = kept & keep
    n = int(kept.sum().item())
    v, d = weight.shape
    return 2 * n * v * d * (1 + bool(grad_mask & GRAD_HIDDEN) + bool(grad_mask & GRAD_WEIGHT))


def token_ce_backward_flops(grad_tokens, hidden, weight, labels, bias, token_weights, keep, *rest,  # noqa: ANN001
                            out_val: Any = None) -> int:
    return token_ce_flops(hidden, weight, labels, bias, token_weights, keep, *rest, grad_tokens=grad_tokens)


_registered = False


def register() -> None:
    """Register both formulas (once)."""
    global _registered
    if _registered:
        return
    import lit_ft.kernels.token_ce  # noqa: F401  (defines the ops)

    register_flop_formula(torch.ops.lit_ft.token_ce, get_raw=True)(token_ce_flops)
    register_flop_formula(torch.ops.lit_ft.token_ce_backward, get_raw=True)(token_ce_backward_flops)
    _registered = True
