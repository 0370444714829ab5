"""LeTI's feedback loop on HumanEval with the real SmolLM2-135M-Instruct, a small CPU regime (a benchmark, not a test).

The bundled HumanEval problems are split with a seeded permutation (``problem_split_seed=0``) into 120 training and
44 held-out problems; the loop samples ``--num-samples`` programs for each of the first ``--train-problems``
training problems per iteration, runs them in the sandbox and trains one epoch per iteration on the feedback texts
paired 1:1 with alpaca-en-demo rows. Greedy ``<|good|>``-conditioned pass@1 on the held-out problems is measured
before training and after each iteration. The plain baseline trains the same number of steps on the plain rows
alone (the DataModule without the loop) and is scored the same way, in the same run.

    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/leti_humaneval.py

Writes ``benchmarks/results/leti_humaneval.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lit_ft.callbacks import FeedbackLoop  # noqa: E402
from lit_ft.callbacks.data_selection.feedback_loop import add_feedback_tokens, pass_at_1  # noqa: E402
from lit_ft.core.sandbox import Sandbox  # noqa: E402
from lit_ft.data.feedback_loop import FeedbackLoopDataModule  # noqa: E402
from lit_ft.modules import CausalLMModule  # noqa: E402

MODEL = "smollm2-135m-instruct"


class History(pl.Callback):
    """The loop's per-iteration execution outcomes (its own state only keeps the current iteration's)."""

    def __init__(self, loop: FeedbackLoop) -> None:
        self.loop, self.rows, self.started = loop, [], time.time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rows.append({"iteration": self.loop.iteration, "statuses": dict(self.loop.statuses),
                          "train_pass_rate": sum(self.loop.passed) / max(1, len(self.loop.passed)),
                          "step": trainer.global_step, "eval_history": [list(e) for e in self.loop.eval_history],
                          "seconds": round(time.time() - self.started, 1)})
        print(f"[leti] {self.rows[-1]}", flush=True)  # a partial result survives a killed run


def datamodule(args) -> FeedbackLoopDataModule:
    dm = FeedbackLoopDataModule(problems="humaneval", num_eval_problems=44, max_train_problems=args.train_problems,
                                data="alpaca-en-demo", tokenizer=MODEL, max_length=args.max_length,
                                batch_size=args.batch_size, val_split=0.0)
    dm.setup("fit")
    dm.eval_problems = dm.eval_problems[: args.eval_problems]
    return dm


def trainer(callbacks, root: str, **kw) -> pl.Trainer:
    return pl.Trainer(callbacks=callbacks, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                      default_root_dir=root, **kw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--train-problems", type=int, default=20)
    ap.add_argument("--num-samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--eval-problems", type=int, default=44, help="held-out problems scored (a smoke run: fewer)")
    ap.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "leti_humaneval.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    started = time.time()
    root = tempfile.mkdtemp(prefix="leti_bench_")
    sandbox = Sandbox()

    # -- the loop: pass@1 before training and after each iteration (the callback's evaluate_each_iteration) --------
    loop = FeedbackLoop(num_samples=args.num_samples, epochs_per_iteration=1, max_new_tokens=args.max_new_tokens,
                        evaluate_each_iteration=True, execution_workers=2)
    history = History(loop)
    module = CausalLMModule(model=MODEL, learning_rate=args.lr, weight_decay=0.01, warmup_steps=0)
    t0 = time.time()
    tr = trainer([loop, history], root, max_epochs=args.iterations)
    tr.fit(module, datamodule=datamodule(args))
    loop_seconds, steps = time.time() - t0, tr.global_step
    evals = loop.eval_history  # [[0, before], [1, after iteration 0], ..., ["end", after the last]]

    partial = {"model": MODEL, "args": vars(args), "steps": steps, "pass_at_1_held_out": {str(k): v for k, v in evals},
               "iterations": history.rows, "plain_baseline_pass_at_1": None, "seconds": {"loop": round(loop_seconds, 1)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(partial, indent=2) + "\n")  # kept if the baseline does not finish
    print(f"[leti] loop done: {partial}", flush=True)

    # -- the plain baseline: the same steps on the plain rows only ----------------------------------------------------
    torch.manual_seed(0)
    dm = datamodule(args)
    base = CausalLMModule(model=MODEL, learning_rate=args.lr, weight_decay=0.01, warmup_steps=0)
    add_feedback_tokens(dm.tokenizer, base)  # same vocabulary, so the <|good|>-conditioned prompt means the same
    t0 = time.time()
    trainer([], root, max_steps=steps).fit(base, datamodule=dm)
    base_seconds = time.time() - t0
    base_score, _ = pass_at_1(base, dm.tokenizer, dm.eval_problems, sandbox, max_new_tokens=args.max_new_tokens,
                              workers=2)

    result = {
        "model": MODEL, "split": "HumanEval, seeded permutation (seed 0): 120 train / 44 held out",
        "args": vars(args), "steps": steps, "sandbox": sandbox.capabilities(),
        "pass_at_1_held_out": {str(k): v for k, v in evals},
        "iterations": history.rows,
        "plain_baseline_pass_at_1": base_score,
        "seconds": {"loop": round(loop_seconds, 1), "plain_baseline": round(base_seconds, 1),
                    "total": round(time.time() - started, 1)},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    n_eval = len(dm.eval_problems)
    print(f"\nLeTI feedback loop, SmolLM2-135M-Instruct, {args.train_problems} train problems x n={args.num_samples}, "
          f"{args.iterations} iterations x 1 epoch ({steps} steps), lr {args.lr}, held-out pass@1 on {n_eval}:\n")
    print("| point | held-out pass@1 | sampled programs passing (train) | statuses |")
    print("|---|---|---|---|")
    print(f"| before training | {evals[0][1]:.3f} ({round(evals[0][1] * n_eval)}/{n_eval}) | | |")
    for i, row in enumerate(history.rows):
        score = evals[i + 1][1]
        st = ", ".join(f"{k} {v}" for k, v in row["statuses"].items() if v)
        print(f"| after iteration {row['iteration']} | {score:.3f} ({round(score * n_eval)}/{n_eval}) | "
              f"{row['train_pass_rate']:.3f} | {st} |")
    print(f"| plain baseline ({steps} steps on alpaca rows only) | {base_score:.3f} "
          f"({round(base_score * n_eval)}/{n_eval}) | | |")
    print(f"\nwall: loop {loop_seconds:.0f} s, baseline {base_seconds:.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
