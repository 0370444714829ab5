"""PyTorch path of the safe Padé activation unit (the CPU path; also the fp64 path everywhere).

Horner evaluation of ``P``, ``S`` and their derivatives in fp32 (fp64 for fp64 inputs), closed-form backward:

* ``dR/dx   = (P'(x) Q - P sign(S) S'(x)) / Q^2`` with ``Q = 1 + |S|``
* ``dR/da_j = x^j / Q``
* ``dR/db_k = -P sign(S) x^k / Q^2``

with ``sign(0) = 0``. Coefficient gradients are sums over all elements. Only ``x`` and the coefficients are saved.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import compute_dtype_for


def _horner(x: Tensor, a: Tensor, with_grad: bool):
    """``p(x) = sum_j a_j x^j`` (and ``p'(x)``) by Horner's rule; ``a`` is 1-D, low order first."""
    p = torch.full_like(x, 0) + a[-1]
    dp = torch.zeros_like(x) if with_grad else None
    for j in range(a.shape[0] - 2, -1, -1):
        if with_grad:
            dp = dp * x + p
        p = p * x + a[j]
    return p, dp


def evaluate(xc: Tensor, a: Tensor, b: Tensor, with_grad: bool = False):
    """``P, S`` (and ``P', S'``) at ``xc`` (already in the compute dtype)."""
    p, dp = _horner(xc, a, with_grad)
    t, dt = _horner(xc, b, with_grad)  # S(x) = x * T(x), T(x) = b_1 + b_2 x + ... + b_n x^(n-1)
    s = xc * t
    ds = t + xc * dt if with_grad else None
    return p, s, dp, ds


def forward(x: Tensor, numerator: Tensor, denominator: Tensor) -> Tensor:
    cd = compute_dtype_for(x, numerator, denominator)
    xc = x.to(cd)
    p, s, _, _ = evaluate(xc, numerator.to(cd), denominator.to(cd))
    return (p / (1 + s.abs())).to(x.dtype)


def backward(grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, need_x: bool = True,
             need_a: bool = True, need_b: bool = True) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    cd = compute_dtype_for(x, numerator, denominator)
    xc, g = x.to(cd), grad.to(cd)
    p, s, dp, ds = evaluate(xc, numerator.to(cd), denominator.to(cd), with_grad=True)
    sg = torch.sign(s)  # sign(0) = 0: the subgradient at the kink of |S|
    q = 1 + s.abs()
    gq = g / q
    t = -gq * p * sg / q  # upstream * dR/dS-ish term: -P sign(S) / Q^2
    gx = (gq * dp + t * ds).to(x.dtype) if need_x else None
    ga = gb = None
    if need_a or need_b:
        gx_flat, t_flat, x_flat = gq.reshape(-1), t.reshape(-1), xc.reshape(-1)
        m1, n = numerator.shape[0], denominator.shape[0]
        ga_list, gb_list = [], []
        xp = torch.ones_like(x_flat)
        for j in range(max(m1, n + 1)):
            if need_a and j < m1:
                ga_list.append((gx_flat * xp).sum())
            if need_b and 1 <= j <= n:
                gb_list.append((t_flat * xp).sum())
            xp = xp * x_flat
        ga = torch.stack(ga_list).to(numerator.dtype) if need_a else None
        gb = torch.stack(gb_list).to(denominator.dtype) if need_b else None
    return gx, ga, gb
