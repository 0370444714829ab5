"""Fused linear token CE: torch path vs the fp64 reference, custom-op plumbing, dispatch and input errors."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import torch.utils._python_dispatch

from lit_ft.kernels import TokenCEOutput, fused_linear_token_ce
from lit_ft.kernels.token_ce import _token_ce, _token_ce_backward, resolve_impl, torch_impl
from lit_ft.kernels.token_ce.reference import token_ce_reference

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_case(n=47, v=123, d=31, dtype=torch.float64, seed=0, ignore_frac=0.3, bias=False, weights=False,
              keep=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    tw = torch.rand(n, generator=g, dtype=torch.float64).to(torch.float32) * 2 if weights else None
    k = torch.rand(n, generator=g) < 0.7 if keep else None
    return h, w, y, b, tw, k


def grads(loss, upstream, tensors):
    tensors = [t for t in tensors if t is not None]
    return torch.autograd.grad((loss * upstream).sum(), tensors)


OPTIONS = [
    dict(),
    dict(bias=True),
    dict(weights=True),
    dict(keep=True),
    dict(softcap=4.0),
    dict(scale=0.6),
    dict(bias=True, weights=True, keep=True, softcap=2.5, scale=1.7),  # every option non-default
]


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("chunk_size", [None, 5, 16, 64])
def test_torch_path_matches_reference_fp64(reduction, opts, chunk_size):
    h, w, y, b, tw, k = make_case(bias=opts.get("bias", False), weights=opts.get("weights", False),
                                  keep=opts.get("keep", False), seed=hash((reduction, chunk_size)) % 1000)
    kw = dict(bias=b, token_weights=tw, keep=k, reduction=reduction, logit_softcap=opts.get("softcap"),
              logit_scale=opts.get("scale"))
    out = fused_linear_token_ce(h, w, y, chunk_size=chunk_size, impl="torch", return_nll=True, return_entropy=True,
                                return_lse=True, **kw)
    ref = token_ce_reference(h, w, y, **kw)
    assert isinstance(out, TokenCEOutput)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-10, atol=1e-10)
    for name in ("nll", "entropy", "lse"):
        got = getattr(out, name)
        assert not got.requires_grad
        torch.testing.assert_close(got, getattr(ref, name), rtol=1e-10, atol=1e-10)
    up = torch.randn_like(out.loss)
    for a, c in zip(grads(out.loss, up, (h, w, b)), grads(ref.loss, up, (h, w, b))):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
def test_torch_path_multi_row_blocks(monkeypatch, dtype, opts):
    """At real vocabularies a chunk's softmax runs in several cache-sized row blocks (the tiny test vocabularies
    fit one block): force 3-row blocks, with a chunk size (16) they do not divide, and compare with the reference."""
    monkeypatch.setattr(torch_impl, "SOFTMAX_BLOCK_ELEMENTS", 3 * 123)
    h, w, y, b, tw, k = make_case(bias=opts.get("bias", False), weights=opts.get("weights", False),
                                  keep=opts.get("keep", False), seed=11, dtype=dtype)
    kw = dict(bias=b, token_weights=tw, keep=k, logit_softcap=opts.get("softcap"), logit_scale=opts.get("scale"))
    out = fused_linear_token_ce(h, w, y, chunk_size=16, impl="torch", return_nll=True, return_entropy=True,
                                return_lse=True, **kw)
    h64, w64, b64 = (None if t is None else t.detach().double().requires_grad_() for t in (h, w, b))
    ref = token_ce_reference(h64, w64, y, **{**kw, "bias": b64})
    def close(got, want):  # bf16: error relative to the largest reference magnitude (bf16 has ~3 digits)
        rel = 1e-9 if dtype == torch.float64 else 1e-2
        torch.testing.assert_close(got.double(), want, rtol=rel, atol=rel * want.abs().max().item())

    close(out.loss, ref.loss)
    for name in ("nll", "entropy", "lse"):
        close(getattr(out, name), getattr(ref, name))
    for a, c in zip(grads(out.loss, 1.0, (h, w, b)), grads(ref.loss, 1.0, (h64, w64, b64))):
        close(a, c)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_fp64(reduction):
    h, w, y, b, tw, k = make_case(n=9, v=13, d=5, bias=True, weights=True, keep=True, seed=3)
    y[0] = 4  # at least one kept token with a label
    k[0] = True

    def fn(h, w, b):
        return fused_linear_token_ce(h, w, y, bias=b, token_weights=tw, keep=k, reduction=reduction,
                                     logit_softcap=3.0, logit_scale=1.3, chunk_size=4, impl="torch")

    assert torch.autograd.gradcheck(fn, (h, w, b), eps=1e-6, atol=1e-7)


def test_reduction_none_exact_for_any_upstream_gradient():
    """Liger #968: per-token upstream grads × token weights must be folded into dlogits before the projection."""
    h, w, y, b, tw, k = make_case(weights=True, keep=True, seed=7)
    out = fused_linear_token_ce(h, w, y, token_weights=tw, keep=k, reduction="none", chunk_size=8, impl="torch")
    ref = token_ce_reference(h, w, y, token_weights=tw, keep=k, reduction="none")
    up = torch.randn(h.shape[0], dtype=torch.float64) * (torch.rand(h.shape[0]) > 0.5)
    for a, c in zip(grads(out, up, (h, w)), grads(ref.loss, up, (h, w))):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)


def test_mean_divides_by_kept_count_not_weight_sum_and_normalizer():
    h, w, y, _, tw, k = make_case(weights=True, keep=True, seed=11)
    kept = (y != -100) & k
    nll = token_ce_reference(h, w, y, keep=k, reduction="none").loss
    expected = (tw.double() * nll).sum() / kept.sum()
    got = fused_linear_token_ce(h, w, y, token_weights=tw, keep=k, impl="torch")
    torch.testing.assert_close(got, expected)
    norm = torch.tensor(1000.0)
    got = fused_linear_token_ce(h, w, y, token_weights=tw, keep=k, normalizer=norm, impl="torch")
    torch.testing.assert_close(got, (tw.double() * nll).sum() / 1000.0)
    ref = token_ce_reference(h, w, y, token_weights=tw, keep=k, normalizer=norm)
    for a, c in zip(grads(got, 1.0, (h, w)), grads(ref.loss, 1.0, (h, w))):
        torch.testing.assert_close(a, c)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("how", ["ignore_index", "keep"])
def test_all_ignored_is_graph_connected_zero(reduction, how):
    h, w, y, b, _, _ = make_case(n=12, bias=True, ignore_frac=0.0)
    keep = None
    if how == "ignore_index":
        y[:] = -100
    else:
        keep = torch.zeros(12, dtype=torch.bool)
    out = fused_linear_token_ce(h, w, y, bias=b, keep=keep, reduction=reduction, impl="torch", return_nll=True)
    assert torch.all(out.loss == 0) and torch.all(out.nll == 0)
    assert out.loss.requires_grad and out.loss.grad_fn is not None
    gh, gw, gb = torch.autograd.grad(out.loss.sum(), (h, w, b))
    for g in (gh, gw, gb):
        assert torch.all(g == 0) and torch.isfinite(g).all()


def test_custom_ignore_index_and_int32_labels():
    h, w, y, _, _, _ = make_case(ignore_frac=0.0)
    y = y.to(torch.int32)
    y[::3] = 7
    got = fused_linear_token_ce(h, w, y, ignore_index=7, impl="torch")
    ref = token_ce_reference(h, w, y.long(), ignore_index=7)
    torch.testing.assert_close(got, ref.loss)


def test_no_grad_and_frozen_weight():
    h, w, y, _, _, _ = make_case()
    with torch.no_grad():
        loss = fused_linear_token_ce(h, w, y, impl="torch")
    assert loss.grad_fn is None
    w_frozen = w.detach()
    loss = fused_linear_token_ce(h, w_frozen, y, impl="torch")
    (gh,) = torch.autograd.grad(loss, (h,))
    (ref_gh,) = torch.autograd.grad(token_ce_reference(h, w_frozen, y).loss, (h,))
    torch.testing.assert_close(gh, ref_gh)


def test_returns_plain_tensor_without_flags_and_none_for_unrequested():
    h, w, y, _, _, _ = make_case()
    assert isinstance(fused_linear_token_ce(h, w, y, impl="torch"), torch.Tensor)
    out = fused_linear_token_ce(h, w, y, impl="torch", return_entropy=True)
    assert out.nll is None and out.lse is None and out.entropy.shape == (h.shape[0],)


# --- accuracy rule: |op - fp64 ref| <= |native-dtype torch - fp64 ref| + tol ------------------------------------

TOL = {torch.float32: 5e-4, torch.bfloat16: 1e-2}


def native_loss(h, w, y, tw, reduction):
    """What an unfused model computes in its own dtype."""
    logits = h @ w.T
    per = F.cross_entropy(logits, y, reduction="none", ignore_index=-100)
    if tw is not None:
        per = per * tw.to(per.dtype)
    if reduction == "none":
        return per
    kept = (y != -100).sum().clamp(min=1)
    return per.sum() if reduction == "sum" else per.sum() / kept


@pytest.mark.parametrize("accumulation", ["fp32", "input"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_accuracy_rule_vs_native_dtype(dtype, reduction, accumulation):
    h64, w64, y, _, tw, _ = make_case(n=64, v=500, d=64, weights=True, seed=5)
    h64, w64 = (h64.detach() * 2).requires_grad_(), (w64.detach() * 2).requires_grad_()
    ref = token_ce_reference(h64, w64, y, token_weights=tw, reduction=reduction).loss
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=ref.dtype)
    ref_g = grads(ref, up, (h64, w64))
    h, w = h64.detach().to(dtype).requires_grad_(), w64.detach().to(dtype).requires_grad_()
    op = fused_linear_token_ce(h, w, y, token_weights=tw, reduction=reduction, chunk_size=16, impl="torch",
                               weight_grad_accumulation=accumulation)
    op_g = grads(op, up.to(op.dtype), (h, w))
    hn, wn = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    nat = native_loss(hn, wn, y, tw, reduction)
    nat_g = grads(nat, up.to(nat.dtype), (hn, wn))
    # tol is relative to the largest reference magnitude (sums over many tokens are large)
    tol = TOL[dtype]
    assert (op.double() - ref).abs().max() <= (nat.double() - ref).abs().max() + tol * ref.abs().max().clamp(min=1)
    for a, n_, r in zip(op_g, nat_g, ref_g):
        assert a.dtype == dtype
        assert (a.double() - r).abs().max() <= (n_.double() - r).abs().max() + tol * r.abs().max().clamp(min=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_grad_accumulation_modes(dtype):
    """'input' sums dW over chunks in the weight's dtype: bit-identical to 'fp32' for fp32 inputs; for bf16 the
    loss and d_hidden are identical (only dW's summation differs) and dW stays close to the fp32-accumulated one."""
    h64, w64, y, b64, tw, k = make_case(n=64, v=300, d=48, bias=True, weights=True, keep=True, seed=8)

    def run(accumulation):
        h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h64, w64, b64))
        loss = fused_linear_token_ce(h, w, y, bias=b, token_weights=tw, keep=k, chunk_size=8, impl="torch",
                                     weight_grad_accumulation=accumulation)
        loss.backward()
        return loss, h.grad, w.grad, b.grad

    base, lean = run("fp32"), run("input")
    assert all(t.dtype == dtype for t in lean[1:])
    torch.testing.assert_close(lean[0], base[0], rtol=0, atol=0)
    torch.testing.assert_close(lean[1], base[1], rtol=0, atol=0)
    torch.testing.assert_close(lean[3], base[3], rtol=0, atol=0)
    if dtype == torch.float32:
        torch.testing.assert_close(lean[2], base[2], rtol=0, atol=0)
    else:  # 8 chunks of bf16 partial sums: a few bf16 ulps apart, not equal
        assert not torch.equal(lean[2], base[2])
        torch.testing.assert_close(lean[2].float(), base[2].float(), rtol=0,
                                   atol=2e-2 * base[2].abs().max().item())


class _LargeAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records ops that return a new tensor with at least ``numel`` elements (in-place ops and views excluded)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not name.endswith("_") and not func.is_view:
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.numel() >= self.numel:
                    self.seen.append(name)
        return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_backward_allocates_no_weight_sized_tensor(reduction):
    """The lm_head gradient computed in forward is handed to backward and scaled in place: no [V, D] product and no
    zero gradients materialised for the op's unused outputs (each was a whole extra lm_head-sized tensor)."""
    h, w, y, b, tw, k = make_case(n=40, v=300, d=16, dtype=torch.float32, bias=True, weights=True, keep=True)
    loss = fused_linear_token_ce(h, w, y, bias=b, token_weights=tw, keep=k, reduction=reduction, impl="torch")
    mode = _LargeAllocations(w.numel())
    with mode:
        (loss * 0.5).backward()
    assert mode.seen == []
    ref = token_ce_reference(h, w, y, bias=b, token_weights=tw, keep=k, reduction=reduction).loss
    want = torch.autograd.grad(ref * 0.5, (h, w, b))
    for got, exp in zip((h.grad, w.grad, b.grad), want):
        torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_second_backward_through_retained_graph_recomputes(reduction):
    """The first backward hands over the forward-computed gradients; a second one (retain_graph=True, another
    upstream gradient) recomputes them from the saved inputs, normalizer and keep mask included."""
    h, w, y, b, tw, k = make_case(bias=True, weights=True, keep=True, seed=4)
    norm = torch.tensor(13.0, dtype=torch.float64) if reduction == "mean" else None
    kw = dict(bias=b, token_weights=tw, keep=k, reduction=reduction, normalizer=norm, logit_softcap=3.0)
    loss = fused_linear_token_ce(h, w, y, chunk_size=8, impl="torch", **kw)
    first = torch.autograd.grad(loss * 2.0, (h, w, b), retain_graph=True)
    second = torch.autograd.grad(loss * -0.5, (h, w, b))
    ref = token_ce_reference(h, w, y, **kw).loss
    for a, c, r in zip(first, second, torch.autograd.grad(ref, (h, w, b))):
        torch.testing.assert_close(a, 2.0 * r, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(c, -0.5 * r, rtol=1e-9, atol=1e-12)


# --- custom op plumbing -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile_fullgraph_aot_eager(reduction):
    torch._dynamo.reset()
    h, w, y, b, tw, k = make_case(n=16, v=37, d=8, dtype=torch.float32, bias=True, weights=True, keep=True)
    norm = torch.tensor(9.0)

    def fn(h, w, b):
        out = fused_linear_token_ce(h, w, y, bias=b, token_weights=tw, keep=k, reduction=reduction,
                                    normalizer=norm, logit_softcap=3.0, return_nll=True, impl="auto")
        return out.loss.sum(), out.nll

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss_c, nll_c = compiled(h, w, b)
    g_c = torch.autograd.grad(loss_c, (h, w, b))
    loss_e, nll_e = fn(h, w, b)
    g_e = torch.autograd.grad(loss_e, (h, w, b))
    torch.testing.assert_close(loss_c, loss_e)
    torch.testing.assert_close(nll_c, nll_e)
    for a, c in zip(g_c, g_e):
        torch.testing.assert_close(a, c)


def test_opcheck_custom_ops():
    h, w, y, b, tw, k = make_case(n=10, v=19, d=6, dtype=torch.float32, bias=True, weights=True, keep=True)
    for reduction, mask, norm in (("mean", 7, torch.tensor(5.0)), ("sum", 1, None), ("none", 0, None)):
        for accumulation in ("fp32", "input"):
            torch.library.opcheck(_token_ce, (h, w, y, b, tw, k, norm, -100, reduction, 2.0, 1.5, 4, "torch", mask,
                                              accumulation))
    torch.library.opcheck(
        _token_ce_backward,
        (torch.randn(10), h.detach(), w.detach(), y, b.detach(), tw, k, -100, 0.0, 1.0, 3, "torch", 7, "fp32"),
    )


def test_import_does_not_import_triton():
    code = "import sys, lit_ft, lit_ft.kernels; lit_ft.fused_linear_token_ce; assert 'triton' not in sys.modules"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


# --- dispatch and errors ------------------------------------------------------------------------------------------


def test_dispatch_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("LIT_FT_IMPL", raising=False)
    assert resolve_impl("auto", cpu) == "torch"
    assert resolve_impl("torch", cpu) == "torch"
    with pytest.raises(RuntimeError, match="impl='triton'.*CUDA"):
        resolve_impl("triton", cpu)
    monkeypatch.setenv("LIT_FT_IMPL", "torch")
    assert resolve_impl("auto", cpu) == "torch"
    monkeypatch.setenv("LIT_FT_IMPL", "triton")
    with pytest.raises(RuntimeError, match="cannot run"):
        resolve_impl("auto", cpu)
    monkeypatch.setenv("LIT_FT_IMPL", "fast")
    with pytest.raises(ValueError, match="LIT_FT_IMPL"):
        resolve_impl("auto", cpu)


def test_impl_triton_on_cpu_raises():
    h, w, y, _, _, _ = make_case(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="impl='triton'"):
        fused_linear_token_ce(h, w, y, impl="triton")


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(hidden=torch.randn(2, 3, 31)), ValueError, "hidden must be 2-D"),
        (dict(hidden=torch.ones(47, 31, dtype=torch.int64)), TypeError, "hidden must have dtype"),
        (dict(weight=torch.randn(123, 30)), ValueError, "weight must be \\[V, D\\] with D=31"),
        (dict(weight=torch.randn(123, 31, dtype=torch.float64)), TypeError, "weight dtype"),
        (dict(labels=torch.zeros(47)), TypeError, "labels must have dtype"),
        (dict(labels=torch.zeros(46, dtype=torch.long)), ValueError, "labels must have shape"),
        (dict(bias=torch.zeros(5)), ValueError, "bias must have shape"),
        (dict(token_weights=torch.ones(3)), ValueError, "token_weights must have shape"),
        (dict(keep=torch.ones(47)), TypeError, "keep must have dtype"),
        (dict(reduction="avg"), ValueError, "reduction must be one of .*'avg'"),
        (dict(impl="cuda"), ValueError, "impl must be one of .*'cuda'"),
        (dict(chunk_size=0), ValueError, "chunk_size must be None or an int > 0, got 0"),
        (dict(weight_grad_accumulation="bf16"), ValueError,
         r"weight_grad_accumulation must be one of \('fp32', 'input'\), got 'bf16'"),
        (dict(logit_softcap=-1.0), ValueError, "logit_softcap"),
        (dict(logit_scale=0.0), ValueError, "logit_scale"),
        (dict(normalizer=3.0), TypeError, "normalizer must be a 0-dim tensor"),
    ],
)
def test_bad_input_errors(change, exc, match):
    args = dict(hidden=torch.randn(47, 31), weight=torch.randn(123, 31), labels=torch.zeros(47, dtype=torch.long))
    kwargs = {"impl": "torch", **{k: v for k, v in change.items() if k not in args}}
    args.update({k: v for k, v in change.items() if k in args})
    with pytest.raises(exc, match=match):
        fused_linear_token_ce(args["hidden"], args["weight"], args["labels"], **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype, reduction", list(itertools.product([torch.float32, torch.bfloat16],
                                                                    ["mean", "none"])))
def test_cuda_paths_match_reference(dtype, reduction):
    h, w, y, b, tw, k = make_case(n=300, v=1000, d=64, bias=True, weights=True, keep=True)
    h, w, b = (t.detach().to("cuda", dtype).requires_grad_() for t in (h, w, b))
    y, tw, k = y.cuda(), tw.cuda(), k.cuda()
    kw = dict(bias=b, token_weights=tw, keep=k, reduction=reduction, logit_softcap=20.0)
    ref = token_ce_reference(h.double(), w.double(), y, **{**kw, "bias": b.double()}).loss
    for impl in ("torch", "auto"):
        out = fused_linear_token_ce(h, w, y, impl=impl, **kw)
        assert (out.double() - ref).abs().max() < (5e-2 if dtype == torch.bfloat16 else 1e-3)


def test_flop_counter_counts_the_fused_op():
    """FlopCounterMode sees the lm_head matmuls inside the op (forward + dX + dW over kept tokens only)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lit_ft.kernels import fused_linear_token_ce
    from lit_ft.kernels.token_ce.flops import register

    register()  # automatic once Lightning / lit_ft.modules is imported; explicit for a bare lit_ft.kernels user
    n, d, v = 12, 8, 30
    h = torch.randn(n, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    y = torch.randint(0, v, (n,))
    keep = torch.arange(n) % 3 != 0  # 8 kept
    with FlopCounterMode(display=False) as fc:
        fused_linear_token_ce(h, w, y, keep=keep, impl="torch").backward()
    assert fc.get_total_flops() == 3 * 2 * 8 * d * v
