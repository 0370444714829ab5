"""Token selection under label noise, Rho-1's setting (a benchmark, not a test; issue 12's first study).

ASDiv math word problems ("The answer is N.") with a known share of corrupted answers in the training rows (the
number replaced by a wrong one), a small *clean* split kept apart, and the clean held-out asdiv-val rows:

1. the reference: plain SFT of SmolLM2-135M-Instruct on the clean split (Rho-1's recipe: a reference trained on
   high-quality data), saved once as a weights-only checkpoint;
2. per arm and seed, full fine-tuning on the noisy rows with the same steps, data order and evaluation: plain SFT,
   ExcessLossSelection against that reference (Rho-1), SSToken and QTuning at their defaults, and KeyTokenWeighting
   (its whole_spans preset, key = the answer's digits);
3. clean held-out completion loss and exact match (greedy, last number of a 16-token answer).

Every row (and the reference) is cached under ``--cache`` (default ``runs/bench/token_selection_noise/``) as soon as
it finishes, keyed by the arguments that change it, so an interrupted study resumes and a rerun only renders the
table (``--force`` reruns). Writes ``benchmarks/results/token_selection_noise.json``, prints the markdown table for
docs/benchmarks.md and, with ``--plot``, a PNG.

    python benchmarks/token_selection_noise.py --seeds 0,1 --plot docs/img/token_selection_noise.png
    python benchmarks/token_selection_noise.py --steps 3 --ref-steps 2 --eval-samples 8 --seeds 0 \\
        --cache /tmp/tsn --no-results   # a smoke run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
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
from lit_ft.data import SFTDataModule  # noqa: E402
from lit_ft.modules import CausalLMModule  # noqa: E402

MODEL = "smollm2-135m-instruct"

#: arm -> (callbacks factory given the reference folder, extra SFTDataModule options)
ARMS: dict[str, tuple[Callable[[str], list[pl.Callback]], dict[str, Any]]] = {
    "plain SFT": (lambda ref: [], {}),
    "ExcessLossSelection (Rho-1, clean reference)": (lambda ref: [cbs.ExcessLossSelection(reference=ref)], {}),
    "SSToken": (lambda ref: [cbs.SSToken()], {}),
    "QTuning": (lambda ref: [cbs.QTuning()], {}),
    # the default preset (TL-Training) needs tool-call parameter boundaries; ASDiv's key spans are the answer digits
    "KeyTokenWeighting (whole_spans, key = answer digits)": (
        lambda ref: [cbs.KeyTokenWeighting(preset="whole_spans")], {"key_span_patterns": [r"\d+"]}),
}


def _rows(name: str) -> list[dict[str, Any]]:
    from lit_ft.assets import get

    with open(get(name)) as f:
        return [json.loads(line) for line in f]


def _corrupt(row: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """The same question with a wrong answer: the number moved by a non-zero offset (never negative)."""
    answer = int(float(row["answer"]))
    wrong = answer
    while wrong == answer or wrong < 0:
        wrong = answer + rng.choice([-1, 1]) * rng.randint(1, max(3, abs(answer)))
    completion = re.sub(re.escape(str(row["answer"])) + r"(?!.*\d)", str(wrong), row["completion"])
    return {**row, "completion": completion, "answer": str(wrong), "corrupted": True}


def make_splits(args: argparse.Namespace, cache: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The clean reference split and the noisy training split as JSONL files in ``cache`` (seeded: the same files
    for every arm and seed)."""
    rows = [r for r in _rows("asdiv") if re.fullmatch(r"\d+", str(r["answer"]).strip())]
    rng = random.Random(args.data_seed)
    rng.shuffle(rows)
    clean, train = rows[: args.clean_rows], rows[args.clean_rows : args.clean_rows + args.train_rows]
    noisy_ids = set(rng.sample(range(len(train)), round(args.noise * len(train))))
    correct = list(train)  # the training rows with their true answers (the oracle diagnosis's reference data only)
    train = [_corrupt(r, rng) if i in noisy_ids else {**r, "corrupted": False} for i, r in enumerate(train)]
    clean_path, train_path = cache / "clean.jsonl", cache / "noisy_train.jsonl"
    for path, data in ((clean_path, clean), (train_path, train), (cache / "train_correct.jsonl", correct)):
        with open(path, "w") as f:
            for r in data:
                f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    info = {"clean_rows": len(clean), "train_rows": len(train), "corrupted": len(noisy_ids),
            "example": next(r for r in train if r["corrupted"]), "corrupted_ids": sorted(noisy_ids)}
    return clean_path, train_path, info


def _datamodule(data: str, args: argparse.Namespace, seed: int, **extra: Any) -> SFTDataModule:
    return SFTDataModule(data=data, val_data="asdiv-val", tokenizer=MODEL, max_length=256, batch_size=args.batch_size,
                         eval_batch_size=16, max_val_samples=args.eval_samples, seed=seed, **extra)


def _trainer(steps: int, callbacks: list[pl.Callback], validate: bool, root: Path) -> pl.Trainer:
    # root: where techniques draw their pictures (QTuning's EU plane), never the working directory
    return pl.Trainer(default_root_dir=str(root), max_steps=steps, val_check_interval=steps if validate else None, limit_val_batches=None if validate else 0,
                      num_sanity_val_steps=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, log_every_n_steps=1, callbacks=callbacks)


def train_reference(clean: Path, args: argparse.Namespace, folder: Path) -> Path:
    """Plain SFT on the clean split, saved as a weights-only Lightning checkpoint (ExcessLossSelection loads it)."""
    if folder.is_file() and not args.force:
        return folder
    pl.seed_everything(args.data_seed, verbose=False)
    module = CausalLMModule(model=MODEL, learning_rate=args.lr, warmup_steps=5)
    trainer = _trainer(args.ref_steps, [], validate=False, root=folder.parent)
    trainer.fit(module, datamodule=_datamodule(str(clean), args, args.data_seed))
    trainer.save_checkpoint(folder, weights_only=True)  # the Rho-1 recipe's reference.ckpt
    return folder


def train_oracle_reference(args: argparse.Namespace, cache: Path) -> Path:
    """An *oracle* reference for the diagnosis only: the same SFT recipe as :func:`train_reference`, on the true
    versions of exactly the training rows the diagnosis scores (it has seen their correct answers). Not a recipe: an
    upper bound on what Rho-1's score can separate when the reference knows the task."""
    folder = cache / f"oracle_reference_{_key(args, args.diagnose)}.ckpt"
    if folder.is_file() and not args.force:
        return folder
    dm = _datamodule(str(cache / "noisy_train.jsonl"), args, args.data_seed)
    dm.setup("fit")
    wanted: list[int] = []
    for batch in dm.train_dataloader():  # the diagnosis's rows: the first --diagnose of the same loader
        wanted += [int(i) for i in batch["sample_idx"]]
        if len(wanted) >= args.diagnose:
            break
    correct = (cache / "train_correct.jsonl").read_text().splitlines()
    oracle_rows = cache / "oracle_rows.jsonl"
    oracle_rows.write_text("".join(
        json.dumps({k: json.loads(correct[i])[k] for k in ("prompt", "completion")}) + "\n" for i in wanted))
    pl.seed_everything(args.data_seed, verbose=False)
    module = CausalLMModule(model=MODEL, learning_rate=args.lr, warmup_steps=5)
    trainer = _trainer(args.ref_steps, [], validate=False, root=cache)
    trainer.fit(module, datamodule=_datamodule(str(oracle_rows), args, args.data_seed))
    trainer.save_checkpoint(folder, weights_only=True)
    return folder


def run_arm(name: str, train: Path, reference: Path, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    make, data_options = ARMS[name]
    pl.seed_everything(seed, verbose=False)
    module = CausalLMModule(model=MODEL, learning_rate=args.lr, warmup_steps=5, eval_exact_match=args.eval_samples,
                            max_new_tokens=16, eval_before_training=False)
    trainer = _trainer(args.steps, make(str(reference)), validate=True, root=Path(args.cache))
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=_datamodule(str(train), args, seed, **data_options))
    m = trainer.callback_metrics
    return {"name": name, "seed": seed, "loss": float(m["val/loss"]),
            "exact_match": float(m.get("val/exact_match", float("nan"))), "wall_s": time.perf_counter() - t0}


def diagnose(train: Path, reference: Path, args: argparse.Namespace, corrupted: set[int]) -> dict[str, Any]:
    """What Rho-1's score does with the noise at step 0: score ``--diagnose`` training rows with the starting model
    and the clean reference, keep the top ``keep_ratio`` of all their supervised tokens by excess loss
    (ℓ_θ − ℓ_ref; ExcessLossSelection's default 0.6, ranked over the rows together as over one step's batch), and
    report the kept share of three kinds of tokens: the answer number of a corrupted row (the noise), the answer
    number of a clean row, and every other supervised token (the wording, "The answer is", end of turn)."""
    import torch

    from lit_ft.callbacks import ExcessLossSelection

    keep_ratio = ExcessLossSelection().keep_ratio
    dm = _datamodule(str(train), args, args.data_seed)
    dm.setup("fit")
    base = CausalLMModule(model=MODEL).eval()
    ref = CausalLMModule(model=MODEL).eval()  # the checkpoint holds weights only: load them into a fresh module
    state = torch.load(reference, map_location="cpu", weights_only=True)["state_dict"]
    missing, unexpected = ref.load_state_dict(state, strict=False)
    if unexpected or any("lm_head" not in k for k in missing):  # the tied lm_head may be left out
        raise SystemExit(f"{reference}: not a reference of {MODEL} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    tok = dm.tokenizer
    scores, kinds = [], []
    seen = 0
    with torch.no_grad():
        for batch in dm.train_dataloader():
            labels = batch["labels"][:, 1:]
            nll = []
            for m in (base, ref):
                logits = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
                nll.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2).float(), labels.clamp_min(0),
                                                             reduction="none"))
            excess = nll[0] - nll[1]
            for row in range(labels.shape[0]):
                idx = int(batch["sample_idx"][row])
                sup = (labels[row] >= 0).nonzero().flatten().tolist()
                # the answer number: the supervised tokens that decode to digits, the last run of them
                digits = [t for t in sup if tok.decode([int(labels[row, t])]).strip().isdigit()]
                last_run = [t for t in digits if all(u in digits for u in range(t, max(digits) + 1))]
                for t in sup:
                    kind = ("corrupted answer" if idx in corrupted else "clean answer") if t in last_run else "other"
                    scores.append(float(excess[row, t]))
                    kinds.append(kind)
            seen += labels.shape[0]
            if seen >= args.diagnose:
                break
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept = set(order[: int(round(keep_ratio * len(scores)))])
    out: dict[str, Any] = {"rows": seen, "keep_ratio": keep_ratio, "tokens": len(scores)}
    for kind in ("corrupted answer", "clean answer", "other"):
        ids = [i for i, k in enumerate(kinds) if k == kind]
        out[kind] = {"tokens": len(ids), "kept_share": sum(i in kept for i in ids) / max(len(ids), 1),
                     "mean_excess": statistics.mean(scores[i] for i in ids) if ids else float("nan")}
    return out


def _key(args: argparse.Namespace, *extra: Any) -> str:
    fields = (args.steps, args.ref_steps, args.batch_size, args.lr, args.eval_samples, args.noise, args.clean_rows,
              args.train_rows, args.data_seed, *extra)
    return hashlib.sha256(repr(fields).encode()).hexdigest()[:12]


def table(rows: list[dict[str, Any]], args: argparse.Namespace, info: dict[str, Any]) -> str:
    by_arm: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_arm.setdefault(r["name"], []).append(r)
    base = by_arm.get("plain SFT")
    base_loss = statistics.mean(r["loss"] for r in base) if base else float("nan")
    lines = [
        f"SmolLM2-135M-Instruct, full fine-tuning on {info['train_rows']} ASDiv rows of which {info['corrupted']} "
        f"({args.noise:.0%}) have a wrong answer; the reference: plain SFT on {info['clean_rows']} other, clean rows "
        f"for {args.ref_steps} steps. {args.steps} steps x batch {args.batch_size}, AdamW lr {args.lr}, seeds "
        f"{args.seeds}; held-out: {args.eval_samples} clean asdiv-val rows.",
        "",
        "| arm | clean held-out loss (mean over seeds) | vs plain | exact match (mean) | per seed (loss / EM) |",
        "|---|---|---|---|---|",
    ]
    for name, rs in by_arm.items():
        loss = statistics.mean(r["loss"] for r in rs)
        em = statistics.mean(r["exact_match"] for r in rs)
        per = ", ".join(f"{r['loss']:.4f} / {r['exact_match']:.3f}" for r in sorted(rs, key=lambda r: r["seed"]))
        lines.append(f"| {name} | {loss:.4f} | {loss / base_loss:.3f}x | {em:.3f} | {per} |")
    return "\n".join(lines)


def diagnosis_table(d: dict[str, Any], reference: str = "the clean reference") -> str:
    lines = [f"Step 0, {d['rows']} training rows ({d['tokens']} supervised tokens): ExcessLossSelection's score "
             f"(starting model minus {reference}), top {d['keep_ratio']:.0%} kept over all of them.", "",
             "| supervised tokens | count | kept share | mean excess loss |", "|---|---|---|---|"]
    for kind in ("corrupted answer", "clean answer", "other"):
        k = d[kind]
        lines.append(f"| {kind} number tokens | {k['tokens']} | {k['kept_share']:.3f} | {k['mean_excess']:.3f} |"
                     if kind != "other" else
                     f"| every other supervised token | {k['tokens']} | {k['kept_share']:.3f} | {k['mean_excess']:.3f} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.2))
    FigureCanvasAgg(fig)
    for i, (key, title) in enumerate((("loss", "clean held-out loss (lower is better)"), ("exact_match", "exact match"))):
        ax = fig.add_subplot(1, 2, i + 1)
        bar_plot(ax, rows, key, lambda n: n == "plain SFT")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--ref-steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--eval-samples", type=int, default=200)
    p.add_argument("--noise", type=float, default=0.4, help="share of training rows with a wrong answer")
    p.add_argument("--clean-rows", type=int, default=300)
    p.add_argument("--train-rows", type=int, default=1200)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seeds", type=str, default="0,1")
    add_cache_arguments(p, os.path.join(REPO, "runs", "bench", "token_selection_noise"))
    p.add_argument("--diagnose", type=int, default=0,
                   help="also score this many training rows at step 0: the kept share of corrupted answer tokens")
    p.add_argument("--oracle", action="store_true",
                   help="with --diagnose: the same diagnosis with an oracle reference trained on the true answers of "
                        "the diagnosed rows (an upper bound on the mechanism, not a recipe)")
    args = p.parse_args()
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    clean, train, info = make_splits(args, cache)
    reference = train_reference(clean, args, cache / f"reference_{_key(args)}.ckpt")
    rows = cached_rows(args, list(ARMS), lambda name, seed: _key(args, name, seed),
                       lambda name, seed: run_arm(name, train, reference, args, seed))
    md = table(rows, args, info)
    if args.diagnose:
        diag = diagnose(train, reference, args, set(info["corrupted_ids"]))
        info["diagnosis"] = diag
        md += "\n\n" + diagnosis_table(diag)
        if args.oracle:
            oracle = diagnose(train, train_oracle_reference(args, cache), args, set(info["corrupted_ids"]))
            info["oracle_diagnosis"] = oracle
            md += "\n\n" + diagnosis_table(oracle, f"an oracle reference: the same {args.ref_steps}-step SFT on the "
                                                    "true answers of these rows")
    print(md)
    write_results(REPO, "token_selection_noise", args, rows, md, data=info)
    if args.plot:
        _plot(rows, args.plot)


if __name__ == "__main__":
    main()
