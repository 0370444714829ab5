"""Benchmark: fused linear token CE vs the naive ``hidden @ W.T`` + ``F.cross_entropy`` (forward + backward).

Prints a markdown table of ratios (ours / naive; < 1 is better) of peak memory and step time, measured in one
process per configuration against the naive baseline:

* CPU: peak RSS increase over the step, measured in a fresh subprocess per (configuration, method) (CPU has no
  allocator statistics; the peak is reset through /proc/self/clear_refs before the step).
* CUDA: ``torch.cuda.max_memory_allocated`` increase over the step, all methods in one process.

The step is ``loss.backward()`` with both ``hidden`` and the lm_head ``weight`` requiring grad (mean reduction).
``keep`` = fraction of tokens kept: ours gets a ``keep`` mask (dropped tokens skip the matmuls); the baselines
get those labels set to -100 (they still pay for the logits).

    python benchmarks/token_ce.py                                   # CPU, fp32, all shapes
    python benchmarks/token_ce.py --shapes 576x49152 --n 2048,8192  # CPU subset
    python benchmarks/token_ce.py --device cuda --dtype bf16 --compare liger,cce
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


# --- methods ------------------------------------------------------------------------------------------------------


def _masked_labels(y, keep):
    return y.masked_fill(~keep, -100)


def step_naive(h, w, y, keep):
    logits = h @ w.T
    return F.cross_entropy(logits, _masked_labels(y, keep), ignore_index=-100)


def step_ours(h, w, y, keep):
    from lit_ft.kernels import fused_linear_token_ce

    cs = int(os.environ.get("TOKEN_CE_BENCH_CHUNK", "0")) or None
    return fused_linear_token_ce(h, w, y, keep=keep, chunk_size=cs)


def step_ours_input(h, w, y, keep):
    """Ours with the lm_head gradient summed over chunks in the weight's dtype (no fp32 [V, D] accumulator)."""
    from lit_ft.kernels import fused_linear_token_ce

    cs = int(os.environ.get("TOKEN_CE_BENCH_CHUNK", "0")) or None
    return fused_linear_token_ce(h, w, y, keep=keep, chunk_size=cs, weight_grad_accumulation="input")


def step_liger(h, w, y, keep):
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    # apply(_input, weight, target, bias, ...) - the remaining arguments keep their defaults (mean, ignore -100)
    out = LigerFusedLinearCrossEntropyFunction.apply(h, w, _masked_labels(y, keep))
    return out[0] if isinstance(out, tuple) else out


def step_liger32(h, w, y, keep):
    """Liger with an fp32 weight-grad accumulator (what ours always does)."""
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    out = LigerFusedLinearCrossEntropyFunction.apply(h, w, _masked_labels(y, keep), None, None, -100, 0.0, 0.0,
                                                     "mean", None, False, torch.float32)
    return out[0] if isinstance(out, tuple) else out


def step_cce(h, w, y, keep):
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(h, w, _masked_labels(y, keep))


METHODS = {"naive": step_naive, "ours": step_ours, "ours-input": step_ours_input, "liger": step_liger,
           "liger32": step_liger32, "cce": step_cce}


def importable(method):
    try:
        if method in ("liger", "liger32"):
            import liger_kernel.ops.fused_linear_cross_entropy  # noqa: F401
        elif method == "cce":
            import cut_cross_entropy  # noqa: F401
        return True, ""
    except Exception as e:  # noqa: BLE001
        return False, f"{type(e).__name__}: {e}"


# --- measurement --------------------------------------------------------------------------------------------------


def make_inputs(d, v, n, keep_frac, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(n, d, generator=g) ).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g).to(device)
    keep = (torch.rand(n, generator=g) < keep_frac).to(device) if keep_frac < 1 else torch.ones(n, dtype=torch.bool,
                                                                                                 device=device)
    return h, w, y, keep



def measure(method, d, v, n, keep_frac, dtype, device, warmup, repeats):
    fn = METHODS[method]
    # prime imports / op registration / dispatch caches on a tiny problem so the timed step excludes them
    th, tw, ty, tk = make_inputs(16, 32, 8, keep_frac, dtype, device)
    fn(th, tw, ty, tk).backward()
    del th, tw, ty, tk
    h, w, y, keep = make_inputs(d, v, n, keep_frac, dtype, device)
    cuda = device == "cuda"

    def step():
        h.grad = None
        w.grad = None
        loss = fn(h, w, y, keep)
        loss.backward()
        return loss

    for _ in range(warmup):
        step()
    h.grad = w.grad = None
    gc.collect()
    times, peak = [], 0
    for i in range(repeats):
        h.grad = w.grad = None
        gc.collect()
        elapsed, used = measure_peak(step, cuda)
        times.append(elapsed)
        peak = max(peak, used)
    return {"time_s": statistics.median(times), "peak_bytes": peak}


def worker_main(args):
    torch.manual_seed(0)
    res = measure(args.method, args.d, args.v, args.n, args.keep, DTYPES[args.dtype], args.device, args.warmup,
                  args.repeats)
    print("RESULT " + json.dumps(res))


def run_config_cpu(method, d, v, n, keep, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--method", method, "--d", str(d), "--v", str(v),
           "--n", str(n), "--keep", str(keep), "--dtype", args.dtype, "--device", "cpu", "--warmup",
           str(args.warmup), "--repeats", str(args.repeats)]
    return run_worker(cmd, method)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--shapes", default="576x49152,2048x128256", help="comma-separated DxV")
    p.add_argument("--n", default="2048,8192", help="comma-separated token counts")
    p.add_argument("--keep", default="1.0,0.6,0.3", help="comma-separated kept fractions")
    p.add_argument("--compare", default="", help="comma-separated extra methods: ours-input (ours with "
                   "weight_grad_accumulation='input'); CUDA only: liger (default bf16 grad accumulation), "
                   "liger32 (Liger with accum_dtype=float32), cce")
    p.add_argument("--chunk-size", type=int, default=0, help="chunk_size for ours (default: the op's rule)")
    p.add_argument("--warmup", type=int, default=None, help="default: 0 on CPU, 3 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="default: 1 on CPU, 10 on CUDA")
    # worker mode (one CPU measurement in a fresh process)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--method", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--d", type=int, help=argparse.SUPPRESS)
    p.add_argument("--v", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.chunk_size:
        os.environ["TOKEN_CE_BENCH_CHUNK"] = str(args.chunk_size)  # read by step_ours (also in CPU workers)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.warmup = args.warmup if args.warmup is not None else (3 if cuda else 0)
    args.repeats = args.repeats if args.repeats is not None else (10 if cuda else 1)
    if args.worker:
        args.n, args.keep = int(args.n), float(args.keep)
        return worker_main(args)

    methods = ["naive", "ours"]
    for m in [s for s in args.compare.split(",") if s]:
        if m not in ("ours-input", "liger", "liger32", "cce"):
            raise SystemExit(f"--compare accepts ours-input,liger,liger32,cce; got {m!r}")
        ok, why = importable(m) if (cuda or m == "ours-input") else (False, "CUDA only")
        if ok:
            methods.append(m)
        else:
            print(f"note: skipping {m}: {why}")
    shapes = [tuple(int(x) for x in s.lower().split("x")) for s in args.shapes.split(",") if s]
    ns = [int(x) for x in args.n.split(",") if x]
    keeps = [float(x) for x in args.keep.split(",") if x]
    dev_name = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {dev_name}; torch {torch.__version__}; dtype {args.dtype}; warmup {args.warmup}, "
          f"repeats {args.repeats} (median)")
    if cuda:
        import triton

        print(f"triton {triton.__version__}")
    head = "| D | V | N | keep | naive time | naive peak mem | ours time (×naive) | ours mem (×naive) |"
    sep = "|---|---|---|---|---|---|---|---|"
    for m in methods[2:]:
        head += f" {m} time (×naive) | {m} mem (×naive) |"
        sep += "---|---|"
    rows = [head, sep]
    print(head)
    print(sep)
    for d, v in shapes:
        for n in ns:
            for keep in keeps:
                res = {}
                for m in methods:
                    try:
                        if cuda:
                            res[m] = measure(m, d, v, n, keep, DTYPES[args.dtype], "cuda", args.warmup, args.repeats)
                            gc.collect()
                            torch.cuda.empty_cache()
                        else:
                            res[m] = run_config_cpu(m, d, v, n, keep, args)
                    except Exception as e:  # noqa: BLE001  (OOM or a baseline failing: report, go on)
                        print(f"note: {m} failed at D={d} V={v} N={n} keep={keep}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200]}")
                        if cuda:
                            gc.collect()
                            torch.cuda.empty_cache()
                nv = res.get("naive")

                def cell(m):
                    r = res.get(m)
                    if r is None:
                        return "failed | failed"
                    if nv is None:
                        return f"{r['time_s'] * 1e3:.1f} ms | {fmt_bytes(r['peak_bytes'])}"
                    return (f"{r['time_s'] * 1e3:.1f} ms ({r['time_s'] / nv['time_s']:.2f}×) | "
                            f"{fmt_bytes(r['peak_bytes'])} ({r['peak_bytes'] / max(nv['peak_bytes'], 1):.3f}×)")

                naive_cells = (f"{nv['time_s'] * 1e3:.1f} ms | {fmt_bytes(nv['peak_bytes'])}" if nv
                               else "failed | failed")
                row = f"| {d} | {v} | {n} | {keep:.0%} | {naive_cells} | " + " | ".join(cell(m) for m in methods[1:]) + " |"
                rows.append(row)
                print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
