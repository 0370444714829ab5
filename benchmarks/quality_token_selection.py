"""Quality study of the token selection / weighting family on real data (a benchmark, not a test).

Fine-tunes the real SmolLM2-135M-Instruct on ASDiv math word problems (lit_ft assets, fetched from PyPI) with the
same seed, steps, data order and evaluation set for: plain SFT, ExcessLossSelection, SSToken, QTuning (25% samples x
50% tokens, the paper's setting), MaskedThought and KeyTokenWeighting (key tokens = the answer's digits). Reports held-out completion loss, exact match (greedy, last
number), lm_head tokens back-propagated, and wall time vs plain SFT (= step-time overhead), as a markdown table and a
PNG plot. The evaluation before training is the same model for every run, so it is computed once.

    python benchmarks/quality_token_selection.py --steps 80 --eval-samples 200 \
        --out docs/quality_token_selection.md --plot docs/img/quality_token_selection.png
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import lightning.pytorch as pl

import lit_ft.callbacks as cbs
from lit_ft.data import SFTDataModule
from lit_ft.modules import CausalLMModule

#: name -> factory of the technique's callbacks (empty for plain SFT)
TECHNIQUES: dict[str, Callable[[], list[pl.Callback]]] = {
    "plain SFT": lambda: [],
    # the measured rows used the initial weights as reference (the old default): the named self-reference mode, not
    # Rho-1 (which needs a reference trained on clean data first: configs/rho1/)
    "ExcessLossSelection(keep_ratio=0.6)": lambda: [cbs.ExcessLossSelection(keep_ratio=0.6, reference="initial")],
    "SSToken(keep_ratio=0.6, gamma=0.5)": lambda: [cbs.SSToken()],
    "QTuning(sample_ratio=0.25, token_ratio=0.5)": lambda: [cbs.QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every_n_steps=0)],
    "MaskedThought(max_rate=0.4)": lambda: [cbs.MaskedThought(max_rate=0.4)],
    # key tokens on ASDiv = the answer's digits (the DataModule marks them, see DATA_OPTIONS)
    "KeyTokenWeighting(w_max=9, key = answer digits)": lambda: [cbs.KeyTokenWeighting(w_max=9.0)],
}

#: extra SFTDataModule options a technique needs
DATA_OPTIONS: dict[str, dict[str, Any]] = {
    "KeyTokenWeighting(w_max=9, key = answer digits)": {"key_span_patterns": [r"\d+"]},
}


class _Meter(pl.Callback):
    """Counts kept target tokens that reach the loss, and times training steps (excluding evaluation and the
    first ``skip`` warm-up steps)."""

    def __init__(self, skip: int = 0) -> None:
        self.tokens = 0.0
        self.step_time = 0.0
        self.timed = 0
        self.skip = skip
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        if batch_idx >= self.skip:
            self.step_time += time.perf_counter() - self._t0
            self.timed += 1
        self.tokens += float(trainer.callback_metrics.get("train/tokens", 0.0))


def _datamodule(args: argparse.Namespace, **extra: Any) -> SFTDataModule:
    return SFTDataModule(data="asdiv", tokenizer="smollm2-135m-instruct", max_length=256, batch_size=args.batch_size,
                         eval_batch_size=16, max_val_samples=args.eval_samples, seed=args.seed, **extra)


def _module(args: argparse.Namespace, before: bool) -> CausalLMModule:
    return CausalLMModule(model="smollm2-135m-instruct", learning_rate=args.lr, warmup_steps=5,
                          eval_exact_match=args.eval_samples, max_new_tokens=16, eval_before_training=before)


def run(name: str, make: Callable[[], list[pl.Callback]], args: argparse.Namespace, before: bool) -> dict[str, Any]:
    pl.seed_everything(args.seed, verbose=False)
    module = _module(args, before)
    meter = _Meter()
    # the meter is the first callback, so batch editors' and scorers' own work counts in the step time
    trainer = pl.Trainer(max_steps=args.steps, val_check_interval=args.steps, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         log_every_n_steps=1, callbacks=[meter, *make()])
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=_datamodule(args, **DATA_OPTIONS.get(name, {})))
    m = trainer.callback_metrics
    row: dict[str, Any] = {
        "name": name,
        "loss_after": float(m["val/loss"]),
        "em_after": float(m.get("val/exact_match", float("nan"))),
        "tokens": meter.tokens,
        "step_s": meter.step_time / max(meter.timed, 1),
        "wall_s": time.perf_counter() - t0,
    }
    row.update(module.eval_history.get("before", {}))
    print(f"[{name}] {row}", flush=True)
    return row


def timing(names: list[str], args: argparse.Namespace) -> list[tuple[str, float]]:
    """Step time only (no evaluation): ``--timing-steps`` steps per technique, the first 2 not timed, one process.
    Meant for a quiet machine, separately from the quality runs."""
    out = []
    for name in names:
        pl.seed_everything(args.seed, verbose=False)
        module = _module(args, before=False)
        module.hparams.eval_exact_match = 0
        meter = _Meter(skip=2)
        trainer = pl.Trainer(max_steps=args.timing_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[meter, *TECHNIQUES[name]()])
        trainer.fit(module, datamodule=_datamodule(args, **DATA_OPTIONS.get(name, {})))
        out.append((name, meter.step_time / max(meter.timed, 1)))
        print(f"[timing] {name}: {out[-1][1]:.2f} s/step", flush=True)
    base = out[0][1]
    print("| technique | step time | vs plain |\n|---|---|---|")
    for name, t in out:
        print(f"| {name} | {t:.2f} s | {t / base:.2f}x |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", type=str, default=None, help="comma-separated subset of technique names (prefix match)")
    p.add_argument("--out", type=str, default=None, help="write the markdown table here")
    p.add_argument("--plot", type=str, default=None, help="write a PNG plot here")
    p.add_argument("--timing-steps", type=int, default=0,
                   help="instead of the quality runs, time this many training steps per technique (no evaluation)")
    args = p.parse_args()
    names = list(TECHNIQUES)
    if args.only:
        wanted = [w.strip() for w in args.only.split(",")]
        names = [n for n in names if any(n.startswith(w) for w in wanted)]
    if args.timing_steps:
        timing(names, args)
        return
    rows = []
    t_all = time.perf_counter()
    for i, name in enumerate(names):
        rows.append(run(name, TECHNIQUES[name], args, before=(i == 0)))
    total = time.perf_counter() - t_all
    before = rows[0]
    base = next((r for r in rows if r["name"] == "plain SFT"), rows[0])
    lines = [
        f"SmolLM2-135M-Instruct (full fine-tuning, fp32) on ASDiv: {args.steps} steps x batch {args.batch_size}, "
        f"AdamW lr {args.lr}, 5 warm-up steps, seed {args.seed}, same data order for every run; held-out = "
        f"{args.eval_samples} asdiv-val rows (completion loss; exact match of the last number in a greedy "
        "16-token answer). Before training (same for all): "
        f"loss {before.get('val_before/loss', float('nan')):.4f}, exact match "
        f"{before.get('val_before/exact_match', float('nan')):.3f}. Whole table: {total / 60:.1f} min on this machine.",
        "",
        "| technique | val loss after | exact match after | lm_head tokens back-propagated | step time | step time vs plain |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['loss_after']:.4f} | {r['em_after']:.3f} | {r['tokens']:.0f} "
            f"({r['tokens'] / max(base['tokens'], 1):.2f}x) | {r['step_s']:.2f} s | {r['step_s'] / base['step_s']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
    if args.plot:
        _plot(rows, args.plot)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    from pathlib import Path

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [r["name"].split("(")[0] for r in rows]
    fig = Figure(figsize=(11, 3.4))
    FigureCanvasAgg(fig)
    panels = (("val loss after (lower is better)", "loss_after"), ("exact match after", "em_after"),
              ("step time vs plain", None))
    base = rows[0]["step_s"]
    for i, (title, key) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        vals = [r[key] if key else r["step_s"] / base for r in rows]
        ax.bar(range(len(rows)), vals, color=["#888"] + ["#3a7"] * (len(rows) - 1))
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
