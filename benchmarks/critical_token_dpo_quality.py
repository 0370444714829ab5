"""Benchmark rows: TokenDPO with CriticalTokenScoring's weights beside plain TokenDPO (dpo-en-demo, SmolLM2-135M-Instruct).

Runs the "critical-token weights" rows of ``benchmarks/token_dpo_quality.py`` (its ``run``: same DataModule, LoRA,
steps, β) with the weights ``benchmarks/critical_token_weights.py`` exported, for each seed. The plain-DPO rows are
taken from ``benchmarks/results/token_dpo_quality.json`` when that file was made with the same settings (so the
two-core machine does not train them twice), else run here too. Writes
``benchmarks/results/critical_token_dpo_quality.json`` and prints a table with the held-out preference accuracy
and reward margin, and their differences against the plain row of the same seed.

    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/critical_token_dpo_quality.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

SAME = ("steps", "batch_size", "max_length", "val_pairs", "lr", "layers", "beta", "aggregation")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--val-pairs", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (smoke runs)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--aggregation", default="position", choices=("position", "sequence"))
    p.add_argument("--weights", default=os.path.join(REPO, "runs", "critical_token_scoring", "dpo_weights.pt"))
    p.add_argument("--plain", default=os.path.join(REPO, "benchmarks", "results", "token_dpo_quality.json"))
    p.add_argument("--budget-s", type=float, default=540.0, help="start no seed whose runs would end after this")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "critical_token_dpo_quality.json"))
    args = p.parse_args()

    import token_dpo_quality as q  # noqa: E402  (benchmarks/token_dpo_quality.py)

    seeds = [int(s) for s in args.seeds.split(",")]
    plain: dict[int, dict] = {}
    if os.path.isfile(args.plain):
        with open(args.plain) as f:
            saved = json.load(f)
        if all(saved["config"].get(k) == getattr(args, k) for k in SAME):
            plain = {r["seed"]: r for r in saved["rows"] if r["row"] == "plain DPO" and r["seed"] in seeds}
    rows, weighted, start, longest = [], [], time.perf_counter(), 0.0
    for seed in seeds:  # seed by seed (plain, then weighted), so a cut by --budget-s leaves whole pairs of rows
        todo = ([] if seed in plain else [("plain DPO", None)]) + [("critical-token weights", args.weights)]
        if time.perf_counter() - start + longest * len(todo) > args.budget_s:
            print(f"budget: seed {seed} skipped ({args.budget_s} s)", flush=True)
            break
        for label, weights in todo:
            t0 = time.perf_counter()
            r = q.run(seed, args, weights)
            longest = max(longest, time.perf_counter() - t0)
            r["row"] = label
            print(json.dumps(r), flush=True)
            if weights is None:
                plain[seed] = r
            else:
                weighted.append(r)
        rows.append(plain[seed])
    rows += weighted
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "rows": rows}, f, indent=1)
    print(f"\nSmolLM2-135M-Instruct, LoRA r16 (all projections), {args.steps} steps x {args.batch_size} pairs, "
          f"max_length {args.max_length}, lr {args.lr}, beta {args.beta}, aggregation={args.aggregation}; "
          f"held-out pairs: {rows[0]['val_pairs']}\n")
    print("| row | seed | held-out accuracy | held-out margin | held-out loss | Δ accuracy vs plain | Δ margin vs plain |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = plain[r["seed"]]
        print(f"| {r['row']} | {r['seed']} | {r['val_accuracy']:.3f} | {r['val_margin']:.4f} | {r['val_loss']:.4f} | "
              f"{r['val_accuracy'] - base['val_accuracy']:+.3f} | {r['val_margin'] - base['val_margin']:+.4f} |")


if __name__ == "__main__":
    main()
