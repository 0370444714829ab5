"""Benchmark: the DPO step's head part through the fused op vs full logits (TRL's way), SmolLM2's head size.

The step is ``loss.backward()`` of the sequence-level DPO loss from the final hidden states of the chosen and
rejected rows (``[2B, T, D]``, requiring grad) and the lm_head ``weight`` (requiring grad); the reference
log-probs are an input (computed without gradient in both methods). "fused": per-token log-probs of the supervised
positions from :func:`lit_ft.kernels.fused_linear_token_ce` (``reduction="none"``), never an ``[N, V]`` tensor.
"full logits": ``hidden @ weight.T`` over every position, ``log_softmax``, gather (what TRL's DPOTrainer does
without its own fused head). Each (shape, method) runs once in a fresh subprocess; on CPU the peak is the RSS
high-water mark over the step, on CUDA ``torch.cuda.max_memory_allocated``.

    python benchmarks/token_dpo_memory.py                       # CPU fp32, B=2 pairs, T=256,1024
    python benchmarks/token_dpo_memory.py --device cuda --dtype bf16 --seq 1024,4096 --pairs 4
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
METHODS = ("full_logits", "fused")
D, V = 576, 49152  # SmolLM2-135M: hidden size, vocabulary (tied head)


def make(pairs: int, seq: int, dtype, device, prompt_share: float = 0.25):
    g = torch.Generator().manual_seed(0)
    n = 2 * pairs
    h = torch.randn(n, seq, D, generator=g).to(device=device, dtype=dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D**0.5).to(device=device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, V, (n, seq), generator=g)
    targets[:, : int(seq * prompt_share)] = -100  # the prompt carries no target
    ref = -torch.rand(n, seq, generator=g) * 5
    return h, w, targets.to(device), ref.to(device)


def dpo(logps: torch.Tensor, ref: torch.Tensor, valid: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    d = torch.where(valid, logps - ref, torch.zeros((), dtype=logps.dtype, device=logps.device)).sum(1)
    c, r = d.chunk(2)
    return -F.logsigmoid(beta * (c - r)).mean()


def step(method: str, h, w, targets, ref) -> torch.Tensor:
    valid = targets != -100
    if method == "full_logits":
        logp = torch.log_softmax((h @ w.T).float(), dim=-1)
        logps = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return dpo(logps, ref, valid)
    from lit_ft.kernels import fused_linear_token_ce

    nll = fused_linear_token_ce(h[valid], w, targets[valid], reduction="none")
    logps = torch.zeros(valid.shape, dtype=nll.dtype, device=nll.device).masked_scatter(valid, -nll)
    return dpo(logps, ref, valid)


def measure(method, pairs, seq, dtype, device):
    small = make(1, 8, dtype, device)
    step(method, *small).backward()  # imports and dispatch caches outside the measured step
    h, w, targets, ref = make(pairs, seq, dtype, device)
    gc.collect()
    elapsed, peak = measure_peak(lambda: step(method, h, w, targets, ref).backward(), cuda=device == "cuda")
    return {"time_s": elapsed, "peak_bytes": peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", default="256,1024")
    p.add_argument("--worker", nargs=3, metavar=("METHOD", "PAIRS", "SEQ"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "token_dpo_memory.json"))
    args = p.parse_args()
    dtype = DTYPES[args.dtype]
    if args.worker:
        method, pairs, seq = args.worker[0], int(args.worker[1]), int(args.worker[2])
        print("RESULT " + json.dumps(measure(method, pairs, seq, dtype, args.device)), flush=True)
        return
    rows = []
    for seq in (int(s) for s in args.seq.split(",")):
        res = {}
        for method in METHODS:
            cmd = [sys.executable, os.path.abspath(__file__), "--device", args.device, "--dtype", args.dtype,
                   "--worker", method, str(args.pairs), str(seq)]
            res[method] = run_worker(cmd, f"{method} T={seq}")
        rows.append({"pairs": args.pairs, "seq": seq, "rows": 2 * args.pairs * seq, **res})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": args.device, "dtype": args.dtype, "D": D, "V": V, "rows": rows}, f, indent=1)
    print(f"\nDPO head step (forward + backward), D={D}, V={V}, {args.dtype} on {args.device}, {args.pairs} pairs, "
          "a quarter of each row is prompt\n")
    print("| T | rows (chosen + rejected) | full logits: peak / time | fused: peak / time | peak ratio | time ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        a, b = r["full_logits"], r["fused"]
        print(f"| {r['seq']} | {r['rows']} | {fmt_bytes(a['peak_bytes'])} / {a['time_s']:.2f} s | "
              f"{fmt_bytes(b['peak_bytes'])} / {b['time_s']:.2f} s | {b['peak_bytes'] / a['peak_bytes']:.2f} | "
              f"{b['time_s'] / a['time_s']:.2f} |")


if __name__ == "__main__":
    main()
