"""Entropic optimal transport between two point clouds, in log domain, without the full cost matrix.

:func:`sinkhorn_potentials` solves

    min_P <P, C> - eps * H(P)   s.t.  P 1 = a,  P^T 1 = b,     C_ij = ||x_i - y_j||^2

for uniform marginals ``a = 1/n``, ``b = 1/m`` with the Sinkhorn iterations of OTT-JAX's ``Sinkhorn`` in
``lse_mode`` (the solver GOT-D's authors ran), in OTT's conventions, so its potentials are theirs:

- coupling ``P_ij = exp((f_i + g_j - C_ij) / eps)``; potentials start at 0;
- one iteration: ``g <- eps log b - eps LSE_i((f_i - C_ij)/eps)``, then ``f <- eps log a - eps LSE_j((g_j -
  C_ij)/eps)`` with the new ``g``; each update is over-relaxed, ``new = (1 - w) old + w update`` with ``w =
  momentum`` (OTT's ``acceleration.Momentum(value=w)``, start 0: a constant weight from the first iteration);
- error after an iteration: the L1 distance of P's second marginal to ``b`` (the first is exact after the ``f``
  update when ``w = 1``); the loop stops once the error is below ``threshold`` or after ``max_iterations``.

The cost is never held whole: ``y`` is cut into tiles of ``tile_size`` rows and each tile's ``[n, tile]`` block
``||x||^2 + ||y||^2 - 2 x y^T`` is computed on the fly, once per iteration. The same block serves both half-steps:
the ``g`` update of the tile needs only ``f`` (a logsumexp over ``i``), and the ``f`` update is a logsumexp over
``j`` that combines across tiles, so the tile's part of it is taken right after its ``g`` entries are updated.
The marginal error of the current potentials comes from the same logsumexp as the ``g`` update (``P^T 1 = exp((g
+ eps LSE_i((f_i - C_ij)/eps)) / eps)``). Memory: ``O(n * tile_size)`` besides the inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

__all__ = ["SinkhornResult", "sinkhorn_potentials"]


@dataclass
class SinkhornResult:
    """Potentials and diagnostics of one solve.

    Attributes:
        f: potential of the first cloud ``x`` ([n]).
        g: potential of the second cloud ``y`` ([m]).
        iterations: iterations run.
        error: the last marginal error (L1 on ``y``'s marginal).
        converged: ``error < threshold``.
        cost: the primal transport cost ``<P, C>`` of the final coupling.
    """

    f: torch.Tensor
    g: torch.Tensor
    iterations: int
    error: float
    converged: bool
    cost: float


def _check(x: torch.Tensor, y: torch.Tensor, epsilon: float, threshold: float, max_iterations: int,
           momentum: float, tile_size: int) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"sinkhorn_potentials: `{name}` must be a 2-D tensor [points, dim], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.shape[0] == 0:
            raise ValueError(f"sinkhorn_potentials: `{name}` holds no points (shape {tuple(t.shape)})")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"sinkhorn_potentials: `x` and `y` must share their dimension, got {x.shape[1]} and "
                         f"{y.shape[1]}")
    if not epsilon > 0:
        raise ValueError(f"sinkhorn_potentials: `epsilon` must be > 0, got {epsilon!r}")
    if not threshold > 0:
        raise ValueError(f"sinkhorn_potentials: `threshold` must be > 0, got {threshold!r}")
    if max_iterations < 1:
        raise ValueError(f"sinkhorn_potentials: `max_iterations` must be >= 1, got {max_iterations!r}")
    if not 0 < momentum < 2:
        raise ValueError(f"sinkhorn_potentials: `momentum` must be in (0, 2), got {momentum!r}")
    if tile_size < 1:
        raise ValueError(f"sinkhorn_potentials: `tile_size` must be >= 1, got {tile_size!r}")


def _cost_tile(x: torch.Tensor, x_sq: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor) -> torch.Tensor:
    """``||x_i - y_j||^2`` for one tile ([n, t]); clamped at 0 (the expansion can round below it)."""
    return (x_sq[:, None] + y_sq[None, :] - 2.0 * (x @ y.T)).clamp_min_(0.0)


def sinkhorn_potentials(
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float = 0.1,
    threshold: float = 0.1,
    max_iterations: int = 2000,
    momentum: float = 1.3,
    tile_size: int = 2000,
    iterations: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> SinkhornResult:
    """Entropic OT potentials between uniform clouds ``x`` [n, d] and ``y`` [m, d] (OTT-JAX's Sinkhorn, lse mode).

    Args:
        x: first point cloud (GOT-D: the target set), [n, d].
        y: second point cloud (GOT-D: the candidate pool), [m, d]; tiled along its rows.
        epsilon: entropic regularisation (absolute, the cost is not rescaled), > 0.
        threshold: stop once the L1 marginal error is below it, > 0.
        max_iterations: at most this many iterations, >= 1.
        momentum: over-relaxation weight of every update, in (0, 2); 1 = plain Sinkhorn.
        tile_size: rows of ``y`` per cost tile, >= 1 (memory ``n * tile_size`` elements).
        iterations: wraps the iteration counter (a progress bar); None = a plain range.

    Returns:
        A :class:`SinkhornResult` (potentials in ``x``'s dtype and device).
    """
    _check(x, y, epsilon, threshold, max_iterations, momentum, tile_size)
    n, m = x.shape[0], y.shape[0]
    dtype = x.dtype
    y = y.to(dtype=dtype, device=x.device)
    x_sq, y_sq = (x * x).sum(1), (y * y).sum(1)
    log_a, log_b = -math.log(n), -math.log(m)
    f = torch.zeros(n, dtype=dtype, device=x.device)
    g = torch.zeros(m, dtype=dtype, device=x.device)
    tiles = [(s, min(s + tile_size, m)) for s in range(0, m, tile_size)]
    w, eps = float(momentum), float(epsilon)
    # pass p measures the marginal error of the iterate after p iterations while computing iteration p + 1 from
    # it; OTT stops after the first iteration (p >= 1) whose error is below the threshold, so that pass's updates are
    # discarded. The pass after the last iteration only measures.
    counter: Iterable[int] = range(max_iterations + 1)
    if iterations is not None:
        counter = iterations(counter)
    error, done = math.inf, 0
    for p in counter:
        g_next = torch.empty_like(g)
        f_parts = []  # per tile: LSE_j over the tile of (g_next_j - C_ij)/eps, [n]
        err = 0.0
        for s, e in tiles:
            c = _cost_tile(x, x_sq, y[s:e], y_sq[s:e])
            lse_i = torch.logsumexp((f[:, None] - c) / eps, dim=0)  # [t]
            # the second marginal of the current (f, g): exp(g_j/eps + LSE_i((f_i - C_ij)/eps))
            err += (torch.exp(g[s:e] / eps + lse_i) - 1.0 / m).abs().sum().item()
            if p == max_iterations:
                continue
            g_next[s:e] = (1.0 - w) * g[s:e] + w * (eps * log_b - eps * lse_i)
            f_parts.append(torch.logsumexp((g_next[s:e][None, :] - c) / eps, dim=1))
        error = err
        if p == max_iterations or (p >= 1 and err < threshold):
            break
        f = (1.0 - w) * f + w * (eps * log_a - eps * torch.logsumexp(torch.stack(f_parts, 1), dim=1))
        g = g_next
        done = p + 1
    return SinkhornResult(f=f, g=g, iterations=done, error=float(error), converged=bool(error < threshold),
                          cost=_transport_cost(x, x_sq, y, y_sq, f, g, eps, tiles))


def _transport_cost(x, x_sq, y, y_sq, f, g, eps, tiles) -> float:
    total = 0.0
    for s, e in tiles:
        c = _cost_tile(x, x_sq, y[s:e], y_sq[s:e])
        total += (torch.exp((f[:, None] + g[None, s:e] - c) / eps) * c).sum().item()
    return total
