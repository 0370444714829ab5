"""The multi-head shared-unembedding cross-entropy (CAFT's heads): one fused pass vs the stacked [K, N, V] logits."""

from __future__ import annotations

import pytest
import torch

from lit_ft.kernels.multi_head_ce import multi_head_ce, multi_head_ce_reference
from lit_ft.kernels.token_ce import _token_ce


def make_case(k=3, n=13, d=7, v=29, dtype=torch.float64, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(k, n, d, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(v, d, generator=g, dtype=dtype).requires_grad_(True)
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_(True) if bias else None
    y = torch.randint(0, v, (k, n), generator=g)
    y[torch.rand(k, n, generator=g) < 0.3] = -100  # ignored targets
    tw = torch.rand(k, n, generator=g, dtype=dtype) * 2
    keep = torch.rand(k, n, generator=g) < 0.8
    return h, w, b, y, tw, keep


@pytest.mark.parametrize("weights, keep, bias, chunk", [
    (False, False, False, None), (True, False, False, 1), (False, True, True, 5), (True, True, True, 64),
])
def test_value_and_gradients_match_the_stacked_reference_in_fp64(weights, keep, bias, chunk):
    h, w, b, y, tw, kp = make_case(bias=bias)
    scale = [0.8, 0.64 * 3, 0.0]  # a zero head: its rows add nothing
    kw = dict(token_weights=tw if weights else None, keep=kp if keep else None, bias=b)
    out = multi_head_ce(h, w, y, scale, chunk_size=chunk, **kw)
    ref = multi_head_ce_reference(h, w, y, scale, **kw)
    params = [t for t in (h, w, b) if t is not None]
    g_out = torch.autograd.grad(out.loss * 1.7, params)
    g_ref = torch.autograd.grad(ref.loss * 1.7, params)
    torch.testing.assert_close(out.loss, ref.loss)
    torch.testing.assert_close(out.per_head, ref.per_head)
    for a, r in zip(g_out, g_ref):
        torch.testing.assert_close(a, r)
    assert out.loss.dtype == torch.float64


def test_list_of_heads_and_fp32_match():
    h, w, _, y, tw, kp = make_case(dtype=torch.float32, k=2, n=9)
    a = multi_head_ce([h[0], h[1]], w, y, [1.0, 0.5], token_weights=tw, keep=kp)
    r = multi_head_ce_reference(h, w, y, [1.0, 0.5], token_weights=tw, keep=kp)
    torch.testing.assert_close(a.loss, r.loss, rtol=1e-5, atol=1e-5)


def test_gradcheck_fp64():
    h, w, b, y, tw, kp = make_case(k=2, n=5, d=3, v=7, bias=True)
    fn = lambda h, w, b: multi_head_ce(h, w, y, [0.7, 1.3], token_weights=tw, keep=kp, bias=b, chunk_size=3).loss
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_every_row_ignored_gives_a_connected_zero():
    h, w, _, y, _, _ = make_case()
    out = multi_head_ce(h, w, torch.full_like(y, -100), [1.0, 1.0, 1.0])
    out.loss.backward()
    assert float(out.loss) == 0.0 and torch.count_nonzero(h.grad) == 0


def test_opcheck_of_the_op_it_runs():
    """The op the heads go through, with the rows and weights multi_head_ce builds (K heads end to end)."""
    h, w, _, y, tw, kp = make_case(dtype=torch.float32, k=2, n=6, d=5, v=11)
    rows = h.detach().reshape(12, 5).requires_grad_(True)
    weights = (torch.tensor([0.8, 0.64])[:, None] * tw).reshape(12).float()
    torch.library.opcheck(_token_ce, (rows, w, y.reshape(12), None, weights, kp.reshape(12), None, -100, "sum", 0.0,
                                      1.0, 4, "torch", 3, "fp32"))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    h, w, _, y, tw, _ = make_case(dtype=torch.float32, k=2, n=8, d=6, v=17)
    scale = torch.tensor([0.8, 0.64], dtype=torch.float64)

    def fn(h, w):
        out = multi_head_ce(h, w, y, scale, token_weights=tw)
        return out.loss, out.per_head

    loss_c, ph_c = torch.compile(fn, fullgraph=True, backend="aot_eager")(h, w)
    g_c = torch.autograd.grad(loss_c, (h, w))
    loss_e, ph_e = fn(h, w)
    g_e = torch.autograd.grad(loss_e, (h, w))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(ph_c, ph_e)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs, match", [
    ({"targets": torch.zeros(2, 5, dtype=torch.long)}, "targets must be"),
    ({"head_scale": [1.0]}, "head_scale must hold"),
    ({"head_scale": [1.0, 2.0, float("nan")]}, "finite"),
    ({"keep": torch.ones(3, 4, dtype=torch.bool)}, "keep must be"),
])
def test_bad_inputs_are_named(kwargs, match):
    h, w, _, y, _, _ = make_case()
    args = {"targets": y, "head_scale": [1.0, 1.0, 1.0], **kwargs}
    with pytest.raises(ValueError, match=match):
        multi_head_ce(h, w, args.pop("targets"), args.pop("head_scale"), **args)
