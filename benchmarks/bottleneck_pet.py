"""Few-shot PET with bottleneck adapters vs the frozen zero-shot verbalizer (a benchmark, not a test).

SmolLM2-135M-Instruct (lit_ft asset) classifies news-headline sarcasm through ``VerbalizerClassificationModule``
(label words no/No vs yes/Yes at the answer position). Training data: ``--k`` headlines per class drawn (seeded) from
the ``sarcasm`` asset; evaluation: the first ``--eval-samples`` rows of ``sarcasm-val``. Every headline is scored under
each of ``PATTERNS``; accuracy is reported for the first pattern alone (the training template) and for PET's pattern
ensemble (class scores averaged over the patterns, ``predict_step``'s rule). Arms, from the same weights:

* ``zero_shot``: the frozen LM, no training;
* ``bottleneck_<config>``: ``BottleneckAdapters(config)`` trained ``--steps`` AdamW steps (batch ``--batch-size``,
  adapters' lr ``--lr``, no weight decay) on the K-shot set with the first pattern; the backbone stays frozen.

    python benchmarks/bottleneck_pet.py --k 16 --steps 24 --eval-samples 200
    python benchmarks/bottleneck_pet.py --k 4 --steps 2 --eval-samples 16      # a smoke run

Writes ``benchmarks/results/bottleneck_pet.json``.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lit_ft.assets import resolve  # noqa: E402
from lit_ft.callbacks import BottleneckAdapters  # noqa: E402
from lit_ft.data import ClassificationDataModule  # noqa: E402
from lit_ft.modules import VerbalizerClassificationModule  # noqa: E402
from lit_ft.modules.verbalizer import ensemble_scores  # noqa: E402

MODEL = "smollm2-135m-instruct"
WORDS = [["no", "No"], ["yes", "Yes"]]
PATTERNS = [
    "Headline: {text}\nIs this headline sarcastic? Answer:",
    "{text}\nQuestion: is this sarcastic? Answer:",
    "Is the headline \"{text}\" sarcastic? Answer:",
]


def k_shot(k: int, seed: int, out: Path) -> str:
    rows = [json.loads(line) for line in Path(resolve("sarcasm")).read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    pick = []
    for label in (0, 1):
        pool = [r for r in rows if r["label"] == label]
        pick += rng.sample(pool, k)
    rng.shuffle(pick)
    out.write_text("".join(json.dumps(r) + "\n" for r in pick))
    return str(out)


def eval_rows(n: int, out: Path) -> str:
    rows = [line for line in Path(resolve("sarcasm-val")).read_text().splitlines() if line.strip()][:n]
    out.write_text("\n".join(rows) + "\n")
    return str(out)


@torch.no_grad()
def evaluate(module: VerbalizerClassificationModule, dm: ClassificationDataModule) -> dict:
    module.eval()
    hit_single = hit_ens = n = 0
    per_pattern = [0] * len(PATTERNS)
    for b in dm.val_dataloader():
        s = module.pattern_scores(b["pattern_input_ids"], b["pattern_attention_mask"])  # [B, P, C]
        y = b["labels"]
        for p in range(s.shape[1]):
            per_pattern[p] += int((s[:, p].argmax(-1) == y).sum())
        hit_single += int((s[:, 0].argmax(-1) == y).sum())
        hit_ens += int((ensemble_scores(s).argmax(-1) == y).sum())
        n += len(y)
    return {"acc_first_pattern": hit_single / n, "acc_ensemble": hit_ens / n,
            "acc_per_pattern": [h / n for h in per_pattern], "eval_samples": n}


def run_arm(arm: str, args: argparse.Namespace, train: str, val: str) -> dict:
    torch.manual_seed(args.seed)
    dm = ClassificationDataModule(data=train, val_data=val, tokenizer=MODEL, template=PATTERNS[0], patterns=PATTERNS,
                                  max_length=64, batch_size=args.batch_size, eval_batch_size=32, seed=args.seed)
    module = VerbalizerClassificationModule(model=MODEL, label_words=WORDS, learning_rate=args.lr, weight_decay=0.0,
                                            freeze_backbone=arm == "zero_shot")
    out: dict = {"arm": arm}
    t0 = time.perf_counter()
    if arm != "zero_shot":
        cb = BottleneckAdapters(config=arm.split("_", 1)[1], learning_rate=args.lr, seed=args.seed)
        trainer = pl.Trainer(max_steps=args.steps, callbacks=[cb], logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                             limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
        out["trainable_params"] = sum(p.numel() for p in cb.adapters.adapters.parameters())
        out["train_s"] = round(time.perf_counter() - t0, 1)
    else:
        dm.setup()
        module.build_verbalizer(dm.tokenizer)
        out["trainable_params"] = 0
    t1 = time.perf_counter()
    out.update(evaluate(module, dm))
    out["eval_s"] = round(time.perf_counter() - t1, 1)
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=16, help="training headlines per class")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-samples", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="zero_shot,bottleneck_pfeiffer,bottleneck_houlsby")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "bottleneck_pet.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    record = {"model": MODEL, "task": "sarcasm", "k_per_class": args.k, "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "patterns": PATTERNS,
              "label_words": WORDS, "torch_threads": torch.get_num_threads(), "arms": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        train = k_shot(args.k, args.seed, Path(d) / "train.jsonl")
        val = eval_rows(args.eval_samples, Path(d) / "val.jsonl")
        for arm in args.arms.split(","):  # the file is rewritten after every arm: a stopped run keeps what it measured
            record["arms"].append(run_arm(arm, args, train, val))
            Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
