"""Parameter techniques on the whole 30-layer model: ASDiv gain and forgetting (a benchmark, not a test; issue 12's
second study).

The real SmolLM2-135M-Instruct (all 30 decoder layers, real weights), fine-tuned on a subset of ASDiv for a few
epochs so that the techniques that re-select per epoch (GreenTrainer every 2 epochs, HalfFineTuning every epoch)
re-select as their papers do. Per arm, with the same seed, steps, data order and evaluation:

* ASDiv gain: held-out completion loss and exact match on ``--eval-samples`` asdiv-val rows, against the untrained
  model (the ``base model`` row);
* forgetting: :class:`~lit_ft.callbacks.ForgettingMonitor` on Alpaca-demo (a general instruction set the run does
  not train on): held-out loss at fit start and after training, and their ratio (> 1 = forgetting);
* cost: trainable fraction, mean step time, one forward + backward's FLOPs **on the trained path** (the module's
  ``training_step`` through lit-ft's fused loss, counted by ``lit_ft.core.flops.measured_step``, at the final
  trainability), optimizer-state bytes.

Arms: full fine-tuning, PEFT LoRA (r 16 on every linear, lr 2e-4), HalfFineTuning, GreenTrainer at rho 0.3 / 0.5 /
0.7, LotteryTicketSparseFT, LocalizedTuning and FreezeLayers, every technique at its defaults.

Each row is cached under ``--cache`` (default ``runs/bench/param_forgetting/``) as soon as it finishes, keyed by the
arguments that change it, so an interrupted study resumes and a rerun only renders (``--force`` reruns). Writes
``benchmarks/results/param_forgetting.json`` (with the markdown table) and, with ``--plot``, a PNG.

    python benchmarks/param_forgetting.py --seeds 0 --plot docs/img/param_forgetting.png
    python benchmarks/param_forgetting.py --steps 2 --train-rows 16 --eval-samples 4 --forget-samples 4 \\
        --cache /tmp/pf --no-results --exact-match 0  # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402

import lit_ft.callbacks as cbs  # noqa: E402
from benchmarks._row_cache import add_cache_arguments, cached_rows, write_results  # noqa: E402
from benchmarks.param_selection import _flops, _optimizer_bytes, _StepTimer, _trainable_fraction  # noqa: E402
from lit_ft.data import SFTDataModule  # noqa: E402
from lit_ft.modules import CausalLMModule  # noqa: E402

MODEL = "smollm2-135m-instruct"
#: the forgetting tasks: a general instruction set (the study's main measure) and ForgettingMonitor's two other
#: default tasks, which the analysis-family study found more sensitive (benchmarks/analysis_family.py)
FORGET_TASKS = ("alpaca-en-demo", "sarcasm-val", "bbcnews")
LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}

#: arm -> (callbacks factory, module options besides the shared ones; "lr" overrides --lr)
ARMS: dict[str, tuple[Callable[[], list[pl.Callback]], dict[str, Any]]] = {
    "full fine-tuning": (lambda: [], {}),
    "LoRA (PEFT, r 16, all linear, lr 2e-4)": (lambda: [], {"peft": LORA, "lr": 2e-4}),
    "HalfFineTuning": (lambda: [cbs.HalfFineTuning()], {}),
    "GreenTrainer(rho=0.3)": (lambda: [cbs.GreenTrainer(rho=0.3)], {}),
    "GreenTrainer(rho=0.5)": (lambda: [cbs.GreenTrainer(rho=0.5)], {}),
    "GreenTrainer(rho=0.7)": (lambda: [cbs.GreenTrainer(rho=0.7)], {}),
    "LotteryTicketSparseFT": (lambda: [cbs.LotteryTicketSparseFT()], {}),
    "LocalizedTuning": (lambda: [cbs.LocalizedTuning()], {}),
    "FreezeLayers": (lambda: [cbs.FreezeLayers()], {}),
}


def _datamodule(args: argparse.Namespace, seed: int) -> SFTDataModule:
    return SFTDataModule(data="asdiv", val_data="asdiv-val", tokenizer=MODEL, max_length=256,
                         batch_size=args.batch_size, eval_batch_size=16, max_train_samples=args.train_rows,
                         max_val_samples=args.eval_samples, seed=seed)


def _trainer(steps: int, callbacks: list[pl.Callback], root: str) -> pl.Trainer:
    # one validation, after the last step (several epochs: the interval counts steps across epochs)
    return pl.Trainer(default_root_dir=root, max_steps=steps, val_check_interval=steps, check_val_every_n_epoch=None, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)


def _monitor(args: argparse.Namespace) -> pl.Callback:
    return cbs.ForgettingMonitor(tasks=list(FORGET_TASKS), max_samples=args.forget_samples, plot=False)


def _module(args: argparse.Namespace, options: dict[str, Any]) -> CausalLMModule:
    return CausalLMModule(model=MODEL, learning_rate=options.get("lr", args.lr), weight_decay=0.01, warmup_steps=5,
                          peft=options.get("peft"), eval_exact_match=args.exact_match, max_new_tokens=16,
                          eval_before_training=False)


def base_row(args: argparse.Namespace) -> dict[str, Any]:
    """The untrained model on ASDiv (held-out loss / exact match). Its forgetting-task loss is every arm's
    ``forget_before`` (the monitor's fit-start measurement on the same starting weights)."""
    pl.seed_everything(0, verbose=False)
    trainer = _trainer(1, [], tempfile.mkdtemp(prefix="lit_ft_pf_"))
    metrics = trainer.validate(_module(args, {}), datamodule=_datamodule(args, 0), verbose=False)[0]
    return {"name": "base model (no training)", "seed": 0, "loss": float(metrics["val/loss"]),
            "exact_match": float(metrics.get("val/exact_match", float("nan"))), "trainable": 0.0, "step_s": 0.0,
            "flops_total": 0.0, "flops_bwd": 0.0, "opt_bytes": 0}


def run_arm(name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    make, options = ARMS[name]
    pl.seed_everything(seed, verbose=False)
    module = _module(args, options)
    timer, monitor = _StepTimer(), _monitor(args)
    root = tempfile.mkdtemp(prefix="lit_ft_pf_")  # LT-SFT exports its diff under the root
    trainer = _trainer(args.steps, [timer, monitor, *make()], root)
    dm = _datamodule(args, seed)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    m = trainer.callback_metrics
    fwd, total = _flops(trainer, module, next(iter(dm.train_dataloader())))
    return {"name": name, "seed": seed, "loss": float(m["val/loss"]),
            "exact_match": float(m.get("val/exact_match", float("nan"))),
            "forget_before": {t: float(monitor.baseline["plain"][f"{t}/loss"]) for t in FORGET_TASKS},
            "forget_after": {t: float(m[f"lit_ft/forgetting_monitor/{t}/loss"]) for t in FORGET_TASKS},
            "trainable": _trainable_fraction(module),
            "step_s": timer.total / max(timer.n, 1), "flops_total": total, "flops_bwd": total - fwd,
            "opt_bytes": _optimizer_bytes(trainer), "wall_s": wall}


def _key(args: argparse.Namespace, *extra: Any) -> str:
    fields = (args.steps, args.batch_size, args.lr, args.eval_samples, args.train_rows, args.forget_samples,
              args.exact_match, *extra)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:12]


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_arm.setdefault(r["name"], []).append(r)
    full = by_arm.get("full fine-tuning", [])

    def mean(rs: list[dict[str, Any]], k: str) -> float:
        return statistics.mean(r[k] for r in rs)

    full_by_seed = {r["seed"]: r for r in full}

    def vs_full(rs: list[dict[str, Any]], k: str) -> float:
        """Mean over seeds of the ratio to full fine-tuning's row of the same seed (same data order, so the same
        batches are counted; an arm with one seed is compared with that seed only)."""
        ratios = [r[k] / full_by_seed[r["seed"]][k] for r in rs if r["seed"] in full_by_seed]
        return statistics.mean(ratios) if ratios else float("nan")
    epochs = args.steps * args.batch_size / args.train_rows
    lines = [
        f"SmolLM2-135M-Instruct, all 30 layers, real weights; {args.train_rows} ASDiv rows, {args.steps} steps x batch "
        f"{args.batch_size} ({epochs:.1f} epochs), AdamW lr {args.lr} (LoRA 2e-4), weight decay 0.01, 5 warm-up steps, "
        f"seeds {args.seeds}. ASDiv: {args.eval_samples} held-out asdiv-val rows (loss; exact match on the first "
        f"{args.exact_match}). Forgetting: ForgettingMonitor, {args.forget_samples} rows of each of "
        f"{', '.join(FORGET_TASKS)}: held-out loss after / before (> 1 = forgetting; Alpaca's "
        "loss itself shown). FLOPs: one forward + backward of the trained path at the final trainability. Every "
        "technique at its defaults.",
        "",
        "| arm | trainable | ASDiv loss | ASDiv exact match | Alpaca loss (after / before) | sarcasm loss ratio "
        "| BBC loss ratio | step time (x full) | fwd+bwd FLOPs (x full) | optimizer state |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    arms = [r for r in rows if "forget_before" in r]
    for r in by_arm.get("base model (no training)", []):  # the arms' fit-start measurement of the same weights
        r["forget_before"] = r["forget_after"] = {
            t: statistics.mean(a["forget_before"][t] for a in arms) if arms else float("nan") for t in FORGET_TASKS}
    for name, rs in by_arm.items():
        per = ", ".join(f"{r['loss']:.3f}" for r in sorted(rs, key=lambda r: r["seed"]))
        ratio = {t: statistics.mean(r["forget_after"][t] / r["forget_before"][t] for r in rs) for t in FORGET_TASKS}
        alpaca = statistics.mean(r["forget_after"][FORGET_TASKS[0]] for r in rs)
        step = mean(rs, "step_s")
        cost = (f"{step:.2f} s ({vs_full(rs, 'step_s'):.2f}x) | {mean(rs, 'flops_total') / 1e9:.1f} G "
                f"({vs_full(rs, 'flops_total'):.2f}x) | {mean(rs, 'opt_bytes') / 2**20:.0f} MiB"
                if step > 0 else "— | — | —")
        # an arm with fewer seeds than asked (an interrupted run published as it stands) says which one it has
        partial = len(rs) < len(args.seeds.split(",")) and name != "base model (no training)"
        seeds_note = f" ({per})" if len(rs) > 1 else f" (seed {rs[0]['seed']} only)" if partial else ""
        lines.append(f"| {name} | {mean(rs, 'trainable'):.1%} | {mean(rs, 'loss'):.4f}"
                     f"{seeds_note} | {mean(rs, 'exact_match'):.3f} | "
                     f"{alpaca:.4f} ({ratio[FORGET_TASKS[0]]:.3f}x) | {ratio[FORGET_TASKS[1]]:.3f}x | "
                     f"{ratio[FORGET_TASKS[2]]:.3f}x | {cost} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["name"] for r in rows))
    fig = Figure(figsize=(8.5, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^vP*Xh<>"
    for i, n in enumerate(names):  # a legend, not labels beside the points: the good arms sit close together
        rs = [r for r in rows if r["name"] == n]
        x = statistics.mean(r["forget_after"][t] / r["forget_before"][t] for r in rs for t in FORGET_TASKS)
        y = statistics.mean(r["loss"] for r in rs)
        ax.plot(x, y, markers[i % len(markers)], color=f"C{i % 10}", markersize=7, label=n)
    ax.set_yscale("log")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_xlabel("forgetting: held-out loss after / before, mean over Alpaca, sarcasm, BBC (lower is better)",
                  fontsize=8)
    ax.set_ylabel("ASDiv held-out loss (lower is better)", fontsize=8)
    ax.set_title("Parameter techniques, whole SmolLM2-135M: gain vs forgetting", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--train-rows", type=int, default=240, help="ASDiv training rows (steps x batch / rows = epochs)")
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--exact-match", type=int, default=100, help="held-out rows scored by greedy exact match (0 = off)")
    p.add_argument("--forget-samples", type=int, default=48, help="rows of each forgetting task")
    p.add_argument("--seeds", type=str, default="0")
    add_cache_arguments(p, os.path.join(REPO, "runs", "bench", "param_forgetting"))
    args = p.parse_args(argv)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    base_path = cache / f"base_{_key(args)}.json"
    if base_path.is_file() and not args.force:
        rows.append(json.loads(base_path.read_text()))
    else:
        rows.append(base_row(args))
        base_path.write_text(json.dumps(rows[-1]))
        print(f"[base] {rows[-1]}", flush=True)
    rows += cached_rows(args, list(ARMS), lambda name, seed: _key(args, name, seed),
                        lambda name, seed: run_arm(name, args, seed))
    md = table(rows, args)
    print(md)
    write_results(REPO, "param_forgetting", args, rows, md)
    if args.plot:
        _plot(rows, args.plot)


if __name__ == "__main__":
    main()
