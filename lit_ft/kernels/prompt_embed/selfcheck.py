"""Correctness self-check of the Triton prompt embedding against the fp64 reference (accuracy rule), PASS/FAIL.

    TRITON_INTERPRET=1 python -m lit_ft.kernels.prompt_embed.selfcheck --device cpu   # Triton interpreter
    python -m lit_ft.kernels.prompt_embed.selfcheck --device cuda                     # GPU: public op, impl="triton"

Rule: |op - fp64 ref| <= |native-dtype torch - fp64 ref| + tol * max(1, |ref|) for the output and the gradients of
``sum(out * upstream)`` w.r.t. ``lora_a`` / ``lora_b``. On CPU it calls ``triton_impl`` directly (the "cuda"
dispatch key does not exist there); on CUDA it goes through :func:`prompt_embed`. Exit status 1 when a case fails.
"""

from __future__ import annotations

import sys
import zlib

import torch

from .._selfcheck import run_selfcheck
from .reference import prompt_embed_reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def run_case(name, b, t, v, d, s, r, w_dtype, lora_dtype, device, *, odd_positions=False, log=print):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    ids = torch.randint(0, v, (b, t), generator=g)
    pos = torch.arange(t).expand(b, t).clone()
    if odd_positions:  # left padding (negative), beyond max_length, repeated positions
        pos = torch.randint(-3, s + 3, (b, t), generator=g)
    w64 = torch.randn(v, d, generator=g, dtype=torch.float64)
    a64 = torch.randn(s, r, generator=g, dtype=torch.float64)
    b64 = torch.randn(r, d, generator=g, dtype=torch.float64) / r**0.5
    up = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    ids, pos, w64, a64, b64, up = (x.to(device) for x in (ids, pos, w64, a64, b64, up))
    scale = 0.75

    def grads(fn, w, a, bb, u):
        a, bb = a.detach().requires_grad_(), bb.detach().requires_grad_()
        out = fn(ids, w, pos, a, bb, scale)
        ga, gb = torch.autograd.grad((out.to(u.dtype) * u).sum(), (a, bb))
        return out, ga, gb

    ref = grads(prompt_embed_reference, w64, a64, b64, up)
    w, a, bb = w64.to(w_dtype), a64.to(lora_dtype), b64.to(lora_dtype)
    nat = grads(lambda *x: prompt_embed_reference(*x, compute_dtype=w_dtype), w, a, bb, up.to(w_dtype))
    if device == "cpu":
        from . import triton_impl

        out = triton_impl.forward(ids, w, pos, a, bb, scale)
        ga, gb = triton_impl.backward(up.to(w_dtype), pos, a, bb, scale)
        got = (out, ga, gb)
    else:
        from . import prompt_embed

        got = grads(lambda *x: prompt_embed(*x, impl="triton"), w, a, bb, up.to(w_dtype))
    ok = got[0].dtype == w_dtype and got[1].dtype == lora_dtype and got[2].dtype == lora_dtype
    tol = TOL[w_dtype]
    errs = []
    for what, o, n_, rf in zip(("out", "dA", "dB"), got, nat, ref):
        err = (o.double() - rf).abs().max().item()
        bound = (n_.double() - rf).abs().max().item() + tol * max(1.0, rf.abs().max().item())
        errs.append(f"{what} {err:.2e}<={bound:.2e}")
        ok = ok and err <= bound
    log(("PASS " if ok else "FAIL ") + name + ": " + ", ".join(errs))
    return ok


CASES = [
    ("fp32-arange", dict(b=3, t=9, v=40, d=24, s=12, r=4, w_dtype=torch.float32, lora_dtype=torch.float32)),
    ("fp32-odd-positions", dict(b=4, t=11, v=30, d=150, s=8, r=3, w_dtype=torch.float32,
                                lora_dtype=torch.float32, odd_positions=True)),
    ("bf16-table-fp32-lora", dict(b=2, t=8, v=50, d=40, s=8, r=5, w_dtype=torch.bfloat16,
                                  lora_dtype=torch.float32, odd_positions=True)),
    ("bf16-all", dict(b=2, t=6, v=20, d=17, s=6, r=2, w_dtype=torch.bfloat16, lora_dtype=torch.bfloat16)),
]


def main(argv=None) -> int:
    return run_selfcheck(CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
