"""Peer benchmark of the fused linear token CE: lit-ft vs what a user would pick instead (forward + backward).

Every (method, shape, N, dtype) runs in a **fresh process** (peak memory is that process's own), which measures all
requested kept fractions: ``warmup`` steps, then the median of ``repeats`` timed steps. Peak memory = CUDA
allocator peak (``max_memory_allocated``) over the step on a GPU; on CPU the peak RSS increase (reset through
``/proc/self/clear_refs``). The step is ``loss.backward()`` with both ``hidden`` and the lm_head ``weight`` requiring
grad, mean reduction. ``keep`` = kept fraction: lit-ft gets a ``keep`` mask (dropped tokens skip the matmuls), the
peers get those labels set to -100 (what they support).

Methods (peers are optional: ``pip install 'lit-ft[bench]'``; a missing one is reported and skipped):

* ``naive``: ``hidden @ W.T`` then ``F.cross_entropy`` (the logits in the input dtype).
* ``ours``: ``lit_ft.kernels.fused_linear_token_ce`` with its defaults; ``ours-input``: with
  ``weight_grad_accumulation="input"`` (the lm_head gradient summed in its own dtype, as Liger does by default).
  Options after ``:`` (e.g. ``ours-input:chunk=512:gemm=triton``): ``chunk`` (chunk_size), ``gemm`` (CUDA GEMM route,
  ``LIT_FT_TOKEN_CE_GEMM``), ``row`` (CUDA row-kernel ``BLOCK_V,warps``).
* ``cce``: Cut-Cross-Entropy ``linear_cross_entropy`` (CUDA: its ``cce`` kernel; CPU: ``impl="torch_compile"``).
* ``liger`` / ``liger32`` (CUDA): Liger-Kernel's fused linear CE, default bf16 / fp32 weight-gradient accumulation.
* ``torchtune``: torchtune's ``CEWithChunkedOutputLoss`` on 8 chunked logits (as its models emit them).

    python benchmarks/token_ce.py --methods naive,ours,ours-input,cce,torchtune --dtype fp32,bf16 \\
        --shapes 576x49152 --n 8192 --keep 1.0,0.6,0.3 --warmup 1 --repeats 3
    python benchmarks/token_ce.py --device cuda --methods naive,ours,ours-input,liger,cce,torchtune --dtype bf16 \\
        --shapes 4096x128256 --n 16384 --keep 1.0,0.6,0.3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks._rss import fmt_bytes, measure_peak, run_worker  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BASES = ("naive", "ours", "ours-input", "cce", "liger", "liger32", "torchtune")
CUDA_ONLY = ("liger", "liger32")
OPTION_ENV = {"gemm": "LIT_FT_TOKEN_CE_GEMM", "row": "LIT_FT_ROW_CFG"}


# --- methods ------------------------------------------------------------------------------------------------------


def _masked_labels(y, keep):
    return y.masked_fill(~keep, -100)


def step_naive(h, w, y, keep, opts):
    logits = h @ w.T
    return F.cross_entropy(logits, _masked_labels(y, keep), ignore_index=-100)


def step_ours(h, w, y, keep, opts, accumulation="fp32"):
    from lit_ft.kernels import fused_linear_token_ce

    chunk = int(opts.get("chunk", 0)) or None
    return fused_linear_token_ce(h, w, y, keep=keep, chunk_size=chunk, weight_grad_accumulation=accumulation)


def step_ours_input(h, w, y, keep, opts):
    return step_ours(h, w, y, keep, opts, accumulation="input")


def step_liger(h, w, y, keep, opts, accum_dtype=None):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    args = (h, w, _masked_labels(y, keep))
    if accum_dtype is not None:  # apply(input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        # label_smoothing, reduction, softcap, return_z_loss, accum_dtype)
        args += (None, None, -100, 0.0, 0.0, "mean", None, False, accum_dtype)
    out = LigerFusedLinearCrossEntropyFunction.apply(*args)
    return out[0] if isinstance(out, tuple) else out


def step_liger32(h, w, y, keep, opts):
    return step_liger(h, w, y, keep, opts, accum_dtype=torch.float32)


def step_cce(h, w, y, keep, opts):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if h.is_cuda else "torch_compile"  # CCE's CPU path is its torch.compile implementation
    return linear_cross_entropy(h, w, _masked_labels(y, keep), impl=impl)


_TT_LOSS = None


def step_torchtune(h, w, y, keep, opts):
    global _TT_LOSS
    if _TT_LOSS is None:
        from torchtune.modules.loss import CEWithChunkedOutputLoss

        _TT_LOSS = CEWithChunkedOutputLoss(num_output_chunks=8)
    chunks = [c @ w.T for c in h.unsqueeze(0).chunk(_TT_LOSS.num_output_chunks, dim=1)]  # as torchtune models emit
    return _TT_LOSS(chunks, _masked_labels(y, keep).unsqueeze(0))


STEPS = {"naive": step_naive, "ours": step_ours, "ours-input": step_ours_input, "cce": step_cce,
         "liger": step_liger, "liger32": step_liger32, "torchtune": step_torchtune}


def parse_method(spec: str):
    """``base[:key=value...]`` -> (base, options)."""
    base, *rest = spec.split(":")
    if base not in BASES:
        raise SystemExit(f"unknown method {base!r}; choose from {BASES}")
    opts = {}
    for item in rest:
        key, _, value = item.partition("=")
        if key not in ("chunk", "gemm", "row") or not value:
            raise SystemExit(f"bad option {item!r} in {spec!r}: use chunk=N, gemm=cublas|triton, row=BLOCK_V,warps")
        if not base.startswith("ours"):
            raise SystemExit(f"options apply to ours / ours-input only, got {spec!r}")
        opts[key] = value
    return base, opts


def unavailable(base: str, device: str) -> str:
    """Why a method cannot run here ('' when it can)."""
    if base in CUDA_ONLY and device != "cuda":
        return "CUDA only"
    try:
        if base in ("liger", "liger32"):
            import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
        elif base == "cce":
            import cut_cross_entropy  # noqa: F401
        elif base == "torchtune":
            import torchtune.modules.loss  # noqa: F401
    except Exception as e:  # noqa: BLE001  (ImportError, or a peer broken against this torch)
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:120]}"
    return ""


# --- measurement --------------------------------------------------------------------------------------------------


def make_inputs(d, v, n, keep_frac, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)
    keep = torch.rand(n, generator=g) < keep_frac if keep_frac < 1 else torch.ones(n, dtype=torch.bool)
    return h, w, y, keep.to(device)


def measure(spec, d, v, n, keep_frac, dtype, device, warmup, repeats):
    base, opts = parse_method(spec)
    fn = STEPS[base]
    h, w, y, keep = make_inputs(d, v, n, keep_frac, dtype, device)
    cuda = device == "cuda"

    def step():
        h.grad = None
        w.grad = None
        loss = fn(h, w, y, keep, opts)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    times, peak = [], 0
    for _ in range(repeats):
        h.grad = w.grad = None
        gc.collect()
        elapsed, used = measure_peak(step, cuda)
        times.append(elapsed)
        peak = max(peak, used)
    del h, w, y, keep
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return {"time_s": statistics.median(times), "peak_bytes": peak}


def worker_main(args):
    """One fresh process: one method, shape, N and dtype; every kept fraction."""
    base, opts = parse_method(args.method)
    for key, env in OPTION_ENV.items():
        if key in opts:
            os.environ[env] = opts[key]
    torch.manual_seed(0)
    # prime imports, op registration and kernel compilation on a tiny problem: the timed steps exclude them
    th, tw, ty, tk = make_inputs(16, 64, 8, 1.0, DTYPES[args.dtype], args.device)
    STEPS[base](th, tw, ty, tk, opts).backward()
    del th, tw, ty, tk
    out = {}
    for keep in [float(k) for k in args.keep.split(",")]:
        try:
            out[str(keep)] = measure(args.method, args.d, args.v, int(args.n), keep, DTYPES[args.dtype], args.device,
                                     args.warmup, args.repeats)
        except Exception as e:  # noqa: BLE001  (an OOM or a peer failing at this shape: report it, go on)
            out[str(keep)] = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"}
            gc.collect()
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print("RESULT " + json.dumps(out))


def run_in_fresh_process(spec, d, v, n, dtype, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", spec, "--d", str(d), "--v", str(v),
           "--n", str(n), "--keep", args.keep, "--dtype", dtype, "--device", args.device, "--warmup",
           str(args.warmup), "--repeats", str(args.repeats)]
    try:
        return run_worker(cmd, spec)
    except RuntimeError as e:  # the process died (e.g. killed for memory): every kept fraction fails
        last = str(e).strip().splitlines()[-1][:160] if str(e).strip() else "worker died"
        return {k: {"error": last} for k in args.keep.split(",")}


def _cell(r, nv):
    if r is None:
        return "– | –"
    if "error" in r:
        return "failed | failed"
    if nv is None or "error" in nv:
        return f"{r['time_s'] * 1e3:.1f} ms | {fmt_bytes(r['peak_bytes'])}"
    return (f"{r['time_s'] * 1e3:.1f} ms ({r['time_s'] / nv['time_s']:.2f}×) | "
            f"{fmt_bytes(r['peak_bytes'])} ({r['peak_bytes'] / max(nv['peak_bytes'], 1):.3f}×)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", default="naive,ours,ours-input,cce,liger,torchtune",
                   help="comma-separated; the first is the baseline of the ratios (default naive)")
    p.add_argument("--dtype", default=None, help="comma-separated (fp32, bf16, fp16); default: fp32 on CPU, bf16 "
                   "on CUDA")
    p.add_argument("--shapes", default="576x49152", help="comma-separated DxV")
    p.add_argument("--n", default="8192", help="comma-separated token counts")
    p.add_argument("--keep", default="1.0,0.6,0.3", help="comma-separated kept fractions")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="default: 3 on CPU, 5 on CUDA")
    p.add_argument("--json", default="", help="also write every measurement to this JSON file")
    # worker mode (one measurement set in a fresh process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cuda = args.device == "cuda"
    args.repeats = args.repeats if args.repeats is not None else (5 if cuda else 3)
    if args.worker:
        return worker_main(args)
    dtypes = [s for s in (args.dtype or ("bf16" if cuda else "fp32")).split(",") if s]
    for dt in dtypes:
        if dt not in DTYPES:
            raise SystemExit(f"--dtype accepts {list(DTYPES)}, got {dt!r}")

    specs = []
    for spec in [s for s in args.methods.split(",") if s]:
        why = unavailable(parse_method(spec)[0], args.device)
        if why:
            print(f"note: skipping {spec}: {why}")
        else:
            specs.append(spec)
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s]
    ns = [int(x) for x in args.n.split(",") if x]
    keeps = [k for k in args.keep.split(",") if k]
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    versions = [f"torch {torch.__version__}"]
    for mod in ("triton", "liger_kernel", "cut_cross_entropy", "torchtune"):
        try:
            from importlib.metadata import version

            versions.append(f"{mod} {version(mod.replace('_', '-'))}")
        except Exception:  # noqa: BLE001
            pass
    print(f"device: {dev_name}; {', '.join(versions)}; warmup {args.warmup}, repeats {args.repeats} (median); "
          f"one fresh process per (method, shape, N, dtype)")
    results = []
    for dt in dtypes:
        head = "| D | V | N | keep | " + " | ".join(f"{s} time | {s} peak mem" for s in specs) + " |"
        sep = "|---|---|---|---|" + "---|---|" * len(specs)
        print(f"\n{dt}:\n{head}\n{sep}", flush=True)
        for d, v in shapes:
            for n in ns:
                res = {}
                for s in specs:  # each result is printed (and saved) as it arrives: a time limit loses no row
                    res[s] = run_in_fresh_process(s, d, v, n, dt, args)
                    done = ", ".join(f"keep {float(k):.0%}: " + (f"{r['time_s'] * 1e3:.1f} ms {fmt_bytes(r['peak_bytes'])}"
                                     if "error" not in r else "failed") for k, r in res[s].items())
                    print(f"measured {s} D={d} V={v} N={n} {dt}: {done}", flush=True)
                    if args.json:
                        partial = results + [{"dtype": dt, "d": d, "v": v, "n": n, "keep": float(k), "method": m, **r}
                                             for m, per in res.items() for k, r in per.items()]
                        with open(args.json, "w") as f:
                            json.dump({"device": dev_name, "versions": versions, "results": partial}, f, indent=1)
                for keep in keeps:
                    base = res[specs[0]].get(keep) if specs else None
                    cells = [_cell(res[s].get(keep), None if s == specs[0] else base) for s in specs]
                    print(f"| {d} | {v} | {n} | {float(keep):.0%} | " + " | ".join(cells) + " |", flush=True)
                    for s in specs:
                        results.append({"dtype": dt, "d": d, "v": v, "n": n, "keep": float(keep), "method": s,
                                        **res[s].get(keep, {"error": "missing"})})
                for s in specs:
                    for keep in keeps:
                        err = res[s].get(keep, {}).get("error")
                        if err:
                            print(f"note: {s} failed at D={d} V={v} N={n} keep={keep} {dt}: {err}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": dev_name, "versions": versions, "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
