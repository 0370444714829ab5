"""Gram-difference hinge (token relation distillation, VideoREPA's TRD): ``Σ_{i,j} ReLU(|S_s − S_t|_{ij} − m)`` per
row, with ``S = X̂ X̂ᵀ`` the cosine Gram matrices of a student's and a teacher's token features, **without storing the
``[W, W]`` matrices**: forward and backward loop over ``[tile, tile]`` blocks and recompute them from the normalised
features (see ``docs/kernels/gram_hinge.md``).

The public entry is :func:`gram_hinge`; it validates its arguments, L2-normalises the features (plain autograd:
``[B, W, D]`` work), zeroes masked positions and calls the ``torch.library`` custom op ``lit_ft::gram_hinge`` whose
backward is ``lit_ft::gram_hinge_backward``. The tiled path is plain torch (CPU and CUDA); :func:`gram_hinge_reference`
is the dense fp64 spec.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import torch_impl
from .reference import gram_hinge_reference

__all__ = ["gram_hinge", "gram_hinge_reference", "DEFAULT_TILE"]

#: rows per block: a ``[B, 512, 512]`` fp32 block is 1 MiB per row of the batch
DEFAULT_TILE = 512
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("lit_ft::gram_hinge", mutates_args=())
def _gram_hinge(xs: Tensor, xt: Tensor, margin: float, tile: int) -> Tensor:
    return torch_impl.forward(xs, xt, margin, tile)


@_gram_hinge.register_fake
def _gram_hinge_fake(xs, xt, margin, tile):
    return xs.new_empty((xs.shape[0],), dtype=torch_impl.compute_dtype(xs, xt))


@torch.library.custom_op("lit_ft::gram_hinge_backward", mutates_args=())
def _gram_hinge_backward(grad: Tensor, xs: Tensor, xt: Tensor, margin: float, tile: int, need_s: bool,
                         need_t: bool) -> tuple[Tensor, Tensor]:
    gs, gt = torch_impl.backward(grad, xs, xt, margin, tile, need_s, need_t)
    # unrequested gradients come back as empty tensors (custom ops cannot return None)
    return (gs if gs is not None else xs.new_empty((0,)), gt if gt is not None else xt.new_empty((0,)))


@_gram_hinge_backward.register_fake
def _gram_hinge_backward_fake(grad, xs, xt, margin, tile, need_s, need_t):
    return (torch.empty_like(xs) if need_s else xs.new_empty((0,)),
            torch.empty_like(xt) if need_t else xt.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    xs, xt, margin, tile = inputs
    ctx.save_for_backward(xs, xt)
    ctx.margin, ctx.tile = margin, tile


def _backward(ctx, grad):
    xs, xt = ctx.saved_tensors
    need_s, need_t = ctx.needs_input_grad[:2]
    if not (need_s or need_t):
        return None, None, None, None
    gs, gt = _gram_hinge_backward(grad.contiguous(), xs, xt, ctx.margin, ctx.tile, need_s, need_t)
    return gs if need_s else None, gt if need_t else None, None, None


_gram_hinge.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public wrapper


def gram_hinge(xs: Tensor, xt: Tensor, margin: float = 0.1, mask: Tensor | None = None, tile: int | None = None,
               normalize: bool = True) -> Tensor:
    """Per-row sum of the Gram-difference hinge ``Σ_{i,j} ReLU(|S_s[i,j] − S_t[i,j]| − margin)``.

    Args:
        xs: student features ``[B, W, D_s]`` (fp16/bf16/fp32/fp64); may require grad.
        xt: teacher features ``[B, W, D_t]`` (same ``B``, ``W``, dtype and device; any width); may require grad.
        margin: the hinge margin ``m`` (finite, >= 0). VideoREPA uses 0.1.
        mask: optional bool ``[B, W]``: ``False`` positions (padding, ignored tokens) are zeroed on both sides, so
            none of their pairs counts (a zero row is similar to nothing).
        tile: rows per block (int >= 1); default :data:`DEFAULT_TILE`. Memory holds ``[B, tile, tile]`` blocks,
            never ``[B, W, W]``.
        normalize: L2-normalise the features first (the cosine Gram; default). ``False``: take them as they are.

    Returns:
        ``[B]`` fp32 sums (fp64 for fp64 inputs) over all ``W²`` pairs (the diagonal included). Divide by the
        number of valid pairs for the paper's mean.
    """
    for name, x in (("xs", xs), ("xt", xt)):
        if not isinstance(x, Tensor):
            raise TypeError(f"gram_hinge: `{name}` must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"gram_hinge: `{name}` must be [B, W, D], got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"gram_hinge: `{name}` must be float16/bfloat16/float32/float64, got {x.dtype}")
    if xs.shape[:2] != xt.shape[:2]:
        raise ValueError(f"gram_hinge: `xs` {tuple(xs.shape)} and `xt` {tuple(xt.shape)} must share [B, W]")
    if xs.dtype != xt.dtype or xs.device != xt.device:
        raise ValueError(f"gram_hinge: `xs` and `xt` must share dtype and device, got {xs.dtype}/{xs.device} and "
                         f"{xt.dtype}/{xt.device}")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) or margin < 0:
        raise ValueError(f"gram_hinge: `margin` must be a finite number >= 0, got {margin!r}")
    if tile is None:
        tile = DEFAULT_TILE
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 1:
        raise ValueError(f"gram_hinge: `tile` must be an int >= 1, got {tile!r}")
    if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool
                             or tuple(mask.shape) != tuple(xs.shape[:2])):
        raise ValueError(f"gram_hinge: `mask` must be a bool tensor of shape {tuple(xs.shape[:2])}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    s, t = xs, xt
    if normalize:
        cd = torch_impl.compute_dtype(xs, xt)
        s, t = F.normalize(s.to(cd), dim=-1), F.normalize(t.to(cd), dim=-1)
    if mask is not None:
        m = mask.to(device=s.device)[..., None]
        s = s.masked_fill(~m, 0.0)
        t = t.masked_fill(~m, 0.0)
    return _gram_hinge(s.contiguous(), t.contiguous(), float(margin), int(tile))
