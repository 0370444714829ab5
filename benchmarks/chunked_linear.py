"""Benchmark: the chunked fused-linear base with a distillation chunk function vs the naive full-logits loss.

The step is ``loss.backward()`` of ``Σ_rows KL(teacher || student)`` (temperature 2) with ``hidden`` and the lm_head
``weight`` requiring grad; the teacher logits ``[N, V]`` are an input (they exist before the step in both methods).
Prints a markdown table of ratios (ours / naive; < 1 is better) of peak memory and step time. On CPU every
(configuration, method) runs in a fresh subprocess and the peak is the RSS high-water mark over the step (reset
through /proc/self/clear_refs); on CUDA ``torch.cuda.max_memory_allocated`` over the step.

    python benchmarks/chunked_linear.py                                   # CPU, fp32
    python benchmarks/chunked_linear.py --shapes 576x49152 --n 1024
    python benchmarks/chunked_linear.py --device cuda --dtype bf16 --n 4096,16384
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
import torch.nn.functional as F  # noqa: E402

from benchmarks._rss import fmt_bytes, measure_peak, run_worker  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("naive", "forward_grad", "recompute")


def kd_sum(logits, teacher_logits, temperature=2.0):
    teacher_logp = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    student_logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum()


def step(method, h, w, teacher):
    if method == "naive":
        return kd_sum(h @ w.T, teacher)
    from lit_ft.kernels import chunked_linear_loss

    return chunked_linear_loss(h, w, kd_sum, {"teacher_logits": teacher}, mode=method)


def measure(method, d, v, n, dtype, device):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) / d**0.5).to(device=device, dtype=dtype).requires_grad_()
    teacher = (torch.randn(n, v, generator=g) * 2).to(device)
    step(method, h[:4], w, teacher[:4]).backward()  # imports and dispatch caches outside the measured step
    h.grad = w.grad = None
    gc.collect()
    elapsed, peak = measure_peak(lambda: step(method, h, w, teacher).backward(), cuda=device == "cuda")
    return {"time_s": elapsed, "peak_bytes": peak}


def run(method, d, v, n, args):
    if args.device == "cuda":
        return measure(method, d, v, n, DTYPES[args.dtype], "cuda")
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", method, "--shapes", f"{d}x{v}", "--n", str(n),
           "--dtype", args.dtype]
    return run_worker(cmd, method)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--shapes", default="576x49152", help="comma-separated DxV")
    p.add_argument("--n", default="1024,4096", help="comma-separated row counts")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    counts = [int(x) for x in args.n.split(",")]
    if args.worker:
        (d, v), n = shapes[0], counts[0]
        print("RESULT " + json.dumps(measure(args.worker, d, v, n, DTYPES[args.dtype], "cpu")))
        return
    print(f"device={args.device} dtype={args.dtype}; ratios are ours / naive (< 1 is better)\n")
    print("| D x V | N | naive peak | naive time | forward_grad mem | time | recompute mem | time |")
    print("|---|---|---|---|---|---|---|---|")
    for d, v in shapes:
        for n in counts:
            res = {m: run(m, d, v, n, args) for m in METHODS}
            base = res["naive"]
            cells = [f"{d}x{v}", str(n), fmt_bytes(base["peak_bytes"]), f"{base['time_s']:.2f} s"]
            for m in METHODS[1:]:
                mem, secs = res[m]["peak_bytes"] / base["peak_bytes"], res[m]["time_s"] / base["time_s"]
                cells += [f"{mem:.3f}x", f"{secs:.2f}x"]
            print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
