"""Prompt methods at their papers' rates (a benchmark, not a test; issue 12's third study).

Every prompt technique constructed with its defaults — the paper's or the authors' code's prompt length, init and
learning rates (see each doc page) — on the real, frozen SmolLM2-135M-Instruct (30 layers), sarcasm headlines with a
verbalizer head (label words no/No vs yes/Yes at the answer position, ``VerbalizerClassificationModule``), beside
full fine-tuning (PET: verbalizer, whole LM at 3e-5) and PEFT LoRA (r 16 on every linear with a linear
classification head, ``ClassificationModule``, lr 5e-4). PTEC brings its own classification head
(``ClassificationModule``). Same steps, data order and held-out headlines for every arm and seed; accuracy and
loss on the held-out rows.

The only non-default arguments: DePT/EPT's ``max_length`` (the data's row length, a shape, not a rate). IAPT's
learning rate is unresolved in the paper and code (its default ``None`` = the module's rate: 5e-3 here, the rate
of the frozen verbalizer rows, which train nothing else).

Each row is cached under ``--cache`` (default ``runs/bench/prompt_rates/``) as soon as it finishes, so an
interrupted study resumes and a rerun only renders (``--force`` reruns). Writes
``benchmarks/results/prompt_rates.json`` (with the markdown table) and, with ``--plot``, a PNG.

    python benchmarks/prompt_rates.py --seeds 0,1 --plot docs/img/prompt_rates.png
    python benchmarks/prompt_rates.py --steps 2 --eval-samples 8 --seeds 0 --cache /tmp/pr --no-results  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402

import lit_ft.callbacks as cbs  # noqa: E402
from benchmarks._row_cache import add_cache_arguments, bar_plot, cached_rows, write_results  # noqa: E402
from benchmarks.prompts import ACC_MAX_LENGTH, TEMPLATE, _sarcasm  # noqa: E402

MODEL = "smollm2-135m-instruct"
FROZEN_MODULE_LR = 5e-3  # trains nothing but IAPT's generators (IAPT's rate default: the module's)
LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}

#: arm -> (module kind, callback factory or None, module learning rate). Kinds: "verbalizer" = frozen SmolLM2 +
#: verbalizer head; "verbalizer-lm" = the same with the LM trainable; "classifier" = SmolLM2 + a linear head.
ARMS: dict[str, tuple[str, Callable[[], pl.Callback] | None, float, dict[str, Any] | None]] = {
    "zero-shot (frozen, no prompt)": ("verbalizer", None, FROZEN_MODULE_LR, None),
    "PromptTuning": ("verbalizer", lambda: cbs.PromptTuning(), FROZEN_MODULE_LR, None),
    "DePT": ("verbalizer", lambda: cbs.DePT(max_length=ACC_MAX_LENGTH), FROZEN_MODULE_LR, None),
    "EPT": ("verbalizer", lambda: cbs.EPT(max_length=ACC_MAX_LENGTH), FROZEN_MODULE_LR, None),
    "PrefixTuning": ("verbalizer", lambda: cbs.PrefixTuning(), FROZEN_MODULE_LR, None),
    "IAPT": ("verbalizer", lambda: cbs.IAPT(), FROZEN_MODULE_LR, None),
    "PTEC (own classification head)": ("classifier", lambda: cbs.PTEC(), 1e-3, None),
    "ProMoT (stage 2: the LM at 3e-5)": ("verbalizer-lm", lambda: cbs.ProMoT(), 3e-5, None),
    "full fine-tuning (PET verbalizer, lr 3e-5)": ("verbalizer-lm", None, 3e-5, None),
    "LoRA (PEFT r 16, linear head, lr 5e-4)": ("classifier", None, 5e-4, LORA),
}


def _module(kind: str, lr: float, peft: dict[str, Any] | None, seed: int) -> pl.LightningModule:
    from lit_ft.modules import ClassificationModule, VerbalizerClassificationModule

    if kind == "classifier":
        return ClassificationModule(model=MODEL, num_labels=2, learning_rate=lr, peft=peft)
    return VerbalizerClassificationModule(
        model=MODEL, label_words=[["no", "No"], ["yes", "Yes"]], calibration_samples=0,
        freeze_backbone=kind == "verbalizer", trainable_word_weights=False, learning_rate=lr, seed=seed)


def run_arm(name: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    kind, factory, lr, peft = ARMS[name]
    pl.seed_everything(seed, verbose=False)
    module = _module(kind, lr, peft, seed)
    data_args = argparse.Namespace(batch_size=args.batch_size, eval_samples=args.eval_samples, seed=seed)
    dm = _sarcasm(data_args)
    common = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu", num_sanity_val_steps=0, default_root_dir=str(Path(args.cache)))
    t0 = time.perf_counter()
    if factory is None and kind == "verbalizer":  # zero-shot: the frozen model as it is
        metrics = pl.Trainer(**common).validate(module, datamodule=dm, verbose=False)[0]
        acc, loss, trainable = metrics["val/acc"], metrics["val/loss"], 0
    else:
        callbacks = [factory()] if factory is not None else []
        trainer = pl.Trainer(max_steps=args.steps, val_check_interval=args.steps, callbacks=callbacks, **common)
        trainer.fit(module, datamodule=dm)
        acc, loss = trainer.callback_metrics["val/acc"], trainer.callback_metrics["val/loss"]
        trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"name": name, "seed": seed, "acc": float(acc), "loss": float(loss), "trainable": int(trainable),
            "wall_s": time.perf_counter() - t0}


def _key(args: argparse.Namespace, *extra: Any) -> str:
    fields = (args.steps, args.batch_size, args.eval_samples, *extra)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:12]


def table(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_arm.setdefault(r["name"], []).append(r)
    lines = [
        f"SmolLM2-135M-Instruct (30 layers), sarcasm headlines in the pattern {TEMPLATE!r} (max_length "
        f"{ACC_MAX_LENGTH}); {args.steps} steps x batch {args.batch_size}, seeds {args.seeds}; held-out: "
        f"{args.eval_samples} sarcasm-val headlines (standard error of an accuracy near 0.7: about "
        f"{(0.21 / args.eval_samples) ** 0.5:.3f}). Every prompt method at its defaults.",
        "",
        "| arm | trainable params (at the end) | held-out accuracy (mean) | held-out loss (mean) | per seed (acc / loss) |",
        "|---|---|---|---|---|",
    ]
    for name, rs in by_arm.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        per = ", ".join(f"{r['acc']:.3f} / {r['loss']:.3f}" for r in rs)
        lines.append(f"| {name} | {rs[-1]['trainable']:,} | {statistics.mean(r['acc'] for r in rs):.3f} | "
                     f"{statistics.mean(r['loss'] for r in rs):.3f} | {per} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 3.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bar_plot(ax, rows, "acc", lambda n: n.startswith(("zero-shot", "full", "LoRA")))
    ax.set_ylim(0.4, 1.0)
    ax.set_ylabel("held-out accuracy", fontsize=8)
    ax.set_title("Prompt methods at their papers' rates (sarcasm, SmolLM2-135M); grey: references", fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--seeds", type=str, default="0")
    add_cache_arguments(p, os.path.join(REPO, "runs", "bench", "prompt_rates"))
    args = p.parse_args(argv)
    rows = cached_rows(args, list(ARMS), lambda name, seed: _key(args, name, seed),
                       lambda name, seed: run_arm(name, args, seed))
    md = table(rows, args)
    print(md)
    write_results(REPO, "prompt_rates", args, rows, md)
    if args.plot:
        _plot(rows, args.plot)


if __name__ == "__main__":
    main()
