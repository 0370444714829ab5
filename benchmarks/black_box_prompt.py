"""BlackBoxPromptLearning on sarcasm headlines without labels, against zero-shot and few-shot prompt methods (a
benchmark, not a test).

Real SmolLM2-135M-Instruct (lit_ft assets), the sarcasm pattern and label words of ``benchmarks/prompts.py``, the same
held-out headlines (``sarcasm-val``) for every row:

* zero-shot: the plain pattern, label words no/No vs yes/Yes (the black box, no prompt, no demonstrations);
* black-box prompt learning (no labels): ``--pool`` unlabelled training headlines; reported after the zero-shot
  pseudo-labelling alone (its reliable demonstrations, empty prompt) and after ``--steps`` steps (argmax prompt +
  demonstrations), per seed; with the accuracy of its pseudo-labels against the hidden labels (measured only);
* few-shot references with ``--k-shot`` labels per class: PromptTuning on the frozen LM and the whole LM fine-tuned
  (PET), both through ``VerbalizerClassificationModule``, ``--fs-steps`` steps.

    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/black_box_prompt.py
    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/black_box_prompt.py --dataset bbcnews \
        --steps 25 --batch-size 4 --samples 4 --reliable 4 --pool 128 --eval-samples 150 --seeds 0 --k-shot 4 \
        --fs-steps 20 --out benchmarks/results/black_box_prompt_bbcnews.json

Writes ``benchmarks/results/black_box_prompt.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

MODEL = "smollm2-135m-instruct"
#: dataset -> (pattern, label words, max_length); sarcasm as in benchmarks/prompts.py; bbcnews: 5 topics, the article
#: cut to its first tokens (its title leads)
TASKS = {
    "sarcasm": ("Headline: {text}\nIs this headline sarcastic? Answer:", [["no", "No"], ["yes", "Yes"]], 64),
    "bbcnews": ("Article: {text}\nTopic:", [["business"], ["entertainment"], ["politics"], ["sports", "sport"],
                                             ["tech", "technology"]], 40),
}


def _splits(args: argparse.Namespace) -> tuple[str, str]:
    """(training file, validation file): sarcasm has both assets; bbcnews one file, split here (seeded, the first
    ``--eval-samples`` shuffled rows held out) so every arm sees the same held-out rows."""
    from lit_ft.assets import resolve

    if args.dataset == "sarcasm":
        return "sarcasm", "sarcasm-val"
    src = Path(resolve("bbcnews"))
    rows = [x for x in src.read_text().splitlines() if x.strip()]
    random.Random(0).shuffle(rows)
    out = Path(tempfile.mkdtemp(prefix="bbpl_bbc_"))
    (out / "val.jsonl").write_text("\n".join(rows[: args.eval_samples]) + "\n")
    (out / "train.jsonl").write_text("\n".join(rows[args.eval_samples:]) + "\n")
    (out / "label_names.json").write_text((src.parent / "label_names.json").read_text())
    return str(out / "train.jsonl"), str(out / "val.jsonl")


def _data(args: argparse.Namespace, data: str | None = None, max_train: int | None = None, batch_size: int = 8):
    from lit_ft.data import ClassificationDataModule

    template, _, max_length = TASKS[args.dataset]
    return ClassificationDataModule(data=data or args.train_file, val_data=args.val_file, tokenizer=MODEL,
                                    template=template, max_length=max_length, batch_size=batch_size,
                                    eval_batch_size=32, max_train_samples=max_train,
                                    max_val_samples=args.eval_samples, seed=0)


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      accelerator="cpu", num_sanity_val_steps=0, **kw)


def _bbpl(args: argparse.Namespace, seed: int, steps: int):
    from lit_ft.modules.black_box_prompt import BlackBoxPromptLearning

    pl.seed_everything(seed, verbose=False)
    return BlackBoxPromptLearning(
        model=MODEL, label_words=TASKS[args.dataset][1], prompt_length=args.prompt_length, num_candidates=args.candidates,
        num_samples=args.samples, learning_rate=args.lr, reliable_per_class=args.reliable,
        demonstrations_per_class=1, query_batch_size=32, seed=seed)


def black_box_rows(args: argparse.Namespace, seed: int) -> list[dict[str, Any]]:
    module = _bbpl(args, seed, args.steps)
    dm = _data(args, max_train=args.pool, batch_size=args.batch_size)
    t0 = time.perf_counter()
    trainer = _trainer(max_steps=args.steps, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    hidden = torch.tensor([e["label"] for e in sorted(dm._examples("train"), key=lambda e: e["sample_idx"])])
    pseudo_acc = float((module.pseudo_labels.cpu() == hidden).float().mean())
    rel = module.reliable.cpu()
    reliable_acc = float((module.pseudo_labels.cpu()[rel] == hidden[rel]).float().mean())
    learned = _trainer().validate(module, datamodule=dm, verbose=False)[0]
    out = [{"name": f"black-box prompt learning, no labels (seed {seed}, {args.steps} steps)", "acc": learned["val/acc"],
            "loss": learned["val/loss"], "labels": 0, "wall_s": wall, "queries": module.box.queries,
            "prompt": module.prompt(), "pseudo_label_acc": pseudo_acc, "reliable_acc": reliable_acc,
            "demonstrations": [module.pool_texts[j] for j in module.prediction_demonstrations()]}]
    # the same state with an empty prompt: what the reliable pseudo-labelled demonstrations alone give
    saved = module.candidates
    module.candidates = [""] * len(saved)
    demos_only = _trainer().validate(module, datamodule=dm, verbose=False)[0]
    module.candidates = saved
    out.append({"name": f"reliable pseudo-labelled demonstrations only, no prompt (seed {seed})",
                "acc": demos_only["val/acc"], "loss": demos_only["val/loss"], "labels": 0})
    return out


def zero_shot_row(args: argparse.Namespace) -> dict[str, Any]:
    from lit_ft.modules import VerbalizerClassificationModule

    pl.seed_everything(0, verbose=False)
    module = VerbalizerClassificationModule(model=MODEL, label_words=TASKS[args.dataset][1], freeze_backbone=True,
                                            trainable_word_weights=False)
    m = _trainer().validate(module, datamodule=_data(args), verbose=False)[0]
    return {"name": "zero-shot (plain pattern, label words)", "acc": m["val/acc"], "loss": m["val/loss"], "labels": 0}


def _k_shot_file(args: argparse.Namespace, seed: int) -> str:
    from lit_ft.assets import resolve

    train = resolve(args.train_file) if args.dataset == "sarcasm" else args.train_file
    rows = [json.loads(x) for x in Path(train).read_text().splitlines() if x.strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    classes = range(len(TASKS[args.dataset][1]))
    picked = [r for c in classes for r in [r for r in rows if r["label"] == c][: args.k_shot]]
    path = Path(tempfile.mkdtemp(prefix="bbpl_kshot_")) / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in picked))
    if args.dataset != "sarcasm":
        (path.parent / "label_names.json").write_text((Path(train).parent / "label_names.json").read_text())
    return str(path)


def few_shot_row(args: argparse.Namespace, seed: int, prompt_tuning: bool) -> dict[str, Any]:
    import lit_ft.callbacks as cbs
    from lit_ft.modules import VerbalizerClassificationModule

    pl.seed_everything(seed, verbose=False)
    module = VerbalizerClassificationModule(model=MODEL, label_words=TASKS[args.dataset][1],
                                            freeze_backbone=prompt_tuning,
                                            trainable_word_weights=False, learning_rate=3e-5)
    callbacks = [cbs.PromptTuning(num_virtual_tokens=20, learning_rate=3e-2)] if prompt_tuning else []
    dm = _data(args, data=_k_shot_file(args, seed), batch_size=8)
    t0 = time.perf_counter()
    trainer = _trainer(max_steps=args.fs_steps, limit_val_batches=0, callbacks=callbacks)
    trainer.fit(module, datamodule=dm)
    wall = time.perf_counter() - t0
    m = _trainer(callbacks=[]).validate(module, datamodule=dm, verbose=False)[0]
    what = "PromptTuning(n=20, lr 3e-2), frozen LM" if prompt_tuning else "whole LM fine-tuned (PET, lr 3e-5)"
    n_labels = len(TASKS[args.dataset][1]) * args.k_shot
    return {"name": f"few-shot {what}, {n_labels} labels (seed {seed}, {args.fs_steps} steps)",
            "acc": m["val/acc"], "loss": m["val/loss"], "labels": n_labels, "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=sorted(TASKS), default="sarcasm")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--samples", type=int, default=6, help="prompts drawn per step (num_samples)")
    p.add_argument("--prompt-length", type=int, default=5)
    p.add_argument("--candidates", type=int, default=50)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--reliable", type=int, default=8, help="reliable pseudo-labelled texts per class")
    p.add_argument("--pool", type=int, default=256, help="unlabelled training headlines")
    p.add_argument("--eval-samples", type=int, default=300)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--k-shot", type=int, default=16)
    p.add_argument("--fs-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="comma-separated: zero,bbpl,fewshot (default: all)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "black_box_prompt.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.train_file, args.val_file = _splits(args)
    only = set(filter(None, args.only.split(","))) or {"zero", "bbpl", "fewshot"}
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []

    def save() -> None:  # after every row: a run cut short still leaves what it measured
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))

    if "zero" in only:
        rows.append(zero_shot_row(args))
        print(rows[-1], flush=True)
        save()
    if "bbpl" in only:
        for s in seeds:
            rows += black_box_rows(args, s)
            print(rows[-2], rows[-1], sep="\n", flush=True)
            save()
    if "fewshot" in only:
        for s in seeds[:1]:
            for pt in (True, False):
                rows.append(few_shot_row(args, s, pt))
                print(rows[-1], flush=True)
                save()
    base = next((r["acc"] for r in rows if r["name"].startswith("zero-shot")), None)
    template, words, _ = TASKS[args.dataset]
    print(f"\nSmolLM2-135M-Instruct, {args.dataset}, pattern {template!r}, label words {words}; accuracy on "
          f"{args.eval_samples} held-out rows.\n")
    print("| method | labels used | held-out accuracy | × zero-shot | held-out loss | pseudo-label acc (all / reliable) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['acc'] / base:.2f}×" if base else "–"
        pseudo = f"{r['pseudo_label_acc']:.3f} / {r['reliable_acc']:.3f}" if "pseudo_label_acc" in r else "–"
        print(f"| {r['name']} | {r['labels']} | {r['acc']:.3f} | {ratio} | {r['loss']:.3f} | {pseudo} |")
    for r in rows:
        if "prompt" in r:
            print(f"\n{r['name']}: prompt {r['prompt']!r}; {r['queries']} black-box queries; {r['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
