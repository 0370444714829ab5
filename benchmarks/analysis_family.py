"""The analysis family (TuCo, ForgettingMonitor, TokenDistributionShift) on full fine-tuning vs HalfFineTuning vs
LoRA: does HFT forget less than full fine-tuning by these measures, and where do fine-tuned models shift tokens?
(a benchmark, not a test).

Model: SmolLM2-135M-Instruct (real weights). Data: ASDiv (lit_ft assets), max_length 256, batch 8. Every arm starts
from the same weights, with the same seed and the same data order, for ``--steps`` AdamW steps (no weight decay):

* ``full``: every parameter, lr ``--lr`` (5e-5);
* ``hft``:  ``lit_ft.callbacks.HalfFineTuning()`` defaults (a random half of each layer's matrices), lr ``--lr``;
* ``lora``: ``CausalLMModule(peft=LORA)`` r 16, alpha 32, no dropout, on every attention and MLP projection,
  lr ``--lora-lr`` (1e-3: adapters starting at zero need a larger step than full weights).

Each arm's trained weights are cached under ``<runs-dir>/<arm>/`` (full / HFT: the whole state dict; LoRA: the
adapter tensors) with the settings that made them; a rerun with the same settings skips training.

Then, for each arm against the initial weights (LoRA: the same model with its adapters disabled, for TuCo and TDS):

* held-out ASDiv completion loss (``--eval-samples`` asdiv-val rows; the initial model too);
* ``evaluate_forgetting`` on the default held-out tasks, ``--forgetting-samples`` rows each, conjugate pig_latin:
  loss ratio (after / before, > 1 = forgetting), accuracy retention (< 1 = forgetting), conjugate recovery;
* ``evaluate_tuning_contribution`` on ``--tuco-prompts`` asdiv-val prompts: mean TuCo and per-layer |PTC| / |FTC|;
* ``evaluate_token_distribution_shift`` on ``--tds-prompts`` asdiv-val prompts, ``--tds-new-tokens`` greedy tokens:
  unshifted / marginal / shifted shares, the shifted share of the first 5 answer positions, the share by position.

Writes a markdown table (stdout), ``benchmarks/results/analysis_family.json`` and the pictures
``docs/images/analysis_family/<arm>_{tuco_layers,tds_positions}.png``.

    python benchmarks/analysis_family.py                 # the real run
    python benchmarks/analysis_family.py --tiny          # the whole pipeline on a tiny random Llama, in a temp dir
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from lit_ft.callbacks import HalfFineTuning
from lit_ft.callbacks.analysis._tds_pictures import position_curve
from lit_ft.callbacks.analysis.forgetting_monitor import evaluate_forgetting
from lit_ft.callbacks.analysis.token_distribution_shift import evaluate_token_distribution_shift
from lit_ft.callbacks.analysis.tuning_contribution import per_layer_bars
from lit_ft.core.pictures import save_figure
from lit_ft.data import SFTDataModule
from lit_ft.metrics import evaluate_tuning_contribution
from lit_ft.modules import CausalLMModule

ARMS = ("full", "hft", "lora")
LORA = {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
REPO = Path(__file__).resolve().parent.parent


# -- setup ------------------------------------------------------------------------------------------------------
class Setup:
    """Where the model, data, tokenizer and forgetting tasks come from: the real assets, or tiny hub-free ones."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tiny = args.tiny
        if not self.tiny:
            self.model_kwargs: dict[str, Any] = {"model": "smollm2-135m-instruct"}
            self.data_kwargs: dict[str, Any] = {"data": "asdiv", "tokenizer": "smollm2-135m-instruct"}
            self.tasks: list[str] | None = None  # evaluate_forgetting's defaults
            return
        from lit_ft.testing import (
            make_tiny_tokenizer, tiny_llama_config, write_tiny_classification_jsonl, write_tiny_sft_jsonl,
        )

        root = Path(args.tmp)
        tok = make_tiny_tokenizer(root / "tokenizer")
        self.model_kwargs = {"model_config": tiny_llama_config()}
        self.data_kwargs = {"data": write_tiny_sft_jsonl(root / "train.jsonl", n=64, seed=0),
                            "val_data": write_tiny_sft_jsonl(root / "val.jsonl", n=24, seed=1), "tokenizer": tok}
        self.tasks = [write_tiny_sft_jsonl(root / "tiny_generation.jsonl", n=16, seed=2),
                      write_tiny_classification_jsonl(root / "tiny_choice.jsonl", n=16, seed=3)]

    def module(self, arm: str | None, lr: float) -> CausalLMModule:
        """A fresh module with the initial weights (seeded: a tiny random model gets the same init every time)."""
        pl.seed_everything(self.args.seed, verbose=False)
        peft = LORA if arm == "lora" else None
        return CausalLMModule(**self.model_kwargs, learning_rate=lr, weight_decay=0.0, peft=peft)

    def datamodule(self) -> SFTDataModule:
        dm = SFTDataModule(**self.data_kwargs, max_length=256, batch_size=self.args.batch_size, eval_batch_size=8,
                           max_val_samples=self.args.eval_samples, seed=self.args.seed)
        dm.setup("fit")
        return dm


def _lr(arm: str, args: argparse.Namespace) -> float:
    return args.lora_lr if arm == "lora" else args.lr


def _trainer(args: argparse.Namespace, **kw: Any) -> pl.Trainer:
    return pl.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=args.tmp, **kw)


# -- training with a cache --------------------------------------------------------------------------------------
def _settings(arm: str, args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """What the cached weights depend on: a cache made with other settings is retrained, never reused."""
    return {"arm": arm, "tiny": args.tiny, "model": str(setup.model_kwargs), "steps": args.steps,
            "lr": _lr(arm, args), "seed": args.seed, "batch_size": args.batch_size, "max_length": 256,
            "peft": LORA if arm == "lora" else None}


def _saved_tensors(module: CausalLMModule, arm: str) -> dict[str, torch.Tensor]:
    # LoRA: only the adapters (the base is the initial model, rebuilt on load); otherwise every weight
    if arm == "lora":
        return {n: p.detach().cpu() for n, p in module.model.named_parameters() if "lora_" in n}
    return {k: v.detach().cpu() for k, v in module.model.state_dict().items()}


def trained(arm: str, args: argparse.Namespace, setup: Setup) -> CausalLMModule:
    """The arm's fine-tuned module: from ``<runs-dir>/<arm>/`` when cached with the same settings, else trained
    (and cached)."""
    folder = Path(args.runs_dir) / arm
    weights, meta = folder / "weights.pt", folder / "meta.json"
    settings = _settings(arm, args, setup)
    module = setup.module(arm, _lr(arm, args))
    if weights.exists() and meta.exists() and json.loads(meta.read_text()) == settings:
        state = torch.load(weights, map_location="cpu")
        result = module.model.load_state_dict(state, strict=arm != "lora")
        if result.unexpected_keys:
            raise RuntimeError(f"{weights}: keys the {arm} model does not have: {result.unexpected_keys[:5]}")
        print(f"[{arm}] loaded cached weights from {weights}", flush=True)
        return module
    if weights.exists():
        print(f"[{arm}] cache at {folder} was made with other settings: retraining", flush=True)
    dm = setup.datamodule()  # built after the module so every arm sees the same data order (the dm's own seed)
    callbacks = [HalfFineTuning()] if arm == "hft" else []
    t0 = time.perf_counter()
    _trainer(args, max_steps=args.steps, limit_val_batches=0, callbacks=callbacks).fit(module, datamodule=dm)
    print(f"[{arm}] trained {args.steps} steps in {time.perf_counter() - t0:.1f} s", flush=True)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(_saved_tensors(module, arm), weights)
    meta.write_text(json.dumps(settings, indent=1))
    return module


# -- evaluation -------------------------------------------------------------------------------------------------
def heldout_loss(module: CausalLMModule, args: argparse.Namespace, setup: Setup) -> float:
    out = _trainer(args).validate(module, datamodule=setup.datamodule(), verbose=False)
    return float(out[0]["val/loss"])


def val_batches(setup: Setup, n: int, device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The first ``n`` asdiv-val rows as batches on ``device`` (the last one cut to size)."""
    left = n
    for batch in setup.datamodule().val_dataloader():
        if left <= 0:
            return
        rows = min(left, int(batch["input_ids"].shape[0]))
        yield {k: v[:rows].to(device) for k, v in batch.items() if torch.is_tensor(v)}
        left -= rows


def analyse(arm: str, before: CausalLMModule, after: CausalLMModule, setup: Setup, device: torch.device,
            args: argparse.Namespace) -> dict[str, Any]:
    """The three analyses of one arm against the initial weights."""
    after.to(device).eval()
    tok = setup.datamodule().tokenizer
    lora = arm == "lora"
    base = None if lora else before.model  # LoRA: the adapters disabled give the base (the hooks' documented path)
    t0 = time.perf_counter()
    forgetting = evaluate_forgetting(before.model, after.model, setup.tasks, tok, conjugate="pig_latin",
                                     max_samples=args.forgetting_samples, seed=args.seed)
    tuco = evaluate_tuning_contribution(base, after.model, list(val_batches(setup, args.tuco_prompts, device)))
    tds = evaluate_token_distribution_shift(base, after.model, list(val_batches(setup, args.tds_prompts, device)),
                                            max_new_tokens=args.tds_new_tokens, tokenizer=tok, first_k=5)
    print(f"[{arm}] analyses in {time.perf_counter() - t0:.1f} s", flush=True)
    return {"forgetting": forgetting, "tuco": tuco, "tds": tds}


def draw(arm: str, res: Mapping[str, Any], out_dir: Path) -> list[str]:
    tuco, tds = res["tuco"], res["tds"]
    figs = {"tuco_layers": per_layer_bars(torch.tensor(tuco["ptc_layer"]), torch.tensor(tuco["ftc_layer"])),
            "tds_positions": position_curve(torch.tensor(tds["position_shares"]),
                                            torch.tensor(tds["position_counts"]))}
    paths = []
    for name, fig in figs.items():
        fig.suptitle(arm, fontsize=9)
        fig.set_dpi(80)  # small PNGs for the docs
        paths.append(save_figure(fig, str(out_dir / f"{arm}_{name}.png")))
    return paths


# -- report -----------------------------------------------------------------------------------------------------
def _f(x: Any, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def table(results: Mapping[str, Any]) -> str:
    arms = [a for a in results["arms"] if a in ARMS]
    forg = results["arms"][arms[0]]["forgetting"] if arms else {}
    tasks = sorted(k[: -len("/loss_ratio")] for k in forg if k.endswith("/loss_ratio") and "conjugate" not in k)
    head = (["arm", "ASDiv held-out loss"] + [f"{t} loss ratio" for t in tasks]
            + [f"{t} acc. retention" for t in tasks] + [f"{t} conj. recovery (acc)" for t in tasks]
            + ["TuCo mean", "TDS unshifted", "TDS marginal", "TDS shifted", "TDS shifted, first 5"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = results["arms"]["initial"]
    lines.append("| initial | " + _f(base["heldout_loss"]) + " |" + " – |" * (len(head) - 2))
    for arm in arms:
        r = results["arms"][arm]
        fo, tu, td = r["forgetting"], r["tuco"], r["tds"]
        cells = [arm, _f(r["heldout_loss"])]
        cells += [_f(fo.get(f"{t}/loss_ratio")) for t in tasks]
        cells += [_f(fo.get(f"{t}/accuracy_retention")) for t in tasks]
        cells += [_f(fo.get(f"{t}/recovery_accuracy"), "+.3f") for t in tasks]
        cells += [_f(tu["tuco"], ".4f"), _f(td["unshifted_share"]), _f(td["marginal_share"]),
                  _f(td["shifted_share"]), _f(td["shifted_share_first_k"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="training steps per arm (default 40)")
    p.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning and HFT learning rate")
    p.add_argument("--lora-lr", type=float, default=1e-3, help="LoRA learning rate")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--eval-samples", type=int, default=128, help="asdiv-val rows for the held-out loss")
    p.add_argument("--forgetting-samples", type=int, default=16, help="rows per forgetting task")
    p.add_argument("--tuco-prompts", type=int, default=16)
    p.add_argument("--tds-prompts", type=int, default=8)
    p.add_argument("--tds-new-tokens", type=int, default=24)
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto: the GPU when there is one)")
    p.add_argument("--runs-dir", default=None, help="trained-weights cache (default runs/analysis_family)")
    p.add_argument("--json", default=None, help="default benchmarks/results/analysis_family.json")
    p.add_argument("--images", default=None, help="default docs/images/analysis_family")
    p.add_argument("--tiny", action="store_true",
                   help="tiny random Llama, tiny tokenizer and JSONL data; outputs not given default to a temp dir")
    args = p.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-Trainer banners between the rows
    for name in ("steps", "batch_size", "eval_samples", "forgetting_samples", "tuco_prompts", "tds_prompts",
                 "tds_new_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.tmp = tempfile.mkdtemp(prefix="lit_ft_analysis_family_")
    # a smoke run writes nowhere in the repository unless told to
    root = Path(args.tmp) if args.tiny else REPO
    args.runs_dir = args.runs_dir or str(root / "runs" / "analysis_family")
    args.json = args.json or str(root / "benchmarks" / "results" / "analysis_family.json")
    args.images = args.images or str(root / "docs" / "images" / "analysis_family")
    setup = Setup(args)
    use_gpu = args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda" if use_gpu else "cpu")

    before = setup.module(None, args.lr)
    results: dict[str, Any] = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("tmp",)} | {"lora": LORA},
        "arms": {"initial": {"heldout_loss": heldout_loss(before, args, setup)}},
    }
    before.to(device).eval()
    for arm in args.arms:
        after = trained(arm, args, setup)
        res = {"heldout_loss": heldout_loss(after, args, setup), **analyse(arm, before, after, setup, device, args)}
        res["pictures"] = draw(arm, res, Path(args.images))
        results["arms"][arm] = res
        del after  # one fine-tuned model in memory at a time
    print(table(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(f"wrote {args.json} and pictures under {args.images}")
    return results


if __name__ == "__main__":
    main()
