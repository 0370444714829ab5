"""Benchmark: GOT-D selection (OTDataSelection) vs a random selection of the same size, as pre-fine-tuning data for
ASDiv, on the real SmolLM2-135M-Instruct and MiniLM (CPU, small regime).

Pool (prompt + completion as plain text, language-model loss on every token): alpaca-en-demo, bbcnews, sarcasm,
glaive-toolcall-chat and humaneval rows (seeded subsets per source). Target: ASDiv training rows (prompt +
completion). For each seed:

1. ``gotd``: pre-fine-tune on the k pool rows OTDataSelection keeps (the callback in the Trainer);
   ``random``: pre-fine-tune on k seeded random pool rows (SFTDataModule(max_train_samples=k));
   ``none``: no pre-fine-tuning;
2. then fine-tune each on ASDiv (prompt/completion, chat template) for the same steps;
3. report the held-out ASDiv loss (asdiv-val rows) after step 2, and after step 1 alone.

Also reports the domain shares of both selections. Results to benchmarks/results/got_d.json, a markdown table on
stdout.

    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/got_d.py
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402

from lit_ft import assets  # noqa: E402
from lit_ft.callbacks import OTDataSelection  # noqa: E402
from lit_ft.callbacks.data_selection.ot_data_selection import row_text  # noqa: E402
from lit_ft.data import SFTDataModule  # noqa: E402
from lit_ft.data._common import read_rows  # noqa: E402
from lit_ft.modules import CausalLMModule  # noqa: E402

#: source -> rows taken (seeded subset); text per row as OTDataSelection reads it
SOURCES = {"alpaca-en-demo": 400, "bbcnews": 300, "sarcasm": 400, "glaive-toolcall-chat": 150, "humaneval": 100}


def humaneval_text(row: dict) -> str:
    return row.get("prompt", "") + row.get("canonical_solution", "")


def write_pool(path: Path, seed: int = 0) -> list[str]:
    """The pool as {"prompt": "", "completion": text} rows; returns the domain of each row."""
    rows, domains = [], []
    for name, n in SOURCES.items():
        src = read_rows(str(assets.get(name)), name)
        take = sorted(random.Random(seed).sample(range(len(src)), min(n, len(src))))
        for i in take:
            text = humaneval_text(src[i]) if name == "humaneval" else row_text(src[i], None, f"{name} row {i}")
            rows.append({"prompt": "", "completion": text[:2000]})
            domains.append(name)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return domains


def trainer(steps: int, root: Path, callbacks: list | None = None) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, callbacks=callbacks or [], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0,
                      num_sanity_val_steps=0, default_root_dir=str(root))


def held_out_loss(module: CausalLMModule, args: argparse.Namespace, root: Path) -> float:
    dm = SFTDataModule(data="asdiv", val_data="asdiv-val", max_length=args.max_length, batch_size=args.batch_size,
                       max_val_samples=args.eval_samples, seed=0)
    t = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                   default_root_dir=str(root))
    return float(t.validate(module, datamodule=dm, verbose=False)[0]["val/loss"])


def run_arm(arm: str, seed: int, pool: str, args: argparse.Namespace, root: Path) -> dict:
    pl.seed_everything(seed, verbose=False)
    module = CausalLMModule(learning_rate=args.lr, warmup_steps=2)
    out: dict = {"arm": arm, "seed": seed}
    t0 = time.perf_counter()
    if arm != "none":
        cbs = []
        kw = dict(data=pool, val_split=0.0, use_chat_template=False, max_length=args.max_length,
                  batch_size=args.batch_size, seed=seed)
        if arm == "gotd":
            cbs = [OTDataSelection(target="asdiv", k=args.k, max_length=args.embed_max_length,
                                   cache_dir=str(args.cache), device="cpu")]
        else:
            kw["max_train_samples"] = args.k
        dm = SFTDataModule(**kw)
        trainer(args.pre_steps, root, cbs).fit(module, datamodule=dm)
        out["selected"] = cbs[0].selected if cbs else sorted(e["sample_idx"] for e in dm._examples("train"))
        out["ot"] = cbs[0].ot if cbs else None
        out["loss_after_pre"] = held_out_loss(module, args, root)
    ft = SFTDataModule(data="asdiv", val_data="asdiv-val", max_length=args.max_length, batch_size=args.batch_size,
                       seed=seed)
    trainer(args.ft_steps, root).fit(module, datamodule=ft)
    out["loss_after_ft"] = held_out_loss(module, args, root)
    out["seconds"] = time.perf_counter() - t0
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=128, help="rows selected")
    p.add_argument("--pre-steps", type=int, default=16, help="pre-fine-tuning steps on the selection")
    p.add_argument("--ft-steps", type=int, default=16, help="fine-tuning steps on ASDiv")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=192, help="LM tokens per row")
    p.add_argument("--embed-max-length", type=int, default=128, help="MiniLM tokens per text")
    p.add_argument("--eval-samples", type=int, default=64, help="asdiv-val rows for the held-out loss")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--arms", default="gotd,random,none")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lit_ft_got_d_bench"))
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "got_d.json"))
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    root = Path(tempfile.mkdtemp(prefix="got_d_bench_"))
    pool = root / "pool.jsonl"
    domains = write_pool(pool)
    args.cache = Path(args.cache)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            try:
                r = run_arm(arm, seed, str(pool), args, root)
            except Exception as e:  # noqa: BLE001  one failed arm must not lose the others' results
                r = {"arm": arm, "seed": seed, "error": f"{type(e).__name__}: {e}"}
            if "selected" in r:
                r["domain_shares"] = {d: c / len(r["selected"]) for d, c in
                                      sorted(Counter(domains[i] for i in r["selected"]).items())}
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "selected"}), flush=True)
            with open(args.out + ".partial", "w") as fh:  # what is done so far, should the run be cut short
                json.dump(rows, fh)
    pool_shares = {d: c / len(domains) for d, c in sorted(Counter(domains).items())}
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "pool": {"rows": len(domains), "shares": pool_shares, "sources": SOURCES}, "rows": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    if os.path.exists(args.out + ".partial"):
        os.remove(args.out + ".partial")
    print(f"\npool {len(domains)} rows, k {args.k}; pre-fine-tuning {args.pre_steps} steps, ASDiv fine-tuning "
          f"{args.ft_steps} steps (batch {args.batch_size}); held-out ASDiv loss on {args.eval_samples} asdiv-val rows\n")
    print("| arm | seed | loss after pre-fine-tuning | loss after ASDiv fine-tuning | domain shares of the selection |")
    print("|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['arm']} | {r['seed']} | failed: {r['error'][:120]} | | |")
            continue
        shares = ", ".join(f"{d} {s:.0%}" for d, s in r.get("domain_shares", {}).items()) or "-"
        pre = f"{r['loss_after_pre']:.4f}" if "loss_after_pre" in r else "-"
        print(f"| {r['arm']} | {r['seed']} | {pre} | {r['loss_after_ft']:.4f} | {shares} |")
    print(f"\npool shares: {', '.join(f'{d} {s:.0%}' for d, s in pool_shares.items())}")


if __name__ == "__main__":
    main()
