"""Plain-torch ground truth for the safe Padé activation unit (the spec).

``R(x) = P(x) / (1 + |S(x)|)`` with ``P(x) = sum_{j=0..m} a_j x^j`` (``numerator = [a_0, ..., a_m]``) and
``S(x) = sum_{k=1..n} b_k x^k`` (``denominator = [b_1, ..., b_n]``): the "safe" PAU of Molina et al. 2020
(``ml-research/pau``), whose denominator is at least 1, so R has no poles. Elementwise; computed in fp32 (fp64 for
fp64 inputs) and cast back to ``x.dtype``. Autograd through this function gives the reference gradients, with
``d|S|/dS = sign(S)`` and ``sign(0) = 0`` (the subgradient torch's ``abs`` uses).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def compute_dtype_for(*tensors: Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def rational_reference(x: Tensor, numerator: Tensor, denominator: Tensor,
                       compute_dtype: Optional[torch.dtype] = None) -> Tensor:
    """Reference semantics (see the module docstring), by explicit powers (no Horner)."""
    cd = compute_dtype or compute_dtype_for(x, numerator, denominator)
    xc, a, b = x.to(cd), numerator.to(cd), denominator.to(cd)
    p = sum(a[j] * xc**j for j in range(a.shape[0]))
    s = sum(b[k - 1] * xc**k for k in range(1, b.shape[0] + 1))
    return (p / (1 + s.abs())).to(x.dtype)
