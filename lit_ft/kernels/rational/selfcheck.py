"""Correctness self-check of the Triton safe PAU against the fp64 reference (accuracy rule), PASS/FAIL per case.

    TRITON_INTERPRET=1 python -m lit_ft.kernels.rational.selfcheck --device cpu   # Triton interpreter
    python -m lit_ft.kernels.rational.selfcheck --device cuda                     # GPU: public op, impl="triton"

Rule: |op - fp64 ref| <= |native-dtype torch - fp64 ref| + tol * max(1, |ref|) for R(x) and the gradients of
``sum(R * upstream)`` w.r.t. x, numerator and denominator. On CPU it calls ``triton_impl`` directly; on CUDA it goes
through :func:`rational`. Exit status 1 when a case fails.
"""

from __future__ import annotations

import sys
import zlib

import torch

from .._selfcheck import run_selfcheck
from .reference import rational_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def run_case(name, shape, m, n, x_dtype, coef_dtype, device, *, log=print):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    a64 = torch.randn(m + 1, generator=g, dtype=torch.float64) / (1 + torch.arange(m + 1))
    b64 = torch.randn(n, generator=g, dtype=torch.float64) / (1 + torch.arange(n))
    up = torch.randn(shape, generator=g, dtype=torch.float64)
    x64, a64, b64, up = (t.to(device) for t in (x64, a64, b64, up))

    def grads(fn, x, a, b, u):
        x, a, b = (t.detach().requires_grad_() for t in (x, a, b))
        out = fn(x, a, b)
        return (out, *torch.autograd.grad((out.to(u.dtype) * u).sum(), (x, a, b)))

    ref = grads(rational_reference, x64, a64, b64, up)
    x, a, b = x64.to(x_dtype), a64.to(coef_dtype), b64.to(coef_dtype)
    nat = grads(lambda *t: rational_reference(*t, compute_dtype=x_dtype), x, a, b, up.to(x_dtype))
    if device == "cpu":
        from . import triton_impl

        got = (triton_impl.forward(x, a, b), *triton_impl.backward(up.to(x_dtype), x, a, b))
    else:
        from . import rational

        got = grads(lambda *t: rational(*t, impl="triton"), x, a, b, up.to(x_dtype))
    ok = got[0].dtype == x_dtype and got[1].dtype == x_dtype and got[2].dtype == coef_dtype
    tol = TOL[x_dtype]
    errs = []
    for what, o, n_, rf in zip(("R", "dx", "da", "db"), got, nat, ref):
        err = (o.double() - rf).abs().max().item()
        bound = (n_.double() - rf).abs().max().item() + tol * max(1.0, rf.abs().max().item())
        errs.append(f"{what} {err:.2e}<={bound:.2e}")
        ok = ok and err <= bound
    log(("PASS " if ok else "FAIL ") + name + ": " + ", ".join(errs))
    return ok


CASES = [
    ("fp32-5-4", dict(shape=(3, 1000), m=5, n=4, x_dtype=torch.float32, coef_dtype=torch.float32)),
    ("fp32-2-5-odd-size", dict(shape=(1537,), m=2, n=5, x_dtype=torch.float32, coef_dtype=torch.float32)),
    ("bf16-x-fp32-coef", dict(shape=(7, 300), m=5, n=4, x_dtype=torch.bfloat16, coef_dtype=torch.float32)),
    ("bf16-all-0-1", dict(shape=(5, 5, 5), m=0, n=1, x_dtype=torch.bfloat16, coef_dtype=torch.bfloat16)),
]


def main(argv=None) -> int:
    return run_selfcheck(CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
