"""Benchmark: the tiled Gram-difference hinge (``lit_ft.kernels.gram_hinge``) vs the dense one (both ``[W, W]`` cosine
Gram matrices built and kept for autograd), forward + backward, per sequence length ``T`` and feature width ``d``.

The step is ``gram_hinge(xs, xt).sum().backward()`` with the student features ``xs`` ``[B, T, d]`` requiring grad
and the teacher's ``xt`` fixed (token relation distillation's case). Every (shape, arm) runs once, in a fresh
subprocess on CPU (peak = RSS high-water mark over the step, reset through /proc/self/clear_refs) or with
``torch.cuda.max_memory_allocated`` on CUDA. Prints a markdown table (ratios tiled / dense; < 1 is better) and writes
``benchmarks/results/gram_hinge.json``.

    python benchmarks/gram_hinge.py                                  # CPU, T 512..4096, d 384 and 576
    python benchmarks/gram_hinge.py --t 1024 --d 384 --tile 256
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from benchmarks._rss import fmt_bytes, measure_peak, run_worker  # noqa: E402

ARMS = ("dense", "tiled")
RESULTS = os.path.join(REPO, "benchmarks", "results", "gram_hinge.json")


def step(arm: str, xs: torch.Tensor, xt: torch.Tensor, tile: int) -> None:
    from lit_ft.kernels.gram_hinge import gram_hinge, gram_hinge_reference

    if arm == "dense":
        out = gram_hinge_reference(xs, xt, 0.1, dtype=torch.float32)
    else:
        out = gram_hinge(xs, xt, 0.1, tile=tile)
    out.sum().backward()


def measure(arm: str, b: int, t: int, d: int, tile: int, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(b, t, d, generator=g).to(device).requires_grad_()
    xt = torch.randn(b, t, d, generator=g).to(device)
    step(arm, xs[:, :8].detach().requires_grad_(), xt[:, :8], tile)  # imports and dispatch outside the measurement
    gc.collect()
    elapsed, peak = measure_peak(lambda: step(arm, xs, xt, tile), cuda=device == "cuda")
    return {"time_s": elapsed, "peak_bytes": peak}


def run(arm: str, b: int, t: int, d: int, args) -> dict:
    if args.device == "cuda":
        return measure(arm, b, t, d, args.tile, "cuda")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", arm, "--t", str(t), "--d", str(d), "--batch",
           str(b), "--tile", str(args.tile)]
    return run_worker(cmd, arm)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--t", default="512,1024,2048,4096", help="comma-separated sequence lengths (words per row)")
    p.add_argument("--d", default="384,576", help="comma-separated feature widths")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--out", default=RESULTS, help="where the JSON results go")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    lengths = [int(x) for x in args.t.split(",")]
    widths = [int(x) for x in args.d.split(",")]
    if args.worker:
        print("RESULT " + json.dumps(measure(args.worker, args.batch, lengths[0], widths[0], args.tile, "cpu")))
        return
    rows = []
    print(f"device={args.device} batch={args.batch} tile={args.tile} threads={torch.get_num_threads()}; "
          "ratios are tiled / dense (< 1 is better)\n")
    print("| T | d | dense peak | dense time | tiled peak | tiled time | memory ratio | time ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for d in widths:
        for t in lengths:
            res = {arm: run(arm, args.batch, t, d, args) for arm in ARMS}
            dense, tiled = res["dense"], res["tiled"]
            mem = tiled["peak_bytes"] / max(dense["peak_bytes"], 1)
            secs = tiled["time_s"] / dense["time_s"]
            rows.append({"T": t, "d": d, "batch": args.batch, "tile": args.tile, "dense": dense, "tiled": tiled,
                         "memory_ratio": mem, "time_ratio": secs})
            print(f"| {t} | {d} | {fmt_bytes(dense['peak_bytes'])} | {dense['time_s']:.3f} s | "
                  f"{fmt_bytes(tiled['peak_bytes'])} | {tiled['time_s']:.3f} s | {mem:.3f}x | {secs:.2f}x |",
                  flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": args.device, "threads": torch.get_num_threads(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
