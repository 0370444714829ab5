"""Gradient tensor selection / parameter reset techniques vs full fine-tuning, in one process (a benchmark, not a
test).

Model: the real SmolLM2-135M-Instruct truncated to its first 4 decoder layers (real weights, tied embeddings) —
tiny enough for 2 CPU cores, realistic in shapes. Data: ASDiv (lit_ft assets). Each run: same seed, steps, data
order; AdamW. Reported per technique, as ratios to full fine-tuning where it makes sense:

* step time (mean over the training steps, callbacks' own work included);
* forward+backward FLOPs of one training step with the final trainability, on the path the run trained (the
  module's ``training_step`` through lit_ft's fused loss, counted by ``lit_ft.core.flops.measured_step``), and the
  backward part alone (total - forward);
* optimizer-state memory (bytes of every optimizer state tensor after training);
* trainable fraction (parameters with ``requires_grad``; element masks counted by their kept entries);
* held-out completion loss after the fixed number of steps.

    python benchmarks/param_selection.py --steps 60 --layers 4 --out docs/param_selection.md
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import lightning.pytorch as pl
import torch

import lit_ft.callbacks as cbs
from lit_ft.callbacks._param_plan import param_plans_for
from lit_ft.core.flops import measured_step
from lit_ft.core.step_probe import probe_loss
from lit_ft.data import SFTDataModule
from lit_ft.modules import CausalLMModule


def _techniques(steps: int) -> dict[str, Callable[[], list[pl.Callback]]]:
    half = max(1, steps // 2)
    t: dict[str, Callable[[], list[pl.Callback]]] = {"full fine-tuning": lambda: []}
    optional = {
        "GreenTrainer(rho=0.5)": lambda: [cbs.GreenTrainer(rho=0.5)],
        "HalfFineTuning(defaults: ratio 0.5 of each layer's matrices)": lambda: [cbs.HalfFineTuning()],
        f"LotteryTicketSparseFT(1%, phase 1 = {half} steps)": lambda: [cbs.LotteryTicketSparseFT(phase1_steps=half)],
        "FreezeLayers(2 lower + embeddings)": lambda: [cbs.FreezeLayers(num_layers=2)],
        "LayerwiseLRDecay(0.9)": lambda: [cbs.LayerwiseLRDecay(decay=0.9)],
        "ReinitTopLayers(1)": lambda: [cbs.ReinitTopLayers(num_layers=1)],
        "TrainOnly(embeddings_and_head)": lambda: [cbs.TrainOnly(preset="embeddings_and_head")],
        "TrainOnly(last_layers, k=1)": lambda: [cbs.TrainOnly(preset="last_layers", last_k=1)],
        "LocalizedTuning(defaults: one mid/upper layer's down_proj)": lambda: [cbs.LocalizedTuning()],
    }
    for name, make in optional.items():
        cls = name.split("(")[0]
        if hasattr(cbs, cls):
            t[name] = make
        else:
            print(f"(skipping {cls}: not in lit_ft.callbacks)")
    return t


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        self.total += time.perf_counter() - self._t0
        self.n += 1


def _flops(trainer: pl.Trainer, module: CausalLMModule, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(forward, forward+backward) FLOPs of one step on the path the run trained: the module's own
    ``training_step`` (lit_ft's fused loss, which skips the lm_head rows of unsupervised tokens, counted by the
    shared FLOPs service's formulas for the fused op), with the trainability the technique left in place."""
    batch = module.transfer_batch_to_device(batch, module.device, 0)
    module.zero_grad(set_to_none=True)
    with measured_step() as fwd:
        loss = probe_loss(trainer, module, batch, "benchmarks/param_selection.py")
    with measured_step() as bwd:
        loss.backward()
    module.zero_grad(set_to_none=True)
    return fwd.total, fwd.total + bwd.total


def _trainable_fraction(module: torch.nn.Module) -> float:
    reg = param_plans_for(module, create=False)
    total = sum(p.numel() for p in module.parameters())
    if reg is not None and reg.composed is not None:
        from lit_ft.core.params import apply_plan

        return float(apply_plan(module, reg.composed, unlisted="keep").fraction)
    return sum(p.numel() for p in module.parameters() if p.requires_grad) / total


def _optimizer_bytes(trainer: pl.Trainer) -> int:
    return sum(
        t.numel() * t.element_size()
        for opt in trainer.optimizers for st in opt.state.values() for t in st.values() if torch.is_tensor(t)
    )


def run(name: str, make: Callable[[], list[pl.Callback]], args: argparse.Namespace) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    dm = SFTDataModule(data="asdiv", tokenizer="smollm2-135m-instruct", max_length=256, batch_size=args.batch_size,
                       eval_batch_size=16, max_val_samples=args.eval_samples, seed=args.seed)
    module = CausalLMModule(model="smollm2-135m-instruct", num_hidden_layers=args.layers, learning_rate=args.lr,
                            weight_decay=0.01)
    timer = _StepTimer()
    import tempfile

    trainer = pl.Trainer(max_steps=args.steps, val_check_interval=args.steps, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tempfile.mkdtemp(prefix="lit_ft_bench_"),  # LT-SFT exports its diff there
                         callbacks=[timer, *make()])
    trainer.fit(module, datamodule=dm)
    batch = next(iter(dm.train_dataloader()))
    fwd, total = _flops(trainer, module, batch)
    row = {
        "name": name,
        "step_s": timer.total / max(timer.n, 1),
        "flops_total": total,
        "flops_bwd": total - fwd,
        "opt_bytes": _optimizer_bytes(trainer),
        "trainable": _trainable_fraction(module),
        "val_loss": float(trainer.callback_metrics["val/loss"]),
    }
    print(f"[{name}] {row}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=str, default=None)
    args = p.parse_args()
    rows = [run(name, make, args) for name, make in _techniques(args.steps).items()]
    base = rows[0]
    lines = [
        f"SmolLM2-135M-Instruct, first {args.layers} decoder layers (real weights), on ASDiv: {args.steps} steps x "
        f"batch {args.batch_size}, AdamW lr {args.lr}, weight decay 0.01, seed {args.seed}; held-out loss on "
        f"{args.eval_samples} asdiv-val rows. FLOPs: one forward+backward of the trained path (fused loss) at the final "
        "trainability.",
        "",
        "| technique | trainable | step time (x full) | fwd+bwd FLOPs (x full) | backward FLOPs (x full) | optimizer state | val loss |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['trainable']:.1%} | {r['step_s']:.2f} s ({r['step_s'] / base['step_s']:.2f}x) | "
            f"{r['flops_total'] / 1e9:.1f} G ({r['flops_total'] / base['flops_total']:.2f}x) | "
            f"{r['flops_bwd'] / 1e9:.1f} G ({r['flops_bwd'] / base['flops_bwd']:.2f}x) | "
            f"{r['opt_bytes'] / 2**20:.0f} MiB | {r['val_loss']:.4f} |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
