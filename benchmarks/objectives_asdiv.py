"""Quality of the objectives family on real data (a benchmark, not a test): plain SFT vs OneTokenRollout (its
defaults) vs MultiTokenHeads (CAFT: heads pre-trained alone first, as the paper does, then CAFT fine-tuning with the
paper's defaults) on ASDiv with SmolLM2-135M-Instruct, full fine-tuning, the same seed, steps, data order and
held-out set per arm; two seeds. Held-out completion loss and exact match are measured by a fresh Trainer with no
technique attached (so OneTokenRollout's term does not enter the validation loss and CAFT's heads are not used: the
model as deployed). Small CPU regime; writes ``benchmarks/results/objectives_asdiv.json`` and prints a markdown table.

    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/objectives_asdiv.py --seeds 0
    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/objectives_asdiv.py --seeds 1 --append
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import torch

from lit_ft.callbacks.objectives import OneTokenRollout
from lit_ft.callbacks.objectives.multi_token_heads import MultiTokenHeads
from lit_ft.data import SFTDataModule
from lit_ft.modules import CausalLMModule

RESULTS = os.path.join(os.path.dirname(__file__), "results", "objectives_asdiv.json")


def _dm(args: argparse.Namespace, seed: int) -> SFTDataModule:
    return SFTDataModule(data="asdiv", tokenizer="smollm2-135m-instruct", max_length=256, batch_size=args.batch_size,
                         eval_batch_size=16, max_val_samples=args.eval_samples, seed=seed)


def _trainer(steps: int, callbacks: list, root: str) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, default_root_dir=root)


def _evaluate(module: CausalLMModule, args: argparse.Namespace, seed: int) -> dict[str, float]:
    ev = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    out = ev.validate(module, datamodule=_dm(args, seed), verbose=False)[0]
    return {"loss": float(out["val/loss"]), "em": float(out.get("val/exact_match", float("nan")))}


def run(arm: str, args: argparse.Namespace, seed: int, root: str) -> dict[str, Any]:
    pl.seed_everything(seed, verbose=False)
    module = CausalLMModule(model="smollm2-135m-instruct", learning_rate=args.lr, warmup_steps=2,
                            eval_exact_match=args.eval_samples, max_new_tokens=16)
    t0 = time.perf_counter()
    pre_s = 0.0
    if arm == "OneTokenRollout":
        callbacks = [OneTokenRollout()]
    elif arm == "MultiTokenHeads":
        heads_dir = os.path.join(root, f"heads_seed{seed}")
        pre = MultiTokenHeads(heads_only=True, learning_rate=args.heads_lr, save_dir=heads_dir)
        _trainer(args.heads_steps, [pre], root).fit(module, datamodule=_dm(args, seed + 1000))
        pre.remove()
        pre_s = time.perf_counter() - t0
        for p in module.parameters():  # heads-only froze the base: fine-tune everything again
            p.requires_grad_(True)
        callbacks = [MultiTokenHeads(heads_path=heads_dir)]
    else:
        callbacks = []
    t1 = time.perf_counter()
    _trainer(args.steps, callbacks, root).fit(module, datamodule=_dm(args, seed))
    train_s = time.perf_counter() - t1
    for cb in callbacks:
        if isinstance(cb, MultiTokenHeads):
            cb.remove()  # dropped at inference
    row = {"arm": arm, "seed": seed, **_evaluate(module, args, seed), "train_s": train_s, "heads_pretrain_s": pre_s,
           "wall_s": time.perf_counter() - t0}
    print(f"[{arm} seed {seed}] {row}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--heads-steps", type=int, default=6, help="heads-only pre-training steps (other examples)")
    p.add_argument("--heads-lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=24)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seeds", type=str, default="0,1")
    p.add_argument("--arms", type=str, default="plain SFT,OneTokenRollout,MultiTokenHeads")
    p.add_argument("--append", action="store_true", help="add to the rows already in the results file (one seed "
                   "per invocation keeps each run under 10 minutes on a shared 2-core machine)")
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="lit_ft_objectives_") as root:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for arm in args.arms.split(","):
                rows.append(run(arm, args, seed, root))
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    if args.append and os.path.isfile(RESULTS):
        with open(RESULTS) as f:
            done = {int(s) for s in args.seeds.split(",")}
            rows = [r for r in json.load(f)["rows"] if r["seed"] not in done] + rows
    with open(RESULTS, "w") as f:
        json.dump({"args": {**vars(args), "seeds": ",".join(str(s) for s in sorted({r["seed"] for r in rows}))},
                   "rows": rows}, f, indent=2)
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    base = {r["seed"]: r for r in rows if r["arm"] == arms[0]}
    rows = sorted(rows, key=lambda r: (r["seed"], arms.index(r["arm"])))
    print(f"\n{args.steps} steps x batch {args.batch_size}, lr {args.lr}, {args.eval_samples} held-out asdiv rows, "
          f"seeds {sorted(base)}\n")
    print("| arm | seed | held-out loss | exact match | train time | vs plain |\n|---|---|---|---|---|---|")
    for r in rows:
        b = base.get(r["seed"])
        ratio = r["train_s"] / b["train_s"] if b else float("nan")
        extra = f" (+{r['heads_pretrain_s']:.0f} s heads pre-training)" if r["heads_pretrain_s"] else ""
        print(f"| {r['arm']} | {r['seed']} | {r['loss']:.4f} | {r['em']:.3f} | {r['train_s']:.0f} s{extra} | "
              f"{ratio:.2f}x |")
    for arm in arms:
        rs = [r for r in rows if r["arm"] == arm]
        print(f"| {arm} | mean | {sum(r['loss'] for r in rs) / len(rs):.4f} | "
              f"{sum(r['em'] for r in rs) / len(rs):.3f} | | |")


if __name__ == "__main__":
    main()
