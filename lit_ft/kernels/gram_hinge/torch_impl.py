"""Tiled PyTorch path of the Gram-difference hinge: never holds the ``[W, W]`` Gram matrices, only ``[B, tile, tile]``
blocks of them.

Forward: for query tiles ``i`` and key tiles ``j >= i`` (the matrices are symmetric), the two Gram blocks
``S_s[i, j]`` and ``S_t[i, j]`` from the normalised features, ``ReLU(|S_s − S_t| − m)`` summed; an off-diagonal block
counts twice. Backward recomputes the same blocks: with ``G = g_b · sign(S_s − S_t) · [|S_s − S_t| > m]`` (symmetric
over the whole matrix), ``∂/∂X_s = 2 G X_s`` and ``∂/∂X_t = −2 G X_t``, accumulated block by block (an
off-diagonal block ``(i, j)`` feeds rows ``i`` through ``G_ij X_j`` and rows ``j`` through ``G_ijᵀ X_i``). Memory:
the inputs, their gradients and a few ``[B, tile, tile]`` blocks. Compute in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 when any input is fp64, else fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _tiles(n: int, tile: int) -> list[tuple[int, int]]:
    return [(a, min(a + tile, n)) for a in range(0, n, tile)]


def forward(xs: Tensor, xt: Tensor, margin: float, tile: int) -> Tensor:
    """``[B]`` sums of ``ReLU(|S_s − S_t| − margin)`` over all pairs (features already normalised)."""
    cd = compute_dtype(xs, xt)
    s, t = xs.to(cd), xt.to(cd)
    B, W = s.shape[0], s.shape[1]
    out = torch.zeros(B, dtype=cd, device=s.device)
    tiles = _tiles(W, tile)
    for ii, (i0, i1) in enumerate(tiles):
        si, ti = s[:, i0:i1], t[:, i0:i1]
        for j0, j1 in tiles[ii:]:
            d = torch.bmm(si, s[:, j0:j1].transpose(1, 2))
            d.sub_(torch.bmm(ti, t[:, j0:j1].transpose(1, 2)))
            part = d.abs_().sub_(margin).clamp_(min=0).sum(dim=(1, 2))
            out += part if i0 == j0 else 2 * part
    return out


def backward(grad: Tensor, xs: Tensor, xt: Tensor, margin: float, tile: int, need_s: bool = True,
             need_t: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """Gradients of ``Σ_b grad[b] · out[b]`` w.r.t. the (normalised) features ``xs`` and ``xt``."""
    cd = compute_dtype(xs, xt)
    s, t, g = xs.to(cd), xt.to(cd), grad.to(cd)
    B, W = s.shape[0], s.shape[1]
    gs = torch.zeros_like(s) if need_s else None
    gt = torch.zeros_like(t) if need_t else None
    tiles = _tiles(W, tile)
    two_g = (2 * g)[:, None, None]
    for ii, (i0, i1) in enumerate(tiles):
        si, ti = s[:, i0:i1], t[:, i0:i1]
        for j0, j1 in tiles[ii:]:
            sj, tj = s[:, j0:j1], t[:, j0:j1]
            d = torch.bmm(si, sj.transpose(1, 2)) - torch.bmm(ti, tj.transpose(1, 2))
            # ReLU'(0) = 0 and sign(0) = 0: pairs at or inside the margin get no gradient
            G = torch.where(d.abs() > margin, torch.sign(d), torch.zeros((), dtype=cd, device=d.device)) * two_g
            if gs is not None:
                gs[:, i0:i1] += torch.bmm(G, sj)
                if j0 != i0:
                    gs[:, j0:j1] += torch.bmm(G.transpose(1, 2), si)
            if gt is not None:
                gt[:, i0:i1] -= torch.bmm(G, tj)
                if j0 != i0:
                    gt[:, j0:j1] -= torch.bmm(G.transpose(1, 2), ti)
    return (None if gs is None else gs.to(xs.dtype)), (None if gt is None else gt.to(xt.dtype))
