"""LiST self-training vs prompt fine-tuning vs classic fine-tuning on few-shot sarcasm (a benchmark, not a test).

SmolLM2-135M-Instruct (lit_ft asset). ``FewShotDataModule`` draws ``K`` headlines per class (seeded) from a seeded
``--pool-rows`` subset of the ``sarcasm`` asset; the remaining rows, capped at ``--unlabelled``, are the unlabelled
pool. Evaluation: accuracy on ``--eval-samples`` rows of ``sarcasm-val``. Arms, all from the same labelled rows:

* ``classic``: ``ClassificationModule`` (the whole LM + a linear head on the last token, plain text), AdamW;
* ``prompt``: ``VerbalizerClassificationModule`` (the whole LM through the label words no/No vs yes/Yes after a
  question pattern), AdamW — prompt-based fine-tuning;
* ``list``: ``SelfTrainingModule`` + ``SelfTraining``: the frozen LM with LiST's linear adapters; the teacher phase,
  then ``--sessions`` sessions (pool pseudo-labelled by the teacher, ``--student-steps`` meta-reweighted unlabelled
  steps of 16 rows, ``--finetune-steps`` labelled steps). Its teacher accuracy on the pool is reported per session.

Baselines get as many labelled steps as LiST takes in all (teacher + every session's labelled steps) plus one, batch 4.
The regime is scaled down for 2 CPU cores (short phases, ``identity`` adapter init and larger learning rates than
LiST's RoBERTa-large runs); see the docs page for what that means.

    python benchmarks/list_sarcasm.py --k 10 --seeds 0   (then --k 30; each under 10 minutes on 2 cores)
    python benchmarks/list_sarcasm.py --k 4 --teacher-steps 2 --student-steps 2 --finetune-steps 1 --sessions 1 \
        --eval-samples 16 --unlabelled 32 --arms list     # a smoke run

Writes ``benchmarks/results/list_sarcasm.json`` (rewritten after every arm) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lit_ft.callbacks.data_selection.self_training import SelfTraining  # noqa: E402
from lit_ft.data.few_shot import FewShotDataModule  # noqa: E402
from lit_ft.modules import ClassificationModule, VerbalizerClassificationModule  # noqa: E402
from lit_ft.modules.self_training import SelfTrainingModule  # noqa: E402

MODEL = "smollm2-135m-instruct"
WORDS = [["no", "No"], ["yes", "Yes"]]
TEMPLATE = "Headline: {text}\nIs this headline sarcastic? Answer:"


class _Record(pl.Callback):
    """The SelfTraining diagnostics logged at each session start and the meta-weights' sums."""

    def __init__(self) -> None:
        self.sessions: list[dict] = []
        self.weight_sums: list[float] = []
        self._seen = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        cb = next(c for c in trainer.callbacks if isinstance(c, SelfTraining))
        if cb._session_started != self._seen and "lit_ft/self_training/pseudo_label_accuracy" in m:
            self._seen = cb._session_started
            self.sessions.append({"session": self._seen,
                                  "teacher_pool_acc": round(float(m["lit_ft/self_training/pseudo_label_accuracy"]), 4),
                                  "teacher_confidence": round(float(m["lit_ft/self_training/teacher_confidence"]), 4)})
        phase = m.get("lit_ft/self_training/phase")
        if phase is not None and float(phase) == 1.0 and "lit_ft/self_training/weight_sum" in m:
            self.weight_sums.append(float(m["lit_ft/self_training/weight_sum"]))


def data(arm: str, k: int, seed: int, args: argparse.Namespace) -> FewShotDataModule:
    return FewShotDataModule(data="sarcasm", val_data="sarcasm-val", tokenizer=MODEL,
                             template=None if arm == "classic" else TEMPLATE, max_length=64, batch_size=4,
                             eval_batch_size=32, max_train_samples=args.pool_rows, max_val_samples=args.eval_samples,
                             seed=seed, shots_per_class=k, unlabelled_batch_size=16, meta_batch_size=4,
                             max_unlabelled_samples=args.unlabelled)


@torch.no_grad()
def accuracy(module: pl.LightningModule, dm: FewShotDataModule) -> float:
    module.eval()
    hit = n = 0
    for b in dm.val_dataloader():
        if isinstance(module, ClassificationModule):
            scores = module.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        else:
            scores = module(b["input_ids"], b["attention_mask"])
        hit += int((scores.argmax(-1) == b["labels"]).sum())
        n += len(b["labels"])
    return hit / n


def run_arm(arm: str, k: int, seed: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    dm = data(arm, k, seed, args)
    labelled_steps = args.teacher_steps + args.sessions * args.finetune_steps
    callbacks: list[pl.Callback] = []
    if arm == "classic":
        module = ClassificationModule(model=MODEL, num_labels=2, learning_rate=args.classic_lr, weight_decay=0.0)
        steps = labelled_steps
    elif arm == "prompt":
        module = VerbalizerClassificationModule(model=MODEL, label_words=WORDS, learning_rate=args.prompt_lr,
                                                weight_decay=0.0, trainable_word_weights=False)
        steps = labelled_steps
    else:
        module = SelfTrainingModule(model=MODEL, label_words=WORDS)
        callbacks = [SelfTraining(teacher_steps=args.teacher_steps, num_sessions=args.sessions,
                                  student_steps=args.student_steps, finetune_steps=args.finetune_steps,
                                  teacher_learning_rate=args.adapter_lr, student_learning_rate=args.adapter_lr,
                                  meta_learning_rate=args.meta_lr, init="identity", seed=seed), _Record()]
        steps = labelled_steps + args.sessions * args.student_steps
    trainer = pl.Trainer(max_steps=steps + 1, callbacks=callbacks, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         limit_val_batches=0, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    out: dict = {"arm": arm, "k": k, "seed": seed, "steps": int(trainer.global_step),
                 "train_s": round(time.perf_counter() - t0, 1),
                 "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
                 "labelled": dm.stats.get("labelled_samples"), "unlabelled": dm.stats.get("unlabelled_samples")}
    t1 = time.perf_counter()
    out["acc"] = round(accuracy(module, dm), 4)
    out["eval_s"] = round(time.perf_counter() - t1, 1)
    if arm == "list":
        rec = callbacks[1]
        out["sessions"] = rec.sessions
        if rec.weight_sums:
            out["mean_weight_sum"] = round(sum(rec.weight_sums) / len(rec.weight_sums), 4)
    print(json.dumps(out), flush=True)
    return out


def table(rows: list[dict]) -> str:
    lines = ["| K / class | seed | classic FT | prompt FT | LiST | LiST teacher on the pool (per session) |",
             "|---|---|---|---|---|---|"]
    keys = sorted({(r["k"], r["seed"]) for r in rows})
    for k, seed in keys:
        by = {r["arm"]: r for r in rows if r["k"] == k and r["seed"] == seed}
        cell = lambda a: f"{by[a]['acc']:.3f}" if a in by else "—"  # noqa: E731
        teach = ", ".join(f"{s['teacher_pool_acc']:.3f}" for s in by.get("list", {}).get("sessions", [])) or "—"
        lines.append(f"| {k} | {seed} | {cell('classic')} | {cell('prompt')} | {cell('list')} | {teach} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", default="10,30", help="labelled headlines per class, comma-separated")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--arms", default="classic,prompt,list")
    ap.add_argument("--pool-rows", type=int, default=2000, help="seeded subset of the sarcasm rows drawn from")
    ap.add_argument("--unlabelled", type=int, default=256)
    ap.add_argument("--eval-samples", type=int, default=300)
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--sessions", type=int, default=2)
    ap.add_argument("--student-steps", type=int, default=10)
    ap.add_argument("--finetune-steps", type=int, default=5)
    ap.add_argument("--adapter-lr", type=float, default=1e-3)
    ap.add_argument("--classic-lr", type=float, default=5e-5, help="ClassificationModule's default")
    ap.add_argument("--prompt-lr", type=float, default=3e-5, help="VerbalizerClassificationModule's default")
    ap.add_argument("--meta-lr", type=float, default=1.0)
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "list_sarcasm.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    os.environ.setdefault("LIT_FT_PROGRESS", "0")
    record = {"model": MODEL, "task": "sarcasm", "template": TEMPLATE, "label_words": WORDS,
              "args": {k: v for k, v in vars(args).items() if k != "out"}, "torch_threads": torch.get_num_threads(),
              "rows": []}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        for k in (int(x) for x in args.k.split(",")):
            for arm in args.arms.split(","):
                record["rows"].append(run_arm(arm, k, seed, args))
                Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(table(record["rows"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
