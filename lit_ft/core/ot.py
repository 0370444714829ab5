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

Resume: with ``checkpoint_path`` the potentials and the iteration count are written every ``checkpoint_every``
iterations (to a temporary name, then renamed: a killed run never leaves a half-written file). A later call with
the same path continues from them; since an iteration is a deterministic function of ``(f, g)``, the result is
bit-identical to an uninterrupted solve. The file records a fingerprint of the problem (both clouds' values, dtype,
device type, every solver setting and ``tile_size``, which fixes the summation order); a file written for another
problem, or one that cannot be read, is ignored with a warning and the solve starts from zero potentials.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = ["SinkhornCheckpointWarning", "SinkhornResult", "sinkhorn_potentials"]


class SinkhornCheckpointWarning(RuntimeWarning):
    """A Sinkhorn checkpoint file was ignored (unreadable, or written for another problem)."""


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
           momentum: float, tile_size: int, checkpoint_every: int) -> None:
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
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"sinkhorn_potentials: `checkpoint_every` must be an int >= 1, got {checkpoint_every!r}")


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
    checkpoint_path: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
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
        iterations: wraps the iteration counter (a progress bar; it is given the passes still to run); None = a
            plain range.
        checkpoint_path: a file where ``(f, g, iterations)`` are saved every ``checkpoint_every`` iterations and
            from which a later call with the same problem resumes (see the module docstring); the file is left in
            place on return (remove it once the result is stored). None = no checkpoint.
        checkpoint_every: iterations between two checkpoint writes, >= 1.

    Returns:
        A :class:`SinkhornResult` (potentials in ``x``'s dtype and device).
    """
    _check(x, y, epsilon, threshold, max_iterations, momentum, tile_size, checkpoint_every)
    n, m = x.shape[0], y.shape[0]
    dtype = x.dtype
    y = y.to(dtype=dtype, device=x.device)
    x_sq, y_sq = (x * x).sum(1), (y * y).sum(1)
    log_a, log_b = -math.log(n), -math.log(m)
    f = torch.zeros(n, dtype=dtype, device=x.device)
    g = torch.zeros(m, dtype=dtype, device=x.device)
    start, problem = 0, None
    if checkpoint_path is not None:
        checkpoint_path = Path(checkpoint_path)
        problem = _problem_fingerprint(x, y, epsilon, threshold, max_iterations, momentum, tile_size)
        saved = _load_checkpoint(checkpoint_path, problem, n, m, max_iterations)
        if saved is not None:
            f, g, start = saved[0].to(x.device, dtype), saved[1].to(x.device, dtype), saved[2]
    tiles = [(s, min(s + tile_size, m)) for s in range(0, m, tile_size)]
    w, eps = float(momentum), float(epsilon)
    # pass p measures the marginal error of the iterate after p iterations while computing iteration p + 1 from
    # it; OTT stops after the first iteration (p >= 1) whose error is below the threshold, so that pass's updates are
    # discarded. The pass after the last iteration only measures.
    counter: Iterable[int] = range(start, max_iterations + 1)
    if iterations is not None:
        counter = iterations(counter)
    error, done = math.inf, start
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
        if problem is not None and done % checkpoint_every == 0:
            _save_checkpoint(checkpoint_path, problem, f, g, done)
    return SinkhornResult(f=f, g=g, iterations=done, error=float(error), converged=bool(error < threshold),
                          cost=_transport_cost(x, x_sq, y, y_sq, f, g, eps, tiles))


def _problem_fingerprint(x: torch.Tensor, y: torch.Tensor, *settings: float) -> str:
    """sha256 of both clouds' bytes, shapes, dtype, device type and the solver settings: what makes a saved iterate
    continue the very same sequence of iterations."""
    h = hashlib.sha256(repr((tuple(x.shape), tuple(y.shape), str(x.dtype), x.device.type, settings)).encode())
    for t in (x, y):
        h.update(t.detach().to(x.dtype).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_checkpoint(path: Path, problem: str, n: int, m: int,
                     max_iterations: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """``(f, g, iterations)`` saved at ``path`` for this ``problem``; None (with a warning) when the file is absent,
    unreadable or belongs to another problem: the solve then starts from zero potentials, which is always correct."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        f, g, done, owner = saved["f"], saved["g"], int(saved["iterations"]), saved["problem"]
    except Exception as e:  # noqa: BLE001 - any damage to a cache file means "start over", never a failed run
        reason = f"it cannot be read ({type(e).__name__}: {e})"
    else:
        if owner != problem:
            reason = "it was written for another problem (other points, dtype, device or solver settings)"
        elif tuple(f.shape) != (n,) or tuple(g.shape) != (m,) or not 0 <= done <= max_iterations:
            reason = f"its potentials have shapes {tuple(f.shape)} / {tuple(g.shape)} at iteration {done}"
        else:
            return f, g, done
    warnings.warn(f"sinkhorn_potentials: ignoring the checkpoint {path}: {reason}; starting from zero potentials "
                  "(it will be overwritten)", SinkhornCheckpointWarning, stacklevel=3)
    return None


def _save_checkpoint(path: Path, problem: str, f: torch.Tensor, g: torch.Tensor, done: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"f": f.detach().cpu().clone(), "g": g.detach().cpu().clone(), "iterations": torch.tensor(done),
                "problem": problem}, tmp)
    os.replace(tmp, path)


def _transport_cost(x, x_sq, y, y_sq, f, g, eps, tiles) -> float:
    total = 0.0
    for s, e in tiles:
        c = _cost_tile(x, x_sq, y[s:e], y_sq[s:e])
        total += (torch.exp((f[:, None] + g[None, s:e] - c) / eps) * c).sum().item()
    return total
