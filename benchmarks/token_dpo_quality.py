"""Benchmark: token-level DPO on the dpo-en-demo pairs with SmolLM2-135M-Instruct — preference accuracy and reward
margin on held-out pairs after a short LoRA run (the authors' setup: LoRA on all projections, the reference = the
model with its adapter off).

Rows: "plain DPO" (TokenDPO without per-token weights) per seed; with ``--weights PATH`` also "critical-token
weights" rows, whose batches get ``chosen_token_weights`` / ``rejected_token_weights`` from a weights cache (a
``torch.save``'d dict ``{sample_idx: {"chosen": float tensor, "rejected": float tensor}}``, each aligned with that
side's unshifted labels of PreferenceDataModule at the same ``max_length``; what a CriticalTokenScoring run
writes). A small CPU regime (few steps, short sequences, a small held-out set): see the defaults.

    OMP_NUM_THREADS=2 python benchmarks/token_dpo_quality.py                 # plain rows, seeds 0 and 1
    OMP_NUM_THREADS=2 python benchmarks/token_dpo_quality.py --weights cache.pt
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lit_ft.callbacks import TokenDPO  # noqa: E402
from lit_ft.data import PreferenceDataModule  # noqa: E402
from lit_ft.modules import PreferenceModule  # noqa: E402

LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


class CachedWeights(pl.Callback):
    """Puts per-token weights from a cache into each training batch (keyed by ``sample_idx``)."""

    def __init__(self, path: str) -> None:
        self.cache = torch.load(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for side in ("chosen", "rejected"):
            labels = batch[f"{side}_labels"]
            w = torch.ones(labels.shape, dtype=torch.float32, device=labels.device)
            for row, idx in enumerate(batch["sample_idx"].tolist()):
                got = self.cache[idx][side].float()
                n = min(len(got), labels.shape[1])
                w[row, :n] = got[:n].to(w.device)
            batch[f"{side}_token_weights"] = w


def run(seed: int, args, weights: str | None) -> dict:
    pl.seed_everything(seed, verbose=False)
    dm = PreferenceDataModule(max_length=args.max_length, batch_size=args.batch_size, val_split=0.1,
                              max_val_samples=args.val_pairs, seed=0, min_prompt_length=args.max_length // 2)
    module = PreferenceModule(learning_rate=args.lr, peft=LORA, num_hidden_layers=getattr(args, "layers", None))
    callbacks = [TokenDPO(beta=args.beta, aggregation=args.aggregation)]
    if weights:
        callbacks.insert(0, CachedWeights(weights))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - t0
    train = {k.split("/")[-1]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("lit_ft/")}
    val_trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=callbacks)
    (val,) = val_trainer.validate(module, datamodule=dm, verbose=False)
    return {"seed": seed, "weights": weights, "steps": args.steps, "train_s": round(train_s, 1),
            "last_train": train, "val_loss": val["val/loss"], "val_accuracy": val["val/accuracy"],
            "val_margin": val["val/margin"], "val_pairs": len(dm._examples("val"))}


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
    p.add_argument("--weights", default=None, help="per-token weights cache (adds the critical-token rows)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "token_dpo_quality.json"))
    args = p.parse_args()
    rows = []
    for label, weights in [("plain DPO", None)] + ([("critical-token weights", args.weights)] if args.weights else []):
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(seed, args, weights)
            r["row"] = label
            rows.append(r)
            print(json.dumps(r), flush=True)
            os.makedirs(os.path.dirname(args.out), exist_ok=True)
            with open(args.out, "w") as f:  # after every row: a run cut short keeps what it measured
                json.dump({"config": vars(args), "rows": rows}, f, indent=1)
    print(f"\nSmolLM2-135M-Instruct, LoRA r16 (all projections), {args.steps} steps x {args.batch_size} pairs, "
          f"max_length {args.max_length}, lr {args.lr}, beta {args.beta}, aggregation={args.aggregation}; "
          f"held-out pairs: {rows[0]['val_pairs']}\n")
    print("| row | seed | held-out accuracy | held-out margin | held-out loss | last-step train accuracy | train s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['seed']} | {r['val_accuracy']:.3f} | {r['val_margin']:.4f} | {r['val_loss']:.4f} | "
              f"{r['last_train'].get('accuracy', float('nan')):.2f} | {r['train_s']} |")


if __name__ == "__main__":
    main()
