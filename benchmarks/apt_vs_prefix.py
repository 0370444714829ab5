"""ApproximatedPrompt (APT) vs plain prefix tuning at equal prompt length: training step time and peak memory on CPU
(a benchmark, not a test).

Both techniques give every decoder layer ``k`` prompt vectors: PrefixTuning as ``k`` key/value pairs in the attention
cache (the attention runs over ``N + k`` keys), APT as a ``k``-vector memory read with ReLU scores next to the
attention (``O(N k d)``, the sequence keeps its length). Each arm trains a frozen model for ``--steps`` steps after 2
warm-up steps in a fresh subprocess (its peak resident memory is its own), on random token batches. Also: both
under gradient checkpointing (APT trains; PrefixTuning refuses, since the checkpointed layers drop its cache).

    python benchmarks/apt_vs_prefix.py                     # tiny + SmolLM2-135M (first 8 layers), k = 20 and 200

Writes ``benchmarks/results/apt_vs_prefix.json`` (rows and APT/prefix ratios) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._rss import peak_rss_bytes, run_worker  # noqa: E402
from benchmarks._step_meter import StepMeter  # noqa: E402

OUT = os.path.join(REPO, "benchmarks", "results", "apt_vs_prefix.json")
MODELS = {"tiny": "tiny Llama (lit_ft.testing, 2 layers, d=32)",
          "small": "SmolLM2-135M-Instruct, first {layers} of 30 layers (d=576, 9 heads, 3 KV heads)"}


def _module(model: str, layers: int, checkpointing: bool):
    from lit_ft.modules import CausalLMModule
    from lit_ft.testing import tiny_llama_config

    if model == "tiny":
        return CausalLMModule(model_config=tiny_llama_config(vocab_size=384, max_position_embeddings=2048), learning_rate=1e-3,
                              gradient_checkpointing=checkpointing)
    return CausalLMModule(model="smollm2-135m-instruct", num_hidden_layers=layers, learning_rate=1e-3,
                          gradient_checkpointing=checkpointing)


def worker(args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    import lit_ft.callbacks as cbs

    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    module = _module(args.model, args.layers, args.checkpointing)
    vocab = module.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(2 + args.steps):
        ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    cb = (cbs.ApproximatedPrompt(num_prompts=args.k) if args.method == "apt"
          else cbs.PrefixTuning(num_virtual_tokens=args.k))
    meter = StepMeter(skip=2)
    trainer = pl.Trainer(max_steps=2 + args.steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0, accelerator="cpu", callbacks=[meter, cb])
    try:
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    except Exception as err:  # noqa: BLE001 - the refusal is the measurement
        return {"refused": f"{type(err).__name__}: {str(err)[:200]}"}
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"step_s": statistics.median(meter.times), "peak_bytes": peak_rss_bytes() - meter.base_rss, "trainable": trainable}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--k", default="20,200", help="prompt lengths (comma-separated)")
    p.add_argument("--layers", type=int, default=8, help="decoder layers kept of the small model")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2, help="fresh runs per arm (arms interleaved); the fastest "
                   "median and the lowest peak are kept: the shared CPU's noise only ever adds")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=OUT)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    p.add_argument("--method", default="apt", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.k = int(args.k)
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    rows = []
    for model in args.models.split(","):
        for k in (int(x) for x in args.k.split(",")):
            for ckpt in (False, True):
                pair: dict[str, dict] = {}
                for rep, method in [(r, m) for r in range(args.repeats) for m in ("prefix", "apt")]:
                    cmd = [sys.executable, __file__, "--worker", "--model", model, "--method", method, "--k", str(k),
                           "--layers", str(args.layers), "--steps", str(args.steps), "--batch-size",
                           str(args.batch_size), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
                    if ckpt:
                        cmd.append("--checkpointing")
                    r = run_worker(cmd, f"{model} {method} k={k}")
                    print(f"[{model} k={k} ckpt={ckpt} {method} run {rep}] {r}", flush=True)
                    best = pair.setdefault(method, r)
                    if "step_s" in r:
                        best["step_s"] = min(best["step_s"], r["step_s"])
                        best["peak_bytes"] = min(best["peak_bytes"], r["peak_bytes"])
                for method in ("prefix", "apt"):
                    rows.append({"model": model, "k": k, "gradient_checkpointing": ckpt, "method": method,
                                 **pair[method]})
                a, b = pair["apt"], pair["prefix"]
                if "step_s" in a and "step_s" in b:
                    rows[-1]["time_ratio_vs_prefix"] = a["step_s"] / b["step_s"]
                    rows[-1]["memory_ratio_vs_prefix"] = a["peak_bytes"] / b["peak_bytes"] if b["peak_bytes"] > 0 \
                        else None
    meta = {"models": {m: MODELS[m].format(layers=args.layers) for m in args.models.split(",")},
            "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "warmup_steps": 2,
            "threads": args.threads, "cpu_count": os.cpu_count(),
            "peak": "resident-memory increase over the training steps (activations, gradients, optimizer state)",
            "repeats": args.repeats,
            "time": "median step time after the warm-up steps; the lowest of the repeats (arms interleaved)"}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print("\n| model | k | checkpointing | method | trainable | step time | peak memory | APT/prefix time | "
          "APT/prefix memory |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "refused" in r:
            print(f"| {r['model']} | {r['k']} | {r['gradient_checkpointing']} | {r['method']} | — | refused | — | — | — |")
            continue
        tr = f"{r['time_ratio_vs_prefix']:.2f}×" if "time_ratio_vs_prefix" in r else "—"
        mr = f"{r['memory_ratio_vs_prefix']:.2f}×" if r.get("memory_ratio_vs_prefix") else "—"
        print(f"| {r['model']} | {r['k']} | {r['gradient_checkpointing']} | {r['method']} | {r['trainable']:,} | "
              f"{r['step_s'] * 1e3:.0f} ms | {r['peak_bytes'] / 2**20:.0f} MiB | {tr} | {mr} |")


if __name__ == "__main__":
    main()
