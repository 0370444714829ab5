"""Correctness self-check of the Triton token-row ops against the reference (exact: they only copy rows), PASS/FAIL.

    TRITON_INTERPRET=1 python -m lit_ft.kernels.token_rows.selfcheck --device cpu   # Triton interpreter
    python -m lit_ft.kernels.token_rows.selfcheck --device cuda                     # GPU: public ops, impl="triton"

Per case: ``gather_rows`` and ``merge_rows`` outputs and the gradients of ``sum(gather * up_g)`` (w.r.t. ``x``) and
``sum(merge * up_m)`` (w.r.t. ``base`` and ``rows``) must equal the reference's bit for bit. On CPU it calls
``triton_impl`` directly (the "cuda" dispatch key does not exist there; the backward ops are ``scatter_rows`` and
``zero_rows`` + ``gather_rows``); on CUDA it goes through the public ops. Exit status 1 when a case fails.
"""

from __future__ import annotations

import sys
import zlib

import torch

from .._selfcheck import run_selfcheck
from .reference import gather_rows_reference, merge_rows_reference


def make_index(b: int, t: int, k: int, g: torch.Generator, sort: bool) -> torch.Tensor:
    """``[B, k]`` distinct positions per row (sorted = LeMo's order-preserving selection)."""
    idx = torch.stack([torch.randperm(t, generator=g)[:k] for _ in range(b)])
    return idx.sort(dim=1).values if sort else idx


def run_case(name, b, t, k, d, dtype, device, *, sort=True, strided=False, int32=False, log=print):
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    idx = make_index(b, t, k, g, sort)
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64).to(dtype)
    if strided:  # a non-contiguous [B, T, D] view (D is the slowest axis)
        x = x.transpose(0, 2).contiguous().transpose(0, 2)
    rows = torch.randn(b, k, d, generator=g, dtype=torch.float64).to(dtype)
    up_g = torch.randn(b, k, d, generator=g, dtype=torch.float64).to(dtype)
    up_m = torch.randn(b, t, d, generator=g, dtype=torch.float64).to(dtype)
    idx = idx.int() if int32 else idx
    x, idx, rows, up_g, up_m = (z.to(device) for z in (x, idx, rows, up_g, up_m))

    def run(gather, merge):
        xx, rr = x.detach().requires_grad_(), rows.detach().requires_grad_()
        go, mo = gather(xx, idx), merge(xx, rr, idx)
        (gx,) = torch.autograd.grad(go, xx, up_g)
        gb, gr = torch.autograd.grad(mo, (xx, rr), up_m)
        return go, mo, gx, gb, gr

    ref = run(gather_rows_reference, merge_rows_reference)
    if device == "cpu":
        from . import triton_impl as ti

        got = (ti.gather_rows(x, idx), ti.merge_rows(x, rows, idx), ti.scatter_rows(up_g, idx, t),
               ti.zero_rows(up_m, idx), ti.gather_rows(up_m, idx))
    else:
        from . import gather_rows, merge_rows

        got = run(lambda *a: gather_rows(*a, impl="triton"), lambda *a: merge_rows(*a, impl="triton"))
    checks = []
    for what, o, r in zip(("gather", "merge", "dx", "dbase", "drows"), got, ref):
        checks.append((what, o.dtype == r.dtype and o.shape == r.shape and torch.equal(o, r)))
    ok = all(c for _, c in checks)
    log(("PASS " if ok else "FAIL ") + name + ": " + ", ".join(f"{w} {'ok' if c else 'DIFF'}" for w, c in checks))
    return ok


CASES = [
    ("fp32", dict(b=3, t=11, k=5, d=24, dtype=torch.float32)),
    ("fp32-unsorted-int32-strided", dict(b=2, t=9, k=6, d=40, dtype=torch.float32, sort=False, int32=True,
                                         strided=True)),
    ("bf16-d-beyond-one-tile", dict(b=2, t=5, k=2, d=1100, dtype=torch.bfloat16)),
    ("fp16-all-kept", dict(b=2, t=6, k=6, d=17, dtype=torch.float16)),
    ("fp64-none-kept", dict(b=2, t=4, k=0, d=8, dtype=torch.float64)),
]


def main(argv=None) -> int:
    return run_selfcheck(CASES, run_case, argv)


if __name__ == "__main__":
    sys.exit(main())
