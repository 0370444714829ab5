"""Correctness self-check of the fused token CE against the fp64 reference (accuracy rule), PASS/FAIL per case.

    TRITON_INTERPRET=1 python -m lit_ft.kernels.token_ce.selfcheck --device cpu   # Triton interpreter, tiny shapes
    python -m lit_ft.kernels.token_ce.selfcheck --device cuda --real             # GPU: public op, impl="triton"

Rule (Cut-Cross-Entropy's): |op - fp64 ref| <= |native-dtype torch - fp64 ref| + tol * max(1, |ref|), for the loss
and the gradients of ``sum(loss * upstream)`` w.r.t. hidden, weight and bias; nll/entropy/lse must be within
``tol`` of the reference too. Exit status 1 when any case fails. On CPU it calls ``triton_impl.forward_backward``
directly (the "cuda" dispatch key does not exist there); on CUDA it goes through ``fused_linear_token_ce``.
"""

from __future__ import annotations

import argparse
import sys
import time
import zlib

import torch


from .reference import token_ce_reference

TOL = {torch.float32: 5e-4, torch.bfloat16: 1e-2, torch.float16: 1e-3}


def _native(h, w, y, b, tw, k, reduction, softcap, scale):
    """Unfused model code in its own dtype (the accuracy baseline)."""
    ref = token_ce_reference(h, w, y, bias=b, token_weights=tw, keep=k, reduction=reduction, logit_softcap=softcap,
                             logit_scale=scale, compute_dtype=h.dtype)
    return ref.loss


def run_case(name, n, v, d, dtype, device, *, reduction="mean", bias=False, weights=False, keep=False,
             softcap=None, scale=None, ignore_frac=0.3, all_ignored=False, chunk_size=None, accumulation="fp32",
             stale_nan=False, use_op=False, op_impl="triton", gemm=None, poison_unkept=False, log=print):
    """One case; ``gemm`` picks the CUDA path's GEMM route (``triton_impl.gemm_route``) for this case only."""
    if gemm is not None:
        import os

        previous = os.environ.get("LIT_FT_TOKEN_CE_GEMM")
        os.environ["LIT_FT_TOKEN_CE_GEMM"] = gemm
        try:
            return run_case(name, n, v, d, dtype, device, reduction=reduction, bias=bias, weights=weights,
                            keep=keep, softcap=softcap, scale=scale, ignore_frac=ignore_frac,
                            all_ignored=all_ignored, chunk_size=chunk_size, accumulation=accumulation,
                            stale_nan=stale_nan, use_op=use_op, op_impl=op_impl, poison_unkept=poison_unkept,
                            log=log)
        finally:
            if previous is None:
                os.environ.pop("LIT_FT_TOKEN_CE_GEMM")
            else:
                os.environ["LIT_FT_TOKEN_CE_GEMM"] = previous
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    h64 = torch.randn(n, d, generator=g, dtype=torch.float64)
    w64 = torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5 * 2
    b64 = torch.randn(v, generator=g, dtype=torch.float64) * 0.1 if bias else None
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    if all_ignored:
        y[:] = -100
    tw = torch.rand(n, generator=g) * 2 if weights else None
    k = torch.rand(n, generator=g) < 0.6 if keep else None
    up = torch.randn(n, generator=g, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    mv = lambda t, dt=None: None if t is None else t.to(device=device, dtype=dt or t.dtype)  # noqa: E731
    h64, w64, b64, y, tw, k, up = (mv(t) for t in (h64, w64, b64, y, tw, k, up))
    tw_op = tw  # the op's weights; poison_unkept: inf where nothing is kept, which must not reach any result
    if poison_unkept and tw is not None:
        unkept = (y == -100) if k is None else ((y == -100) | ~k)
        tw_op = tw.masked_fill(unkept, float("inf"))

    leaves64 = [t.requires_grad_() for t in (h64, w64, b64) if t is not None]
    ref = token_ce_reference(h64, w64, y, bias=b64, token_weights=tw, keep=k, reduction=reduction,
                             logit_softcap=softcap, logit_scale=scale)
    ref_g = torch.autograd.grad((ref.loss * up).sum(), leaves64)

    def lowp():
        return [None if t is None else t.detach().to(dtype).requires_grad_() for t in (h64, w64, b64)]

    hn, wn, bn = lowp()
    nat = _native(hn, wn, y, bn, tw, k, reduction, softcap, scale)
    nat_g = torch.autograd.grad((nat * up.to(nat.dtype)).sum(), [t for t in (hn, wn, bn) if t is not None])

    h, w, b = lowp()
    problems_pre = []
    from . import triton_impl

    fresh_buffer = triton_impl.new_logits_buffer
    if stale_nan:  # the reused logits buffer starts as NaN: rows past the kept count must never reach a result
        triton_impl.new_logits_buffer = lambda shape, dt, dev: torch.full(shape, float("nan"), dtype=dt, device=dev)
    t0 = time.perf_counter()
    if use_op:
        from . import fused_linear_token_ce

        out = fused_linear_token_ce(h, w, y, bias=b, token_weights=tw_op, keep=k, reduction=reduction,
                                    logit_softcap=softcap, logit_scale=scale, chunk_size=chunk_size, impl=op_impl,
                                    weight_grad_accumulation=accumulation, return_nll=True, return_entropy=True,
                                    return_lse=True)
        loss, nll, ent, lse = out
        op_g = torch.autograd.grad((loss * up.to(loss.dtype)).sum(), [t for t in (h, w, b) if t is not None])
    else:
        from .torch_impl import GRAD_BIAS, GRAD_HIDDEN, GRAD_WEIGHT

        mask = GRAD_HIDDEN | GRAD_WEIGHT | (GRAD_BIAS if b is not None else 0)
        kw = dict(ignore_index=-100, softcap=float(softcap or 0.0), scale=float(scale or 1.0),
                  chunk_size=int(chunk_size or 0), accumulation=accumulation)
        with torch.no_grad():
            loss, nll, ent, lse, gh, gw, gb = triton_impl.forward_backward(
                h, w, y, b, tw_op, k, None, reduction=reduction, grad_mask=0 if reduction == "none" else mask, **kw)
            if reduction == "none":
                _, _, _, _, gh, gw, gb = triton_impl.forward_backward(
                    h, w, y, b, tw_op, k, None, reduction="none", grad_mask=mask, grad_tokens=up.float(), **kw)
        op_g = [gh, gw] + ([gb] if b is not None else [])
        if accumulation == "input" and reduction != "none" and dtype != torch.float32:
            # proof that the mode took effect: fp32 accumulation over the same chunks gives a different dW
            with torch.no_grad():
                gw32 = triton_impl.forward_backward(h, w, y, b, tw_op, k, None, reduction=reduction, grad_mask=mask,
                                                    **{**kw, "accumulation": "fp32"})[5]
            if torch.equal(gw32, gw):
                problems_pre = ["d_weight: 'input' accumulation gave exactly the fp32-accumulated result"]
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    triton_impl.new_logits_buffer = fresh_buffer

    tol = TOL[dtype]
    problems = list(problems_pre)

    def check(what, got, nat_v, ref_v):
        got, ref_v = got.detach().double(), ref_v.detach().double()
        bound = tol * max(1.0, ref_v.abs().max().item())
        err = (got - ref_v).abs().max().item() if got.numel() else 0.0
        nat_err = (nat_v.detach().double() - ref_v).abs().max().item() if nat_v is not None and got.numel() else 0.0
        if not (err <= nat_err + bound) or not torch.isfinite(got).all():
            problems.append(f"{what}: err {err:.3g} > native {nat_err:.3g} + {bound:.3g}")
        return err

    check("loss", loss, nat, ref.loss)
    for nm, got, r in (("nll", nll, ref.nll), ("entropy", ent, ref.entropy), ("lse", lse, ref.lse)):
        check(nm, got, None, r)
    for nm, got, nv, r in zip(("d_hidden", "d_weight", "d_bias"), op_g, nat_g, ref_g):
        if got.dtype != dtype:
            problems.append(f"{nm}: dtype {got.dtype} != {dtype}")
        check(nm, got, nv, r)
    if all_ignored and (loss.abs().max() != 0 or any(g.abs().max() != 0 for g in op_g)):
        problems.append("all-ignored case is not an exact zero")
    status = "PASS" if not problems else "FAIL"
    log(f"{status} {name} [N={n} V={v} D={d} {str(dtype).replace('torch.', '')} {reduction}] {dt * 1e3:.0f} ms"
        + ("" if not problems else " :: " + "; ".join(problems)))
    return not problems


def cases(device, real):
    small = dict(n=47, v=123, d=31) if device == "cpu" else dict(n=300, v=1000, d=64)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        dn = str(dtype).replace("torch.", "")
        out += [
            (f"plain-{dn}", dict(small, dtype=dtype)),
            (f"all-options-mean-{dn}", dict(small, dtype=dtype, bias=True, weights=True, keep=True, softcap=3.0,
                                            scale=0.7, chunk_size=16)),
            (f"weights-keep-none-{dn}", dict(small, dtype=dtype, reduction="none", weights=True, keep=True,
                                             chunk_size=20)),
        ]
    out += [
        # dW summed over 3 chunks straight in bf16 (weight_grad_accumulation="input")
        ("input-accumulation-bf16", dict(small, dtype=torch.bfloat16, bias=True, weights=True, keep=True,
                                         chunk_size=16, accumulation="input")),
        ("softcap-sum-fp32", dict(small, dtype=torch.float32, reduction="sum", softcap=2.0, chunk_size=7)),
        ("all-ignored-fp32", dict(small, dtype=torch.float32, all_ignored=True, bias=True)),
        ("stale-nan-buffer-bias-keep-bf16", dict(small, dtype=torch.bfloat16, bias=True, keep=True, chunk_size=16,
                                                 stale_nan=True)),
        ("stale-nan-buffer-all-ignored-fp32", dict(small, dtype=torch.float32, all_ignored=True, bias=True,
                                                   stale_nan=True)),
    ]
    out += [
        # every row kept: the cuBLAS route's no-gather branch (gradient of hidden written in place)
        ("all-kept-bias-fp32", dict(small, dtype=torch.float32, ignore_frac=0.0, bias=True, chunk_size=16)),
        ("all-kept-weights-bf16", dict(small, dtype=torch.bfloat16, ignore_frac=0.0, weights=True, chunk_size=16)),
        ("all-kept-input-accumulation-bf16", dict(small, dtype=torch.bfloat16, ignore_frac=0.0, chunk_size=16,
                                                  accumulation="input")),
        # inf token weights at ignored / dropped rows must not reach the loss or the gradients (issue 18 item 11a)
        ("inf-weights-where-not-kept-fp32", dict(small, dtype=torch.float32, weights=True, keep=True, chunk_size=16,
                                                 poison_unkept=True)),
        ("inf-weights-where-not-kept-none-bf16", dict(small, dtype=torch.bfloat16, reduction="none", weights=True,
                                                      keep=True, chunk_size=16, poison_unkept=True)),
        ("triton-gemm-inf-weights-where-not-kept-fp32", dict(small, dtype=torch.float32, weights=True, keep=True,
                                                             chunk_size=16, poison_unkept=True, gemm="triton")),
        # the no-synchronisation route (count on the device, count-aware Triton GEMMs)
        ("triton-gemm-all-options-bf16", dict(small, dtype=torch.bfloat16, bias=True, weights=True, keep=True,
                                              softcap=3.0, scale=0.7, chunk_size=16, gemm="triton")),
        ("triton-gemm-none-fp32", dict(small, dtype=torch.float32, reduction="none", keep=True, chunk_size=20,
                                       gemm="triton")),
        ("triton-gemm-input-accumulation-bf16", dict(small, dtype=torch.bfloat16, keep=True, chunk_size=16,
                                                     accumulation="input", gemm="triton")),
        ("triton-gemm-stale-nan-bias-keep-bf16", dict(small, dtype=torch.bfloat16, bias=True, keep=True,
                                                      chunk_size=16, stale_nan=True, gemm="triton")),
    ]
    if real:
        out += [
            ("real-bf16-mean-keep", dict(n=2048, v=128256, d=4096, dtype=torch.bfloat16, weights=True, keep=True)),
            ("real-bf16-none-softcap", dict(n=2048, v=128256, d=4096, dtype=torch.bfloat16, reduction="none",
                                            softcap=30.0, weights=True)),
            ("real-fp32-mean", dict(n=1024, v=49152, d=576, dtype=torch.float32, keep=True)),
            ("real-bf16-mean-576", dict(n=8192, v=49152, d=576, dtype=torch.bfloat16, keep=True, bias=True)),
            ("real-bf16-input-accumulation", dict(n=4096, v=128256, d=4096, dtype=torch.bfloat16, keep=True,
                                                  chunk_size=1024, accumulation="input")),
            ("real-bf16-all-kept-input", dict(n=4096, v=128256, d=4096, dtype=torch.bfloat16, ignore_frac=0.0,
                                              accumulation="input")),
            ("real-bf16-triton-gemm-keep", dict(n=2048, v=128256, d=4096, dtype=torch.bfloat16, weights=True,
                                                keep=True, gemm="triton")),
        ]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--real", action="store_true", help="add real lm_head shapes (CUDA only)")
    p.add_argument("--only", default="", help="comma-separated case-name substrings")
    p.add_argument("--op-impl", default=None, help="go through fused_linear_token_ce with this impl "
                   "(default on CUDA: triton; on CPU the Triton internals are called directly)")
    args = p.parse_args(argv)
    ok = True
    for name, kw in cases(args.device, args.real):
        if args.only and not any(s in name for s in args.only.split(",")):
            continue
        try:
            use_op = args.device == "cuda" or args.op_impl is not None
            ok &= run_case(name, device=args.device, use_op=use_op, op_impl=args.op_impl or "triton", **kw)
        except Exception as e:  # report and continue
            ok = False
            print(f"FAIL {name} :: {type(e).__name__}: {e}")
        sys.stdout.flush()
    print("ALL PASS" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
