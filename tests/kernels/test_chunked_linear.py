"""Chunked fused-linear base: values and gradients vs the full-logits reference, packing, chunk bounds, errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lit_ft.kernels import chunked_linear_loss, fused_linear_token_ce
from lit_ft.kernels.chunked_linear import chunked_linear_loss_reference, default_chunk_rows

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ["forward_grad", "recompute"]


# --- chunk functions: each returns the loss SUM of its rows --------------------------------------------------------


def ce_sum(logits, labels):
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def kd_sum(logits, teacher_logits, temperature=2.0):
    """Σ_rows KL(teacher || student) at a temperature (the forward KL of distillation)."""
    teacher_logp = F.log_softmax(teacher_logits.to(logits.dtype) / temperature, dim=-1)
    student_logp = F.log_softmax(logits / temperature, dim=-1)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum()


def mse_sum(logits, teacher_logits):
    return 0.5 * (logits - teacher_logits.to(logits.dtype)).pow(2).sum()


CHUNK_FNS = {"ce": (ce_sum, "labels"), "kd": (kd_sum, "teacher_logits"), "mse": (mse_sum, "teacher_logits")}


def make_case(n=23, v=37, d=11, dtype=torch.float64, seed=0, bias=False, keep=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype).requires_grad_()
    b = (torch.randn(v, generator=g, dtype=torch.float64) * 0.1).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64).to(torch.float32) * 2
    k = torch.rand(n, generator=g) < 0.6 if keep else None
    return h, w, b, {"labels": labels, "teacher_logits": teacher}, k


def grads(loss, tensors, upstream=1.0):
    return torch.autograd.grad(loss * upstream, [t for t in tensors if t is not None])


OPTIONS = [
    dict(),
    dict(bias=True),
    dict(keep=True),
    dict(scale=0.6),
    dict(softcap=3.0),
    dict(bias=True, keep=True, scale=1.7, softcap=2.5),  # every option non-default
]


@pytest.mark.parametrize("kind", sorted(CHUNK_FNS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(o) or "plain")
@pytest.mark.parametrize("chunk_size", [1, 5, None, 1000])
def test_matches_reference_fp64(kind, mode, opts, chunk_size):
    fn, row_name = CHUNK_FNS[kind]
    h, w, b, rows, keep = make_case(bias=opts.get("bias", False), keep=opts.get("keep", False),
                                    seed=hash((kind, chunk_size)) % 1000)
    rows = {row_name: rows[row_name]}
    kw = dict(bias=b, keep=keep, logit_scale=opts.get("scale"), logit_softcap=opts.get("softcap"))
    out = chunked_linear_loss(h, w, fn, rows, chunk_size=chunk_size, mode=mode, **kw)
    ref = chunked_linear_loss_reference(h, w, fn, rows, **kw)
    assert out.shape == () and out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)
    for got, want in zip(grads(out, (h, w, b), -1.3), grads(ref, (h, w, b), -1.3)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_ce_chunk_fn_equals_fused_token_ce():
    """The CE chunk function on the base gives what the dedicated fused CE op gives (reduction='sum')."""
    h, w, b, rows, keep = make_case(bias=True, keep=True, seed=3)
    out = chunked_linear_loss(h, w, ce_sum, {"labels": rows["labels"]}, bias=b, keep=keep, logit_softcap=4.0,
                              chunk_size=4)
    ce = fused_linear_token_ce(h, w, rows["labels"], bias=b, keep=keep, reduction="sum", logit_softcap=4.0,
                               impl="torch")
    torch.testing.assert_close(out, ce, rtol=1e-11, atol=1e-11)
    for got, want in zip(grads(out, (h, w, b)), grads(ce, (h, w, b))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_keep", [False, True])
def test_gradcheck_fp64(mode, with_keep):
    h, w, b, rows, _ = make_case(n=6, v=7, d=3, bias=True, seed=5)
    keep = torch.tensor([True, False, True, True, False, True]) if with_keep else None
    teacher = rows["teacher_logits"]

    def f(hidden, weight, bias):
        return chunked_linear_loss(hidden, weight, kd_sum, {"teacher_logits": teacher}, bias=bias, keep=keep,
                                   logit_scale=0.8, logit_softcap=2.0, chunk_size=2, mode=mode)

    assert torch.autograd.gradcheck(f, (h, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", MODES)
def test_keep_packing(mode):
    """chunk_fn never sees a dropped row, and dropped rows get exactly zero gradient."""
    h, w, b, rows, keep = make_case(keep=True, seed=7)
    seen = []

    def fn(logits, labels, row_id):
        seen.append(row_id.clone())
        return ce_sum(logits, labels)

    row_ids = torch.arange(h.shape[0])
    out = chunked_linear_loss(h, w, fn, {"labels": rows["labels"], "row_id": row_ids}, keep=keep, chunk_size=3,
                              mode=mode)
    (gh,) = grads(out, (h,))
    seen_ids = torch.cat(seen)
    assert set(seen_ids.tolist()) == set(keep.nonzero().squeeze(1).tolist())
    assert not keep[seen_ids].logical_not().any()
    assert torch.all(gh[~keep] == 0)
    scored = keep & (rows["labels"] != -100)  # kept rows that CE does not ignore
    assert torch.all(gh[scored].abs().sum(1) > 0)
    ref = chunked_linear_loss_reference(h, w, ce_sum, {"labels": rows["labels"]}, keep=keep)
    torch.testing.assert_close(out, ref, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("mode", MODES)
def test_never_builds_full_logits(mode):
    h, w, _, rows, _ = make_case(n=50, seed=9)
    sizes = []

    def fn(logits, teacher_logits):
        assert logits.shape[0] <= 8, f"a [{logits.shape[0]}, V] block was built with chunk_size=8"
        sizes.append(logits.shape[0])
        return kd_sum(logits, teacher_logits)

    out = chunked_linear_loss(h, w, fn, {"teacher_logits": rows["teacher_logits"]}, chunk_size=8, mode=mode)
    grads(out, (h, w))
    per_pass = [8] * 6 + [2]
    assert sizes == per_pass * (1 if mode == "forward_grad" else 2)  # recompute runs the chunks again in backward


def test_default_chunk_size_is_memory_bounded():
    """At a large vocabulary the default chunk keeps fp32 logits blocks near 32 MB, far below [N, V]."""
    n, v, d = 600, 50_000, 8
    bound = default_chunk_rows(n, v, d)
    assert bound * v * 4 <= 32 << 20 and bound < n
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_()
    w = torch.randn(v, d, generator=g) / d**0.5
    labels = torch.randint(0, v, (n,), generator=g)
    sizes = []

    def fn(logits, labels):
        sizes.append(logits.shape[0])
        return ce_sum(logits, labels)

    out = chunked_linear_loss(h, w, fn, {"labels": labels})
    grads(out, (h,))
    assert max(sizes) == bound and sum(sizes) == n


def test_default_chunk_rows_rule():
    assert default_chunk_rows(10, 37, 11) == 10  # never more than N
    assert default_chunk_rows(0, 37, 11) == 1
    assert default_chunk_rows(100_000, 128_256, 4096) == 4096  # Liger's rule: ceil(N / ceil(V / D)) as a power of 2
    assert default_chunk_rows(8192, 49_152, 576) == (32 << 20) // (49_152 * 4)  # the ~32 MB floor


@pytest.mark.parametrize("mode", MODES)
def test_bf16_within_tolerance_of_fp64(mode):
    """|op - fp64 reference| <= |plain bf16 torch - fp64 reference| + tol, for the loss and all gradients."""
    h, w, b, rows, keep = make_case(n=64, v=96, d=32, dtype=torch.bfloat16, bias=True, keep=True, seed=13)
    rows = {"teacher_logits": rows["teacher_logits"]}
    kw = dict(keep=keep, logit_softcap=5.0)
    out = chunked_linear_loss(h, w, kd_sum, rows, bias=b, chunk_size=16, mode=mode, **kw)
    assert out.dtype == torch.float32
    op = (out, *grads(out, (h, w, b)))
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    ref = chunked_linear_loss_reference(h64, w64, kd_sum, rows, bias=b64, **kw)
    exact = (ref, *grads(ref, (h64, w64, b64)))
    native = chunked_linear_loss_reference(h, w, kd_sum, rows, bias=b, compute_dtype=torch.bfloat16, **kw)
    plain = (native, *grads(native, (h, w, b)))
    for name, got, want, base in zip(("loss", "hidden", "weight", "bias"), op, exact, plain):
        assert got.dtype == base.dtype or name == "loss"
        err = (got.double() - want).abs().max().item()
        err_plain = (base.double() - want).abs().max().item()
        assert err <= err_plain + 1e-3 * want.abs().max().item(), (name, err, err_plain)


def test_bias_gradient_accumulates_over_chunks():
    h, w, b, rows, _ = make_case(bias=True, seed=17)
    rows = {"teacher_logits": rows["teacher_logits"]}
    out = chunked_linear_loss(h, w, mse_sum, rows, bias=b, chunk_size=1)
    ref = chunked_linear_loss_reference(h, w, mse_sum, rows, bias=b)
    (gb,) = grads(out, (b,))
    (gb_ref,) = grads(ref, (b,))
    torch.testing.assert_close(gb, gb_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [0, 23])
def test_empty_keep_is_a_graph_connected_zero(mode, n):
    h, w, b, rows, _ = make_case(n=n, bias=True, seed=19)
    calls = []

    def fn(logits, labels):
        calls.append(logits.shape[0])
        return ce_sum(logits, labels)

    keep = torch.zeros(n, dtype=torch.bool)
    out = chunked_linear_loss(h, w, fn, {"labels": rows["labels"]}, bias=b, keep=keep, mode=mode)
    assert out.requires_grad and out.item() == 0.0
    gh, gw, gb = grads(out, (h, w, b))
    assert calls == []
    for g, t in ((gh, h), (gw, w), (gb, b)):
        assert g.shape == t.shape and torch.all(g == 0)


@pytest.mark.parametrize("mode", MODES)
def test_chunk_fn_may_return_zero_or_constant(mode):
    h, w, b, _, _ = make_case(bias=True, seed=21)

    def empty_selection(logits):
        return logits[logits > 1e9].sum()  # graph-connected zero

    def constant(logits):
        return torch.zeros((), dtype=logits.dtype)  # not connected at all

    for fn in (empty_selection, constant):
        out = chunked_linear_loss(h, w, fn, bias=b, chunk_size=4, mode=mode)
        assert out.item() == 0.0
        for g in grads(out, (h, w, b)):
            assert torch.isfinite(g).all() and torch.all(g == 0)


@pytest.mark.parametrize("mode", MODES)
def test_grad_output_scales_gradients(mode):
    h, w, b, rows, _ = make_case(bias=True, seed=23)
    rows = {"teacher_logits": rows["teacher_logits"]}
    unit = grads(chunked_linear_loss(h, w, kd_sum, rows, bias=b, chunk_size=5, mode=mode), (h, w, b))
    scaled = grads(chunked_linear_loss(h, w, kd_sum, rows, bias=b, chunk_size=5, mode=mode), (h, w, b), -2.5)
    for one, many in zip(unit, scaled):
        assert one.abs().max() > 0
        torch.testing.assert_close(many, -2.5 * one, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", MODES)
def test_retained_graph_second_backward_recomputes(mode):
    h, w, _, rows, _ = make_case(seed=29)
    out = chunked_linear_loss(h, w, ce_sum, {"labels": rows["labels"]}, chunk_size=6, mode=mode)
    out.backward(retain_graph=True)
    first = h.grad.clone()
    (out * 3.0).backward()
    torch.testing.assert_close(h.grad, 4.0 * first, rtol=1e-12, atol=1e-14)


def test_no_grad_and_partial_requires_grad():
    h, w, _, rows, _ = make_case(seed=31)
    rows = {"labels": rows["labels"]}
    ref = chunked_linear_loss_reference(h, w, ce_sum, rows)
    with torch.no_grad():
        out = chunked_linear_loss(h, w, ce_sum, rows, chunk_size=4)
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.detach(), rtol=1e-11, atol=1e-11)
    frozen_h = h.detach()
    out = chunked_linear_loss(frozen_h, w, ce_sum, rows, chunk_size=4)
    out.backward()
    assert frozen_h.grad is None
    torch.testing.assert_close(w.grad, grads(chunked_linear_loss_reference(frozen_h, w, ce_sum, rows), (w,))[0],
                               rtol=1e-10, atol=1e-12)


def test_double_backward_is_not_supported():
    h, w, _, rows, _ = make_case(seed=37)
    out = chunked_linear_loss(h, w, ce_sum, {"labels": rows["labels"]})
    (gh,) = torch.autograd.grad(out, h, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gh.sum(), w)


# --- errors --------------------------------------------------------------------------------------------------------


def _bad_calls():
    h, w, b, rows, _ = make_case(seed=41)
    labels = {"labels": rows["labels"]}
    return [
        ("hidden", lambda: chunked_linear_loss(h[0], w, ce_sum, labels)),
        ("weight", lambda: chunked_linear_loss(h, w[:, :3], ce_sum, labels)),
        ("weight dtype", lambda: chunked_linear_loss(h, w.float(), ce_sum, labels)),
        ("chunk_fn", lambda: chunked_linear_loss(h, w, "ce", labels)),
        (r"rows\['labels'\]", lambda: chunked_linear_loss(h, w, ce_sum, {"labels": rows["labels"][:5]})),
        (r"rows\['labels'\]", lambda: chunked_linear_loss(h, w, ce_sum, {"labels": [1, 2]})),
        ("rows", lambda: chunked_linear_loss(h, w, ce_sum, [rows["labels"]])),
        ("bias", lambda: chunked_linear_loss(h, w, ce_sum, labels, bias=torch.zeros(3, dtype=h.dtype))),
        ("keep", lambda: chunked_linear_loss(h, w, ce_sum, labels, keep=torch.ones(h.shape[0]))),
        ("logit_softcap", lambda: chunked_linear_loss(h, w, ce_sum, labels, logit_softcap=-1.0)),
        ("logit_scale", lambda: chunked_linear_loss(h, w, ce_sum, labels, logit_scale=0)),
        ("chunk_size", lambda: chunked_linear_loss(h, w, ce_sum, labels, chunk_size=0)),
        ("mode", lambda: chunked_linear_loss(h, w, ce_sum, labels, mode="fast")),
        ("chunk_fn must return a scalar",
         lambda: chunked_linear_loss(h, w, lambda logits, labels: logits.sum(0), labels)),
        ("chunk_fn must return a scalar", lambda: chunked_linear_loss(h, w, lambda logits, labels: 0.0, labels)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_errors_name_the_argument(index):
    name, call = _bad_calls()[index]
    with pytest.raises((TypeError, ValueError), match=name):
        call()


def test_public_name_is_lazy_and_triton_free():
    code = ("import sys, lit_ft.kernels\n"
            "assert 'lit_ft.kernels.chunked_linear' not in sys.modules\n"
            "from lit_ft.kernels import chunked_linear_loss\n"
            "assert callable(chunked_linear_loss) and 'triton' not in sys.modules\n")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def test_linear_grad_mask_bits_are_the_ops_constants():
    from lit_ft.kernels._common import linear_grad_mask
    from lit_ft.kernels.token_ce.torch_impl import GRAD_BIAS, GRAD_HIDDEN, GRAD_WEIGHT

    h, w, b = (torch.zeros(2, 3, requires_grad=True), torch.zeros(4, 3, requires_grad=True),
               torch.zeros(4, requires_grad=True))
    assert linear_grad_mask(h, w, b) == GRAD_HIDDEN | GRAD_WEIGHT | GRAD_BIAS
    assert linear_grad_mask(h.detach(), w, None) == GRAD_WEIGHT
    with torch.no_grad():
        assert linear_grad_mask(h, w, b) == 0
