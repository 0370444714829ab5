"""Does SSToken keep learning? Plain SFT vs SSToken on a small synthetic task with 40% noisy rows.

    OMP_NUM_THREADS=1 python benchmarks/sstoken_stall.py                  # the table on docs/techniques/sstoken.md
    OMP_NUM_THREADS=1 python benchmarks/sstoken_stall.py --steps 200 --arms plain defaults

Task: a 2-layer tiny Llama (``lit_ft.testing.tiny_llama_config``) learns to *copy* the prompt. A row is
``BOS, x_1..x_L, SEP | x_1..x_L, EOS`` (the response is supervised, the prompt is not), ``x_i`` drawn from a small
alphabet. ``--noise`` of the training rows (default 40%) get a random response instead (still ending in EOS): a
response the model can never predict from its prompt. The held-out set is clean rows only; its loss (mean NLL over
all response tokens, EOS included) and the EOS token's own NLL are printed every ``--every`` steps. All arms see the
same rows in the same order from the same initial weights (seed), with AdamW at ``--lr``.

Arms (``--arms``):

- ``plain``: no callback (every response token trained);
- ``old``: SSToken as it was before the "faithful by default" change — EMA history (decay 0.99), no warm-up, no
  minimum keep, EOS not protected;
- ``defaults``: ``SSToken()`` with its current defaults;
- ``no_protect``: the current defaults without the EOS / minimum-keep protection;
- ``initial_nowarm``: the release's fixed base-model history without the warm-up and without protection;
- ``keep1``: ``SSToken(keep_ratio=1.0)`` (must equal ``plain``);
- ``explore`` / ``explore25``: the current defaults with ``explore_ratio=0.1`` / ``0.25``;
- ``no_warmup``: the current defaults without the warm-up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from lit_ft.callbacks import SSToken  # noqa: E402
from lit_ft.modules import CausalLMModule  # noqa: E402
from lit_ft.testing import tiny_llama_config  # noqa: E402

BOS, EOS, SEP = 1, 2, 3
FIRST_SYMBOL = 10


def make_rows(n: int, length: int, alphabet: int, noise: float, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` copy rows; a ``noise`` share of them (chosen at random) with a random response."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    noisy = torch.rand(n, generator=g) < noise
    for i in range(n):
        x = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + alphabet, (length,), generator=g)
        y = torch.randint(FIRST_SYMBOL, FIRST_SYMBOL + alphabet, (length,), generator=g) if noisy[i] else x
        ids = torch.cat([torch.tensor([BOS]), x, torch.tensor([SEP]), y, torch.tensor([EOS])])
        labels = ids.clone()
        labels[: length + 2] = -100
        rows.append({"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids),
                     "sample_idx": torch.tensor(i)})
    return rows


def batches(rows: list[dict[str, torch.Tensor]], batch_size: int, steps: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``steps`` batches: epochs over ``rows``, reshuffled with a seeded generator each epoch."""
    g = torch.Generator().manual_seed(seed)
    out: list[dict[str, torch.Tensor]] = []
    while len(out) < steps:
        order = torch.randperm(len(rows), generator=g).tolist()
        for s in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[j] for j in order[s:s + batch_size]]
            out.append({k: torch.stack([r[k] for r in chunk]) for k in chunk[0]})
            if len(out) == steps:
                break
    return out


class _Data(pl.LightningDataModule):
    def __init__(self, train: list[dict[str, torch.Tensor]]) -> None:
        super().__init__()
        self.train = train

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=None, shuffle=False)


@torch.no_grad()
def held_out(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(mean response NLL incl. EOS, mean NLL of the EOS token) of ``model`` on ``batch``."""
    was = model.training
    model.eval()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets.clamp_min(0), reduction="none")
    valid = targets != -100
    eos = valid & (targets == EOS)
    model.train(was)
    return float(nll[valid].mean()), float(nll[eos].mean())


class _Eval(pl.Callback):
    def __init__(self, batch: dict[str, torch.Tensor], every: int) -> None:
        self.batch, self.every, self.curve = batch, every, {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.curve[0] = held_out(pl_module.model, self.batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step % self.every == 0:
            self.curve[trainer.global_step] = held_out(pl_module.model, self.batch)


ARMS: dict[str, Any] = {
    "plain": None,
    "old": dict(history="ema", ema_decay=0.99, warmup_steps=0, min_keep_per_response=0, always_keep_eos=False),
    "defaults": {},
    "no_protect": dict(min_keep_per_response=0, always_keep_eos=False),
    "initial_nowarm": dict(warmup_steps=0, min_keep_per_response=0, always_keep_eos=False),
    "keep1": dict(keep_ratio=1.0),
    "explore": dict(explore_ratio=0.1),
    "explore25": dict(explore_ratio=0.25),
    "no_warmup": dict(warmup_steps=0),
}


def run_arm(arm: str, args: argparse.Namespace, data: list[dict[str, torch.Tensor]],
            val: dict[str, torch.Tensor]) -> dict[int, tuple[float, float]]:
    torch.manual_seed(args.seed)
    module = CausalLMModule(model_config=tiny_llama_config(hidden_size=args.hidden, intermediate_size=2 * args.hidden),
                            learning_rate=args.lr)
    ev = _Eval(val, args.every)
    callbacks: list[pl.Callback] = [ev]
    if ARMS[arm] is not None:
        callbacks.insert(0, SSToken(**ARMS[arm]))
    trainer = pl.Trainer(max_steps=args.steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, accelerator="cpu")
    trainer.fit(module, datamodule=_Data(data))
    return ev.curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", nargs="+", default=["plain", "old", "initial_nowarm", "defaults", "no_warmup", "explore25"],
                   choices=sorted(ARMS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--every", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--length", type=int, default=12, help="prompt = response length (without EOS)")
    p.add_argument("--alphabet", type=int, default=16)
    p.add_argument("--noise", type=float, default=0.4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    pl.seed_everything(args.seed, verbose=False)
    data = batches(make_rows(args.rows, args.length, args.alphabet, args.noise, args.seed), args.batch_size,
                   args.steps, args.seed)
    vrows = make_rows(128, args.length, args.alphabet, 0.0, args.seed + 1)
    val = {k: torch.stack([r[k] for r in vrows]) for k in vrows[0]}
    curves = {}
    for arm in args.arms:
        t0 = time.perf_counter()
        curves[arm] = run_arm(arm, args, data, val)
        print(f"# {arm}: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    steps = sorted(next(iter(curves.values())))
    print(f"held-out clean loss (response NLL incl. EOS) / EOS NLL; {args.noise:.0%} noisy training rows, "
          f"copy task L={args.length}, alphabet {args.alphabet}, batch {args.batch_size}, lr {args.lr}, seed {args.seed}")
    print("| step | " + " | ".join(args.arms) + " |")
    print("|---:|" + "---:|" * len(args.arms))
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{curves[a][s][0]:.3f} / {curves[a][s][1]:.2f}" for a in args.arms) + " |")


if __name__ == "__main__":
    main()
