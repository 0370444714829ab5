"""Gram-difference hinge (token relation distillation): the tiled op vs the dense fp64 reference on odd sizes, tile
sizes, masks and dtypes; gradcheck; custom-op plumbing (opcheck, torch.compile); no [W, W] tensor saved; errors."""

from __future__ import annotations

import pytest
import torch

from lit_ft.kernels.gram_hinge import _gram_hinge, _gram_hinge_backward, gram_hinge, gram_hinge_reference


def make(B=3, W=37, ds=5, dt=7, seed=0, dtype=torch.float64, pad=True):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(B, W, ds, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    xt = torch.randn(B, W, dt, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    mask = torch.rand(B, W, generator=g) > 0.25 if pad else None
    if pad:
        mask[0, W // 2:] = False  # a padded tail
        mask[-1] = True  # a full row
    return xs, xt, mask


@pytest.mark.parametrize("W, tile", [(37, 8), (37, 37), (37, 512), (5, 2), (1, 1), (64, 16)])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.7])
def test_value_and_gradients_match_reference_fp64(W, tile, margin):
    xs, xt, mask = make(W=W, seed=W + tile)
    out = gram_hinge(xs, xt, margin, mask, tile=tile)
    ref = gram_hinge_reference(xs, xt, margin, mask)
    assert out.shape == (3,) and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-10)
    up = torch.randn(3, dtype=torch.float64)
    got = torch.autograd.grad((out * up).sum(), (xs, xt))
    exp = torch.autograd.grad((ref * up).sum(), (xs, xt))
    for a, b in zip(got, exp):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_hand_computed_two_tokens():
    # student: orthogonal tokens (S_s off-diagonal 0); teacher: parallel (S_t off-diagonal 1): |0 - 1| - 0.1 twice
    xs = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]], dtype=torch.float64)
    xt = torch.tensor([[[2.0], [5.0]]], dtype=torch.float64)
    assert gram_hinge(xs, xt, 0.1).item() == pytest.approx(2 * 0.9)
    assert gram_hinge(xs, xt, 1.5).item() == 0.0


def test_masked_positions_contribute_nothing_and_get_zero_gradient():
    xs, xt, mask = make(W=11)
    out = gram_hinge(xs, xt, 0.1, mask, tile=4)
    gs, gt = torch.autograd.grad(out.sum(), (xs, xt))
    assert torch.all(gs[~mask] == 0) and torch.all(gt[~mask] == 0)
    # the same as dropping the masked positions from each row
    for b in range(3):
        keep = mask[b]
        alone = gram_hinge(xs[b:b + 1, keep], xt[b:b + 1, keep], 0.1)
        torch.testing.assert_close(out[b:b + 1], alone, rtol=1e-12, atol=1e-12)


def test_gradcheck_fp64():
    xs, xt, mask = make(B=2, W=9, ds=3, dt=4, seed=3)
    assert torch.autograd.gradcheck(lambda a, b: gram_hinge(a, b, 0.1, mask, tile=4), (xs, xt), eps=1e-7, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    xs, xt, mask = make(W=29, dtype=dtype)
    out = gram_hinge(xs, xt, 0.1, mask, tile=8)
    assert out.dtype == torch.float32
    ref = gram_hinge_reference(xs, xt, 0.1, mask, dtype=torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-3)
    gs, _ = torch.autograd.grad(out.sum(), (xs, xt))
    assert gs.dtype == dtype


def test_only_student_requires_grad():
    xs, xt, mask = make(W=13)
    xt = xt.detach()
    (gs,) = torch.autograd.grad(gram_hinge(xs, xt, 0.1, mask, tile=4).sum(), (xs,))
    (ref,) = torch.autograd.grad(gram_hinge_reference(xs, xt, 0.1, mask).sum(), (xs,))
    torch.testing.assert_close(gs, ref)


def test_no_full_gram_matrix_is_saved_for_backward():
    W, tile = 96, 16
    xs, xt, _ = make(B=2, W=W, ds=4, dt=4, dtype=torch.float32, pad=False)
    sizes: list[int] = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = gram_hinge(xs, xt, 0.1, tile=tile)
    out.sum().backward()
    assert sizes and max(sizes) < W * W  # the op saves the [B, W, D] features only


def test_opcheck_custom_ops():
    xs, xt, mask = make(B=2, W=10, dtype=torch.float32)
    s, t = xs.detach().requires_grad_(), xt.detach().requires_grad_()
    torch.library.opcheck(_gram_hinge, (s, t, 0.1, 4))
    g = torch.randn(2)
    for need_s, need_t in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(_gram_hinge_backward, (g, s.detach(), t.detach(), 0.1, 4, need_s, need_t))


def test_torch_compile_fullgraph_aot_eager():
    torch._dynamo.reset()
    xs, xt, mask = make(B=2, W=21, dtype=torch.float32)
    w = torch.randn(xs.shape[-1], 6, requires_grad=True)

    def fn(x, t, w):
        return gram_hinge(torch.tanh(x @ w), t, 0.1, mask, tile=8).sum()

    eager = fn(xs, xt, w)
    ge = torch.autograd.grad(eager, (xs, w))
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(xs, xt, w)
    gc = torch.autograd.grad(compiled, (xs, w))
    torch.testing.assert_close(compiled, eager)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"margin": -0.1}, "`margin`"), ({"margin": float("nan")}, "`margin`"), ({"tile": 0}, "`tile`"),
    ({"tile": 2.0}, "`tile`"), ({"mask": torch.ones(3, 5)}, "`mask`"), ({"mask": torch.ones(3, 4, dtype=torch.bool)}, "`mask`"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    xs, xt = torch.randn(3, 5, 4), torch.randn(3, 5, 2)
    with pytest.raises(ValueError, match=match):
        gram_hinge(xs, xt, **{"margin": 0.1, **kwargs})


def test_bad_shapes():
    with pytest.raises(ValueError, match="share \\[B, W\\]"):
        gram_hinge(torch.randn(2, 5, 3), torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="`xs` must be \\[B, W, D\\]"):
        gram_hinge(torch.randn(5, 3), torch.randn(5, 3))
    with pytest.raises(TypeError, match="`xt`"):
        gram_hinge(torch.randn(2, 5, 3), torch.ones(2, 5, 3, dtype=torch.long))
