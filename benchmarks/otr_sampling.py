"""OneTokenRollout's term: the fused path (chunked fused-linear base + Gumbel-max over vocabulary chunks) vs the naive
one (full ``[N, V]`` logits, ``softmax`` + ``torch.multinomial``), forward + backward, peak memory and time per shape
(a benchmark, not a test).

Both arms compute the same loss (K samples per row at temperature 1, reward 1 for the gold token and
``negative_reward`` otherwise, REINFORCE on log p of the samples; no CE share), over ``N`` rows of a SmolLM2-sized
head (d 576, V 49152) in fp32. Each arm runs in a fresh subprocess (CPU has no allocator statistics; a fresh process
gives each arm the same baseline): the peak resident-memory increase over the inputs, and the median of 3 timed
repeats after one warm-up. Ratios are fused / naive of the same invocation.

    OMP_NUM_THREADS=2 python benchmarks/otr_sampling.py            # N = 512, 2048; K = 8
    python benchmarks/otr_sampling.py --rows 256 --samples 2 --no-results   # a smoke run

Writes ``benchmarks/results/otr_sampling.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def _inputs(n: int, d: int, v: int):  # noqa: ANN202
    import torch

    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) * 0.02).requires_grad_(True)
    t = torch.randint(0, v, (n,), generator=g)
    return h, w, t


def _fused(h, w, t, k: int, neg: float):  # noqa: ANN001, ANN202
    import torch

    from lit_ft.callbacks.objectives.one_token_rollout import otr_chunk_sum
    from lit_ft.kernels import chunked_linear_loss

    rows = {"targets": t, "weights": torch.ones(len(t)), "row_ids": torch.arange(len(t))}
    return chunked_linear_loss(h, w, lambda z, **r: otr_chunk_sum(
        z, **r, seed=1, num_samples=k, temperature=1.0, negative_reward=neg, baseline=False, ce_weight=0.0), rows)


def _naive(h, w, t, k: int, neg: float):  # noqa: ANN001, ANN202
    import torch

    logits = h @ w.T  # [N, V]
    logp = torch.log_softmax(logits, dim=-1)
    sampled = torch.multinomial(logp.detach().exp(), k, replacement=True)
    reward = torch.where(sampled == t[:, None], 1.0, neg)
    # the term minus the engine's CE (ce_weight = 0), as the fused chunk function returns it
    return (-(reward * logp.gather(1, sampled)).sum(dim=1) / k - logp.gather(1, t[:, None]).squeeze(1)).sum()


def child(arm: str, n: int, d: int, v: int, k: int, neg: float) -> dict:
    import torch

    from benchmarks._rss import peak_rss_bytes, reset_peak_rss, rss_bytes

    torch.manual_seed(0)
    h, w, t = _inputs(n, d, v)
    fn = _fused if arm == "fused" else _naive
    fn(h, w, t, k, neg).backward()  # warm-up (and the chunked base's first-call work)
    h.grad = w.grad = None
    base = rss_bytes()
    reset_peak_rss()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn(h, w, t, k, neg).backward()
        times.append(time.perf_counter() - t0)
        h.grad = w.grad = None
    return {"arm": arm, "rows": n, "peak_mib": (peak_rss_bytes() - base) / 2**20, "time_s": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=str, default="512,2048")
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--samples", type=int, default=8, help="K")
    p.add_argument("--negative-reward", type=float, default=-0.1)
    p.add_argument("--no-results", action="store_true")
    p.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        arm, n = args.child.split(":")
        print(json.dumps(child(arm, int(n), args.hidden, args.vocab, args.samples, args.negative_reward)))
        return
    rows = []
    for n in [int(x) for x in args.rows.split(",")]:
        for arm in ("naive", "fused"):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", f"{arm}:{n}", "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--samples", str(args.samples),
                   "--negative-reward", str(args.negative_reward)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=REPO)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    lines = [f"OneTokenRollout term, forward + backward, d {args.hidden}, V {args.vocab}, K {args.samples}, fp32, "
             f"{os.environ.get('OMP_NUM_THREADS', 'all')} threads; peak = resident-memory increase over the inputs.",
             "", "| rows N | naive peak | fused peak | fused / naive | naive time | fused time | fused / naive |",
             "|---|---|---|---|---|---|---|"]
    for n in dict.fromkeys(r["rows"] for r in rows):
        a = next(r for r in rows if r["rows"] == n and r["arm"] == "naive")
        b = next(r for r in rows if r["rows"] == n and r["arm"] == "fused")
        lines.append(f"| {n} | {a['peak_mib']:.0f} MiB | {b['peak_mib']:.0f} MiB | {b['peak_mib'] / a['peak_mib']:.2f}x "
                     f"| {a['time_s']:.2f} s | {b['time_s']:.2f} s | {b['time_s'] / a['time_s']:.2f}x |")
    table = "\n".join(lines)
    print(table)
    if not args.no_results:
        path = os.path.join(REPO, "benchmarks", "results", "otr_sampling.json")
        with open(path, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows, "table": table}, f,
                      indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
