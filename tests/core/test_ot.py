"""The tiled log-domain Sinkhorn (lit_ft/core/ot.py) against a dense float64 reference of the same iterations."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ft.core.ot import sinkhorn_potentials


def dense_sinkhorn(x, y, epsilon, iterations, momentum=1.0):
    """OTT-JAX's lse-mode iterations on the full cost matrix, float64 (the reference)."""
    x, y = x.double(), y.double()
    c = torch.cdist(x, y) ** 2
    n, m = c.shape
    f, g = torch.zeros(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)
    for _ in range(iterations):
        g = (1 - momentum) * g + momentum * (-epsilon * math.log(m) - epsilon * torch.logsumexp((f[:, None] - c) / epsilon, 0))
        f = (1 - momentum) * f + momentum * (-epsilon * math.log(n) - epsilon * torch.logsumexp((g[None, :] - c) / epsilon, 1))
    p = torch.exp((f[:, None] + g[None, :] - c) / epsilon)
    return f, g, (p.sum(0) - 1 / m).abs().sum().item(), (p * c).sum().item()


def clouds(n=23, m=57, d=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), \
        torch.randn(m, d, generator=gen, dtype=torch.float64) * 0.7 + 0.3


@pytest.mark.parametrize("tile_size,momentum", [(57, 1.0), (10, 1.0), (7, 1.3), (1, 1.3)])
def test_tiled_potentials_equal_the_dense_reference(tile_size, momentum):
    x, y = clouds()
    r = sinkhorn_potentials(x, y, epsilon=0.5, threshold=1e-6, max_iterations=300, momentum=momentum,
                            tile_size=tile_size)
    f, g, err, cost = dense_sinkhorn(x, y, 0.5, r.iterations, momentum)
    assert r.converged and r.iterations < 300
    torch.testing.assert_close(r.f, f, rtol=0, atol=1e-10)
    torch.testing.assert_close(r.g, g, rtol=0, atol=1e-10)
    assert r.error == pytest.approx(err, abs=1e-12) and r.error < 1e-6
    assert r.cost == pytest.approx(cost, rel=1e-10)


def test_stops_at_the_first_iteration_below_the_threshold_like_ott():
    x, y = clouds(seed=1)
    r = sinkhorn_potentials(x, y, epsilon=0.5, threshold=1e-3, max_iterations=500, tile_size=8)
    errors = [dense_sinkhorn(x, y, 0.5, k, 1.3)[2] for k in range(1, r.iterations + 1)]
    assert errors[-1] < 1e-3 and all(e >= 1e-3 for e in errors[1:-1])  # iteration 1 never stops (OTT: iteration > 0)
    capped = sinkhorn_potentials(x, y, epsilon=0.5, threshold=1e-12, max_iterations=4, tile_size=8)
    assert capped.iterations == 4 and not capped.converged
    assert capped.error == pytest.approx(dense_sinkhorn(x, y, 0.5, 4, 1.3)[2], abs=1e-12)


def test_float32_tiles_stay_close_to_float64_at_a_small_epsilon():
    x, y = clouds(n=31, m=203, d=16, seed=2)
    r64 = sinkhorn_potentials(x, y, epsilon=0.1, threshold=1e-4, max_iterations=3000, tile_size=50)
    r32 = sinkhorn_potentials(x.float(), y.float(), epsilon=0.1, threshold=1e-4, max_iterations=3000, tile_size=50)
    assert r64.converged and r32.converged
    # potentials are defined up to (f + c, g - c); compare the centred g that ranks the candidates
    g64, g32 = r64.g - r64.g.mean(), (r32.g - r32.g.mean()).double()
    assert (g64 - g32).abs().max().item() < 1e-2 * g64.abs().max().item()


@pytest.mark.parametrize("kwargs,match", [
    ({"x": torch.zeros(0, 3)}, "`x` holds no points"),
    ({"y": torch.zeros(0, 3)}, "`y` holds no points"),
    ({"y": torch.zeros(4, 2)}, "share their dimension"),
    ({"epsilon": 0.0}, "`epsilon`"),
    ({"momentum": 2.0}, "`momentum`"),
    ({"tile_size": 0}, "`tile_size`"),
])
def test_bad_inputs_name_the_argument(kwargs, match):
    args = {"x": torch.zeros(3, 3), "y": torch.zeros(4, 3), **kwargs}
    with pytest.raises(ValueError, match=match):
        sinkhorn_potentials(**args)
