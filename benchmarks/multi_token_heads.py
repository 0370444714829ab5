"""CAFT's heads cross-entropy: the fused heads × row-chunks pass (:func:`lit_ft.kernels.multi_head_ce`, one call of
the fused linear cross-entropy op) vs the authors' stacked ``[K, B, T, V]`` logits formulation
(:func:`~lit_ft.kernels.multi_head_ce.multi_head_ce_reference`), forward + backward, SmolLM2-135M head size
(D 576, V 49152, fp32), K = 5 heads (the authors' stack: the main head + 4 auxiliary ones), every token supervised.
Each (arm, shape) runs in a fresh process; peak = RSS high-water mark above the start on CPU (CUDA allocator peak on
a GPU); time = the step after a warm-up step. Writes ``benchmarks/results/multi_token_heads.json`` and prints a
markdown table.

    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/multi_token_heads.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from _rss import fmt_bytes, measure_peak, run_worker  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results", "multi_token_heads.json")
D, V, K = 576, 49152, 5


def worker(arm: str, b: int, t: int) -> dict:
    import torch

    from lit_ft.kernels.multi_head_ce import multi_head_ce, multi_head_ce_reference

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    g = torch.Generator(device="cpu").manual_seed(0)
    h = torch.randn(K, b * t, D, generator=g).to(dev).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * 0.02).to(dev).requires_grad_(True)
    y = torch.randint(0, V, (K, b * t), generator=g).to(dev)
    scale = [1.0] + [0.01 * 0.8 ** k for k in range(1, K)]
    fn = multi_head_ce if arm == "fused" else multi_head_ce_reference
    box = {}

    def step():
        out = fn(h, w, y, scale)
        out.loss.backward()
        box["loss"] = float(out.loss)
        h.grad = w.grad = None

    _, peak = measure_peak(step, cuda)  # the first step's peak, in this fresh process
    seconds, _ = measure_peak(step, cuda)
    return {"arm": arm, "B": b, "T": t, "peak_bytes": peak, "seconds": seconds, "loss": box["loss"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="2x128,4x256,8x256", help="comma-separated BxT")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        arm, b, t = args.worker.split(":")
        print("RESULT " + json.dumps(worker(arm, int(b), int(t))), flush=True)
        return
    rows = []
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        for arm in ("stacked", "fused"):
            r = run_worker([sys.executable, __file__, "--worker", f"{arm}:{b}:{t}"], f"{arm} {shape}")
            print(r, flush=True)
            rows.append(r)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump({"D": D, "V": V, "K": K, "rows": rows}, f, indent=2)
    print(f"\nK={K} heads, D={D}, V={V}, fp32, forward + backward\n")
    print("| B × T | stacked [K, B, T, V] peak | time | fused peak | time | memory | time |")
    print("|---|---|---|---|---|---|---|")
    for i in range(0, len(rows), 2):
        s, f_ = rows[i], rows[i + 1]
        print(f"| {s['B']} × {s['T']} | {fmt_bytes(s['peak_bytes'])} | {s['seconds']:.2f} s | "
              f"{fmt_bytes(f_['peak_bytes'])} | {f_['seconds']:.2f} s | {f_['peak_bytes'] / s['peak_bytes']:.3f}× | "
              f"{f_['seconds'] / s['seconds']:.2f}× |")


if __name__ == "__main__":
    main()
