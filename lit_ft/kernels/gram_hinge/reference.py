"""Dense ground truth of the Gram-difference hinge (the spec; fp64 by default).

Per row ``b`` of the batch, with L2-normalised features ``X̂_s = X_s / ‖X_s‖`` (``[W, D_s]``) and ``X̂_t``
(``[W, D_t]``), the cosine Gram matrices ``S_s = X̂_s X̂_sᵀ`` and ``S_t = X̂_t X̂_tᵀ`` (``[W, W]``) and

    out[b] = Σ_{i, j} ReLU(|S_s[i, j] − S_t[i, j]| − margin)

(a **sum** over all ``W²`` pairs, the diagonal included: the mean is the caller's normaliser). A zero feature row (a
padded or ignored position) has zero similarity with everything on both sides, so with ``margin >= 0`` its pairs add
nothing and get no gradient. Autograd through this function gives the reference gradients (``ReLU'(0) = 0``,
``sign(0) = 0``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gram_hinge_reference(xs: Tensor, xt: Tensor, margin: float = 0.1, mask: Tensor | None = None,
                         normalize: bool = True, dtype: torch.dtype = torch.float64) -> Tensor:
    """``[B]`` hinge sums as in the module docstring, computed densely in ``dtype``. ``mask`` (bool ``[B, W]``, optional)
    zeroes ignored positions; ``normalize=False`` takes the features as already normalised."""
    s, t = xs.to(dtype), xt.to(dtype)
    if normalize:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if mask is not None:
        m = mask.to(device=s.device, dtype=dtype)[..., None]
        s, t = s * m, t * m
    gs = s @ s.transpose(-1, -2)
    gt = t @ t.transpose(-1, -2)
    return torch.relu((gs - gt).abs() - margin).sum(dim=(-1, -2))
