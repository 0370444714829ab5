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


# -- resume: the iterate checkpointed, an interrupted solve continued bit for bit --------------------------------------
def stop_after(passes: int):
    """An ``iterations`` wrapper that interrupts the solve (KeyboardInterrupt) before its ``passes``-th pass."""
    def wrap(counter):
        for i, p in enumerate(counter):
            if i == passes:
                raise KeyboardInterrupt
            yield p
    return wrap


def recording(seen: list):
    def wrap(counter):
        for p in counter:
            seen.append(p)
            yield p
    return wrap


SOLVE = dict(epsilon=0.5, threshold=1e-6, max_iterations=300)


def assert_same_result(a, b):
    assert torch.equal(a.f, b.f) and torch.equal(a.g, b.g)  # bit for bit, not close
    assert (a.iterations, a.error, a.converged, a.cost) == (b.iterations, b.error, b.converged, b.cost)


@pytest.mark.parametrize("dtype,tile_size,momentum,passes,every", [
    (torch.float64, 7, 1.3, 23, 5),   # 33 iterations; interrupted after 23, the file holds iteration 20
    (torch.float32, 57, 1.0, 40, 3),  # 65 iterations; the file holds iteration 39
    (torch.float32, 10, 1.3, 7, 1),
])
def test_an_interrupted_solve_resumes_to_the_uninterrupted_result(tmp_path, dtype, tile_size, momentum, passes,
                                                                  every):
    x, y = (t.to(dtype) for t in clouds())
    kw = dict(SOLVE, momentum=momentum, tile_size=tile_size)
    whole = sinkhorn_potentials(x, y, **kw)
    assert whole.iterations > passes
    ckpt = tmp_path / "ot" / "key.sinkhorn.pt"
    with pytest.raises(KeyboardInterrupt):
        sinkhorn_potentials(x, y, **kw, iterations=stop_after(passes), checkpoint_path=ckpt, checkpoint_every=every)
    saved = torch.load(ckpt, weights_only=True)
    assert int(saved["iterations"]) == passes // every * every and saved["g"].dtype == dtype
    seen: list[int] = []
    resumed = sinkhorn_potentials(x, y, **kw, iterations=recording(seen), checkpoint_path=ckpt,
                                  checkpoint_every=every)
    assert seen[0] == passes // every * every  # continued from the saved iterate, not from zero
    assert_same_result(resumed, whole)
    assert not list(tmp_path.rglob("*.tmp"))  # written atomically: no temporary file left behind


def test_a_finished_solve_resumed_from_its_checkpoint_runs_no_iteration(tmp_path):
    x, y = clouds()
    ckpt = tmp_path / "s.pt"
    whole = sinkhorn_potentials(x, y, **SOLVE, tile_size=8, checkpoint_path=ckpt, checkpoint_every=1)
    seen: list[int] = []
    again = sinkhorn_potentials(x, y, **SOLVE, tile_size=8, iterations=recording(seen), checkpoint_path=ckpt)
    assert seen == [whole.iterations]  # one pass: it measures the saved iterate's error and stops
    assert_same_result(again, whole)


@pytest.mark.parametrize("change", ["points", "epsilon", "tile_size", "dtype"])
def test_a_checkpoint_of_another_problem_is_ignored_with_a_warning(tmp_path, change):
    from lit_ft.core.ot import SinkhornCheckpointWarning

    x, y = clouds()
    ckpt = tmp_path / "s.pt"
    with pytest.raises(KeyboardInterrupt):
        sinkhorn_potentials(x, y, **SOLVE, tile_size=8, iterations=stop_after(12), checkpoint_path=ckpt,
                            checkpoint_every=4)
    kw = dict(SOLVE, tile_size=8)
    if change == "points":
        y = y.clone()
        y[3, 1] += 1e-9
    elif change == "epsilon":
        kw["epsilon"] = 0.6
    elif change == "tile_size":
        kw["tile_size"] = 9  # another summation order: the saved iterate would not continue the same sequence
    else:
        x, y = x.float(), y.float()
    seen: list[int] = []
    with pytest.warns(SinkhornCheckpointWarning, match="another problem.*starting from zero potentials"):
        got = sinkhorn_potentials(x, y, **kw, iterations=recording(seen), checkpoint_path=ckpt, checkpoint_every=4)
    assert seen[0] == 0
    assert_same_result(got, sinkhorn_potentials(x, y, **kw))


def test_an_unreadable_checkpoint_is_ignored_with_a_warning(tmp_path):
    from lit_ft.core.ot import SinkhornCheckpointWarning

    x, y = clouds()
    ckpt = tmp_path / "s.pt"
    ckpt.write_bytes(b"not a torch file")
    with pytest.warns(SinkhornCheckpointWarning, match="cannot be read"):
        got = sinkhorn_potentials(x, y, **SOLVE, tile_size=8, checkpoint_path=ckpt, checkpoint_every=4)
    assert_same_result(got, sinkhorn_potentials(x, y, **SOLVE, tile_size=8))
    assert int(torch.load(ckpt, weights_only=True)["iterations"]) > 0  # overwritten by this solve's iterate
    torch.save({"f": torch.zeros(2)}, ckpt)  # readable, but not a checkpoint
    with pytest.warns(SinkhornCheckpointWarning, match="cannot be read.*KeyError"):
        sinkhorn_potentials(x, y, **SOLVE, tile_size=8, checkpoint_path=ckpt)


@pytest.mark.parametrize("value", [0, 2.5, True])
def test_checkpoint_every_must_be_a_positive_int(tmp_path, value):
    with pytest.raises(ValueError, match=r"`checkpoint_every` must be an int >= 1"):
        sinkhorn_potentials(torch.zeros(3, 3), torch.zeros(4, 3), checkpoint_path=tmp_path / "s.pt",
                            checkpoint_every=value)
