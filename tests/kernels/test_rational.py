"""Safe Padé activation unit (IAPT): torch path vs the fp64 reference, gradients around the |S| kink, the GELU
initialisation, Triton under the interpreter, custom-op plumbing, dispatch and input errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lit_ft.kernels import gelu_coefficients, rational
from lit_ft.kernels.rational import _rational, _rational_backward
from lit_ft.kernels.rational.reference import rational_reference
from tests.helpers import run_interpreted

triton_missing = subprocess.run([sys.executable, "-c", "import triton"], capture_output=True).returncode != 0


def coefs(m=5, n=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(m + 1, generator=g, dtype=torch.float64) / (1 + torch.arange(m + 1))).to(dtype)
    b = (torch.randn(n, generator=g, dtype=torch.float64) / (1 + torch.arange(n))).to(dtype)
    return a.requires_grad_(), b.requires_grad_()


def grads(out, up, tensors):
    return torch.autograd.grad((out.to(up.dtype) * up).sum(), tensors)


@pytest.mark.parametrize("m, n", [(5, 4), (2, 6), (0, 1), (3, 1)])
@pytest.mark.parametrize("shape", [(4, 7, 3), (1,), ()])
def test_torch_path_matches_reference_fp64(m, n, shape):
    a, b = coefs(m, n, seed=m * 10 + n)
    x = (torch.randn(shape, dtype=torch.float64) * 2).requires_grad_()
    out = rational(x, a, b, impl="torch")
    ref = rational_reference(x, a, b)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    up = torch.randn_like(out)
    for got, exp in zip(grads(out, up, (x, a, b)), grads(ref, up, (x, a, b))):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-11)


def test_closed_form_against_hand_computed_values():
    # P = 1 + 2x + 3x^2, S = -x + x^2 (zero at x = 0 and x = 1), x = 2: P = 17, S = 2, Q = 3, R = 17/3
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([2.0], dtype=torch.float64, requires_grad=True)
    out = rational(x, a, b, impl="torch")
    assert out.item() == pytest.approx(17 / 3)
    gx, ga, gb = torch.autograd.grad(out.sum(), (x, a, b))
    # dR/dx = (P' Q - P sign(S) S') / Q^2 = (14 * 3 - 17 * 3) / 9; dR/da_j = x^j / Q; dR/db_k = -P x^k / Q^2
    assert gx.item() == pytest.approx((14 * 3 - 17 * 3) / 9)
    torch.testing.assert_close(ga, torch.tensor([1 / 3, 2 / 3, 4 / 3], dtype=torch.float64))
    torch.testing.assert_close(gb, torch.tensor([-17 * 2 / 9, -17 * 4 / 9], dtype=torch.float64))


def test_subgradient_at_the_kink_uses_sign_zero():
    """At x = 1, S = -x + x^2 = 0 exactly: sign(S) = 0, so dR/dx = P'(1) and dR/db = 0."""
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-1.0, 1.0], dtype=torch.float64, requires_grad=True)
    x = torch.tensor([1.0, 0.0], dtype=torch.float64, requires_grad=True)
    gx, gb = torch.autograd.grad(rational(x, a, b, impl="torch").sum(), (x, b))
    torch.testing.assert_close(gx, torch.tensor([2.0 + 6.0, 2.0], dtype=torch.float64))
    assert torch.all(gb == 0)


def test_gradcheck_fp64_near_the_kink():
    """Points within 1e-4..1e-2 of the zeros of S (x = 0, 1, -2 for S = x^3 + x^2 - 2x), on both sides, plus
    generic points; all inputs (x, numerator, denominator) checked."""
    a = torch.tensor([0.1, 0.5, -0.3, 0.2, 0.05, -0.01], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-2.0, 1.0, 1.0], dtype=torch.float64, requires_grad=True)  # S = x (x - 1) (x + 2)
    near = torch.tensor([1e-2, 1e-3, 1e-4], dtype=torch.float64)
    pts = torch.cat([z + sgn * near for z in (0.0, 1.0, -2.0) for sgn in (-1, 1)] + [torch.tensor([-3.1, 0.4, 2.5],
                                                                                        dtype=torch.float64)])
    s = b[0] * pts + b[1] * pts**2 + b[2] * pts**3
    assert (s.abs() < 1e-3).sum() >= 4 and torch.all(s != 0)
    x = pts.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, a, b: rational(x, a, b, impl="torch"), (x, a, b), eps=1e-7,
                                    atol=1e-6)


def test_gelu_coefficients_approximate_gelu():
    a, b = gelu_coefficients()
    assert a.shape == (6,) and b.shape == (4,) and a.dtype == b.dtype == torch.float32
    x = torch.linspace(-3, 3, 6001)
    err = (rational(x, a, b, impl="torch") - F.gelu(x)).abs().max().item()
    assert err < 5e-3  # 3.38e-3 measured (also on [-8, 8])
    x8 = torch.linspace(-8, 8, 8001, dtype=torch.float64)
    assert (rational(x8, a.double(), b.double()) - F.gelu(x8)).abs().max() < 5e-3
    # structure: R(x) - R(-x) = x like GELU, no kink away from 0 (S > 0 for x != 0), no blow-up far away
    torch.testing.assert_close(rational(x8, a.double(), b.double()) - rational(-x8, a.double(), b.double()), x8)
    far = torch.tensor([-1e3, -50.0, 50.0, 1e3], dtype=torch.float64)
    r = rational(far, a.double(), b.double())
    assert torch.all((r - far / 2 - a[4] / b[3]).abs() < 1.0)  # R ~ x/2 + a_4/b_4 (~11) far outside
    # fresh tensors each call (callers turn them into Parameters)
    a.add_(1.0)
    assert gelu_coefficients()[0][1].item() == 0.5
    with pytest.raises(NotImplementedError, match=r"\(5, 4\).*\(3, 2\)"):
        gelu_coefficients(3, 2)


def test_low_precision_dtypes():
    a, b = coefs(dtype=torch.float32)
    x = (torch.randn(50) * 2).to(torch.bfloat16).requires_grad_()
    out = rational(x, a, b, impl="torch")
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, rational_reference(x, a, b))  # fp32 compute, one final cast
    gx, ga, gb = torch.autograd.grad(out.float().sum(), (x, a, b))
    assert gx.dtype == torch.bfloat16 and ga.dtype == gb.dtype == torch.float32
    a16, b16 = (t.detach().half() for t in (a, b))
    assert rational(x.detach().half(), a16, b16, impl="torch").dtype == torch.float16


def test_partial_requires_grad_and_saved_tensors():
    a, b = coefs()
    x = torch.randn(3, 5, dtype=torch.float64)  # no grad: only the coefficients train
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = rational(x, a, b, impl="torch")
    ga, gb = torch.autograd.grad(out.sum(), (a, b))
    ga_r, gb_r = torch.autograd.grad(rational_reference(x, a, b).sum(), (a, b))
    torch.testing.assert_close(ga, ga_r)
    torch.testing.assert_close(gb, gb_r)
    assert sorted(tuple(t.shape) for t in saved) == sorted([(3, 5), (6,), (4,)])  # x and coefficients only
    with torch.no_grad():
        assert rational(x, a, b).grad_fn is None


def test_empty_input():
    a, b = coefs()
    x = torch.empty(0, 3, dtype=torch.float64, requires_grad=True)
    out = rational(x, a, b, impl="torch")
    gx, ga, gb = torch.autograd.grad(out.sum(), (x, a, b))
    assert out.shape == (0, 3) and gx.shape == (0, 3) and torch.all(ga == 0) and torch.all(gb == 0)


@pytest.mark.slow
@pytest.mark.skipif(triton_missing, reason="triton not installed")
def test_triton_path_under_interpreter_matches_reference():
    """fp32 (5, 4) and (2, 5) with a size not a multiple of the block, bf16 x with fp32 / bf16 coefficients,
    degree (0, 1): accuracy rule vs the fp64 reference for R and the gradients of x, numerator, denominator."""
    proc = run_interpreted(["-m", "lit_ft.kernels.rational.selfcheck", "--device", "cpu"])
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ALL PASS" in proc.stdout and proc.stdout.count("PASS ") == 4


# --- custom op plumbing -------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph_aot_eager():
    torch._dynamo.reset()
    a, b = coefs(dtype=torch.float32)
    x = torch.randn(6, 9, requires_grad=True)

    def fn(x, a, b):
        return rational(x, a, b, impl="auto").square().sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, a, b)
    g_c = torch.autograd.grad(loss_c, (x, a, b))
    loss_e = fn(x, a, b)
    g_e = torch.autograd.grad(loss_e, (x, a, b))
    torch.testing.assert_close(loss_c, loss_e)
    for u, v in zip(g_c, g_e):
        torch.testing.assert_close(u, v)


def test_opcheck_custom_ops():
    a, b = coefs(dtype=torch.float32)
    x = torch.randn(4, 5, requires_grad=True)
    torch.library.opcheck(_rational, (x, a, b, "torch"))
    for need in ((True, True, True), (False, True, False), (True, False, True)):
        torch.library.opcheck(_rational_backward, (torch.randn(4, 5), x.detach(), a.detach(), b.detach(), "torch",
                                                   *need))


# --- dispatch and errors ------------------------------------------------------------------------------------------


def test_impl_triton_on_cpu_raises():
    a, b = coefs(dtype=torch.float32)
    with pytest.raises(RuntimeError, match="impl='triton'"):
        rational(torch.randn(3), a, b, impl="triton")


@pytest.mark.parametrize(
    "change, exc, match",
    [
        (dict(x=torch.ones(3, dtype=torch.int64)), TypeError, "x must be a floating tensor"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(numerator=torch.randn(2, 3)), ValueError, r"numerator must be a non-empty 1-D.*\[m\+1\]"),
        (dict(denominator=torch.randn(0)), ValueError, r"denominator must be a non-empty 1-D.*\[n\]"),
        (dict(numerator=torch.randn(6, dtype=torch.float64)), TypeError, "numerator must be float32 or x's dtype"),
        (dict(denominator=torch.randn(4, dtype=torch.bfloat16)), TypeError, "denominator must be float32"),
        (dict(x=torch.randn(3, dtype=torch.float64)), TypeError, "same dtype"),
        (dict(impl="fast"), ValueError, "impl must be one of"),
    ],
)
def test_bad_input_errors(change, exc, match):
    args = dict(x=torch.randn(3), numerator=torch.randn(6), denominator=torch.randn(4), impl="torch")
    if "x" in change and isinstance(change["x"], torch.Tensor) and change["x"].dtype == torch.float64:
        args["numerator"] = torch.randn(6, dtype=torch.float64)  # fp64 numerator, fp32 denominator
    args.update(change)
    with pytest.raises(exc, match=match):
        rational(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_path_on_cuda():
    from lit_ft.kernels.rational import selfcheck

    assert selfcheck.main(["--device", "cuda"]) == 0
    a, b = (t.detach().cuda().float().requires_grad_() for t in coefs())
    x = torch.randn(33, 70, device="cuda", requires_grad=True)
    torch.library.opcheck(_rational, (x, a, b, "triton"))
    out = torch.compile(lambda x, a, b: rational(x, a, b, impl="triton"), fullgraph=True)(x, a, b)
    out.sum().backward()
    ref = rational_reference(x.detach().double(), a.detach().double(), b.detach().double())
    assert (out.double() - ref).abs().max() < 1e-4 and torch.isfinite(a.grad).all()
