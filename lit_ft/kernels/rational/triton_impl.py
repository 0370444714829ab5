"""Triton path of the safe Padé activation unit (imported only when it runs: it imports triton).

Forward: elementwise Horner evaluation of ``P`` and ``S`` in fp32 (degrees are compile-time constants).
Backward: one elementwise pass computes ``dR/dx`` and, per block of ``BLOCK`` elements, the partial sums of the
``m + 1 + n`` coefficient gradients into a ``[num_blocks, m + 1 + n]`` fp32 buffer; torch sums it over blocks
(two-pass reduction: deterministic, no atomics, no host sync). fp64 inputs are delegated to the torch path.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_impl
from .reference import compute_dtype_for

BLOCK = 1024


@triton.jit
def _horner(x, c_ptr, DEG: tl.constexpr, WITH_GRAD: tl.constexpr):
    """p(x) = sum_{j<=DEG} c[j] x^j and p'(x) (fp32)."""
    p = tl.zeros_like(x) + tl.load(c_ptr + DEG).to(tl.float32)
    dp = tl.zeros_like(x)
    for jj in tl.static_range(DEG):
        j = DEG - 1 - jj
        if WITH_GRAD:
            dp = dp * x + p
        p = p * x + tl.load(c_ptr + j).to(tl.float32)
    return p, dp


@triton.jit
def _fwd_kernel(x_ptr, a_ptr, b_ptr, out_ptr, numel, M: tl.constexpr, N: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p, _ = _horner(x, a_ptr, M, False)
    t, _ = _horner(x, b_ptr, N - 1, False)
    s = x * t
    tl.store(out_ptr + offs, (p / (1.0 + tl.abs(s))).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bwd_kernel(g_ptr, x_ptr, a_ptr, b_ptr, gx_ptr, part_ptr, numel,
                M: tl.constexpr, N: tl.constexpr, L: tl.constexpr, NEED_X: tl.constexpr, NEED_COEF: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p, dp = _horner(x, a_ptr, M, True)
    t, dt = _horner(x, b_ptr, N - 1, True)
    s = x * t
    ds = t + x * dt
    sg = tl.where(s > 0, 1.0, tl.where(s < 0, -1.0, 0.0))  # sign(0) = 0
    q = 1.0 + tl.abs(s)
    gq = g / q
    u = -gq * p * sg / q
    if NEED_X:
        tl.store(gx_ptr + offs, (gq * dp + u * ds).to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_COEF:
        base = part_ptr + pid.to(tl.int64) * (M + 1 + N)
        xp = tl.where(mask, 1.0, 0.0)
        for j in tl.static_range(L):  # L = max(M, N) + 1 powers x^0 .. x^max(M, N)
            if j <= M:
                tl.store(base + j, tl.sum(gq * xp, axis=0))  # sum g x^j / Q
            if j >= 1 and j <= N:
                tl.store(base + M + j, tl.sum(u * xp, axis=0))  # sum -g P sign(S) x^j / Q^2
            xp = xp * x


def forward(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    if compute_dtype_for(x, numerator, denominator) == torch.float64:
        return torch_impl.forward(x, numerator, denominator)
    xf = x.contiguous()
    out = torch.empty_like(xf)
    numel = xf.numel()
    if numel:
        _fwd_kernel[(triton.cdiv(numel, BLOCK),)](xf, numerator.contiguous(), denominator.contiguous(), out, numel,
                                                 M=numerator.shape[0] - 1, N=denominator.shape[0], BLOCK=BLOCK)
    return out


def backward(grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, need_x: bool = True,
             need_a: bool = True, need_b: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    if compute_dtype_for(x, numerator, denominator) == torch.float64:
        return torch_impl.backward(grad, x, numerator, denominator, need_x, need_a, need_b)
    xf, gf = x.contiguous(), grad.contiguous()
    m1, n = numerator.shape[0], denominator.shape[0]
    numel = xf.numel()
    blocks = triton.cdiv(numel, BLOCK)
    need_coef = need_a or need_b
    gx = torch.empty_like(xf) if need_x else xf.new_empty((1,))
    part = torch.empty((max(blocks, 1), m1 + n), dtype=torch.float32, device=x.device)
    if numel:
        _bwd_kernel[(blocks,)](gf, xf, numerator.contiguous(), denominator.contiguous(), gx, part, numel,
                               M=m1 - 1, N=n, L=max(m1 - 1, n) + 1, NEED_X=need_x, NEED_COEF=need_coef, BLOCK=BLOCK)
    else:
        part.zero_()
    sums = part.sum(0) if need_coef else None
    # copies: views of one `sums` tensor would alias each other, which a custom op's outputs must not
    ga = sums[:m1].to(numerator.dtype, copy=True) if need_a else None
    gb = sums[m1:].to(denominator.dtype, copy=True) if need_b else None
    return (gx if need_x else None), ga, gb
