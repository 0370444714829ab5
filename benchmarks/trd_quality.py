"""Benchmark: token relation distillation (TRD, MiniLM teacher) vs plain SFT — held-out loss on alpaca-en-demo after a
short full fine-tune of SmolLM2-135M-Instruct on CPU, two seeds.

Rows per seed: "SFT" (CausalLMModule alone) and "SFT + TRD" (TokenRelationDistillation with its defaults: layer 12,
margin 0.1, weight 0.5, MiniLM-L6 teacher; projector lr ``--projector-lr``). The seed picks the held-out split and the training
order; both arms of a seed see the same batches in the same order (Δ is paired). Reported: the held-out token loss (before
training once, then per run), the TRD term's mean over the first and the last 4 steps (does the relation
structure move toward the teacher's?) and the step time. A small CPU regime: ``--steps`` steps of ``--batch-size`` rows of at most
``--max-length`` tokens, ``--val-samples`` held-out rows; see the defaults.

    OMP_NUM_THREADS=2 python benchmarks/trd_quality.py
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

from lit_ft.callbacks import TokenRelationDistillation  # noqa: E402
from lit_ft.data import SFTDataModule  # noqa: E402
from lit_ft.modules import CausalLMModule  # noqa: E402

NAME = "token_relation_distillation"


class Trace(pl.Callback):
    """Per-step wall time and the logged TRD term."""

    def __init__(self) -> None:
        self.trd: list[float] = []
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.append(time.perf_counter() - self._t0)
        v = trainer.callback_metrics.get(f"lit_ft/{NAME}/loss")
        if v is not None:
            self.trd.append(float(v))


def datamodule(args, seed: int) -> SFTDataModule:
    # the seed picks the held-out split and the training order: without it a pretrained model without dropout
    # trains identically under every seed
    return SFTDataModule(data="alpaca-en-demo", max_length=args.max_length, batch_size=args.batch_size,
                         max_val_samples=args.val_samples, seed=seed)


def validate(module, args, seed: int) -> float:
    t = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (val,) = t.validate(module, datamodule=datamodule(args, seed), verbose=False)
    return float(val["val/loss"])


def run(seed: int, arm: str, args) -> dict:
    pl.seed_everything(seed, verbose=False)
    module = CausalLMModule(learning_rate=args.lr)
    trace = Trace()
    callbacks: list[pl.Callback] = [trace]
    if arm == "trd":
        callbacks.insert(0, TokenRelationDistillation(projector_lr=args.projector_lr))
    trainer = pl.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                         num_sanity_val_steps=0, callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=datamodule(args, seed))
    train_s = time.perf_counter() - t0
    steady = trace.times[2:] or trace.times
    return {"seed": seed, "arm": arm, "steps": args.steps, "train_s": round(train_s, 1),
            "step_s": sum(steady) / len(steady), "val_loss": validate(module, args, seed),
            # means over the first and last 4 steps (single steps differ by batch)
            "trd_first": sum(trace.trd[:4]) / len(trace.trd[:4]) if trace.trd else None,
            "trd_last": sum(trace.trd[-4:]) / len(trace.trd[-4:]) if trace.trd else None,
            "trd_trace": trace.trd}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--val-samples", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--projector-lr", type=float, default=1e-3)
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "trd_quality.json"))
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    seeds = [int(s) for s in args.seeds.split(",")]
    before = {seed: validate(CausalLMModule(), args, seed) for seed in seeds}
    print(json.dumps({"val_loss_before": before}), flush=True)
    rows = []
    for seed in seeds:
        for arm in ("sft", "trd"):
            r = run(seed, arm, args)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "trd_trace"}), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"config": vars(args), "val_loss_before": before, "rows": rows}, f, indent=1)
    print(f"\nSmolLM2-135M-Instruct, full fine-tune, alpaca-en-demo, {args.steps} steps x {args.batch_size} rows, "
          f"max_length {args.max_length}, lr {args.lr} (projector {args.projector_lr}); held-out loss before "
          f"training per seed: {', '.join(f'{v:.4f}' for v in before.values())} ({args.val_samples} rows)\n")
    print("| seed | arm | held-out loss | Δ vs SFT | TRD term, first 4 → last 4 steps | step time | time ratio |")
    print("|---|---|---|---|---|---|---|")
    by = {(r["seed"], r["arm"]): r for r in rows}
    for r in rows:
        base = by[(r["seed"], "sft")]
        trd = "—" if r["trd_first"] is None else f"{r['trd_first']:.4f} → {r['trd_last']:.4f}"
        print(f"| {r['seed']} | {'SFT + TRD' if r['arm'] == 'trd' else 'SFT'} | {r['val_loss']:.4f} | "
              f"{r['val_loss'] - base['val_loss']:+.4f} | {trd} | {r['step_s']:.2f} s | "
              f"{r['step_s'] / base['step_s']:.2f}x |")


if __name__ == "__main__":
    main()
