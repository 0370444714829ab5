"""Make cDPO critical-token weights for dpo-en-demo with SmolLM2-135M-Instruct (CriticalTokenScoring.prepare), for
``benchmarks/token_dpo_quality.py --weights PATH``.

The positive / negative models are LoRA-SFT'd from SmolLM2-135M-Instruct on the chosen / rejected responses
(authors' settings: r 8 on the MLP projections, lr 3e-4, batch 6), then every rejected token of the scored pairs gets
``w = 1 − softmax(2 z_pos − z_neg)[y]``. The DataModule is built exactly as token_dpo_quality.py builds it (same
max_length, split, seed), so ``sample_idx`` and the labels agree. CPU regime: only the pairs of the first
``--batches`` training batches are scored and used to train the contrastive models (the DPO runs of
token_dpo_quality.py see exactly those: its batch order is seeded by the DataModule's seed, not the run's), and the
contrastive models train for ``--epochs`` over those responses. Writes the CriticalTokenScoring file
(``--cache``), the ``{sample_idx: {"chosen", "rejected"}}`` export token_dpo_quality.py reads (``--out``) and a
summary (``benchmarks/results/critical_token_weights.json``).

    OMP_NUM_THREADS=2 flock /tmp/lit_ft_heavy.lock .venv/bin/python benchmarks/critical_token_weights.py
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402


@torch.no_grad()
def base_surprise(base, batches, cache) -> torch.Tensor:
    """``1 − p_base(y_t)`` at the same rejected tokens, in the same order as the weights are gathered in ``main``."""
    out = []
    for batch in batches:
        logp = torch.log_softmax(base(input_ids=batch["rejected_input_ids"],
                                      attention_mask=batch["rejected_attention_mask"]).logits.float(), -1)
        labels = batch["rejected_labels"]
        p = logp[:, :-1].gather(-1, labels[:, 1:].clamp_min(0)[..., None]).squeeze(-1).exp()
        for b in range(labels.shape[0]):
            sup = labels[b] != -100
            sup[0] = False
            out.append(1 - p[b][sup[1:]])
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, default=12, help="training batches whose pairs are scored (the DPO "
                                                           "benchmark's --steps)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--max-length", type=int, default=192)
    p.add_argument("--val-pairs", type=int, default=16)
    p.add_argument("--epochs", type=int, default=1, help="contrastive-model epochs over the scored pairs")
    p.add_argument("--contrastive-batch-size", type=int, default=6)
    p.add_argument("--cache", default=os.path.join(REPO, "runs", "critical_token_scoring", "weights.pt"))
    p.add_argument("--out", default=os.path.join(REPO, "runs", "critical_token_scoring", "dpo_weights.pt"))
    p.add_argument("--summary", default=os.path.join(REPO, "benchmarks", "results", "critical_token_weights.json"))
    args = p.parse_args()

    from transformers import AutoModelForCausalLM

    from lit_ft.assets import resolve
    from lit_ft.callbacks import CriticalTokenScoring
    from lit_ft.data import PreferenceDataModule

    torch.manual_seed(0)
    dm = PreferenceDataModule(max_length=args.max_length, batch_size=args.batch_size, val_split=0.1,
                              max_val_samples=args.val_pairs, seed=0, min_prompt_length=args.max_length // 2)
    dm.setup("fit")
    batches = list(itertools.islice(dm.train_dataloader(), args.batches))
    base = AutoModelForCausalLM.from_pretrained(resolve("smollm2-135m-instruct")).eval()
    cb = CriticalTokenScoring(contrastive_epochs=args.epochs, contrastive_batch_size=args.contrastive_batch_size,
                              score_batch_size=8, cache_path=args.cache)
    t0 = time.perf_counter()
    cache = cb.prepare(batches, base, args.cache, "cpu")
    seconds = time.perf_counter() - t0

    export, rejected_w, critical = {}, [], []
    for batch in batches:
        chosen, rejected = cache.lookup(batch, only_neg=True)
        for b, idx in enumerate(batch["sample_idx"].tolist()):
            export[idx] = {"chosen": chosen[b].clone(), "rejected": rejected[b].clone()}
            sup = batch["rejected_labels"][b] != -100
            sup[0] = False
            rejected_w.append(rejected[b][sup])
    w = torch.cat(rejected_w)
    # how much of the weight is the contrast, and how much the base's own surprise 1 - p_base(y_t)
    surprise = base_surprise(base, batches, cache)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    torch.save(export, args.out)
    summary = {"config": vars(args), "scored_now": cb.scored_now, "seconds": round(seconds, 1),
               "pairs": len(cache), "rejected_tokens": int(w.numel()),
               "rejected_weight_mean": float(w.mean()), "rejected_weight_median": float(w.median()),
               "critical_fraction_w_gt_0.5": float((w > 0.5).float().mean()),
               "w_gt_0.9": float((w > 0.9).float().mean()), "w_lt_0.1": float((w < 0.1).float().mean()),
               "corr_w_vs_base_surprise": float(torch.corrcoef(torch.stack([w, surprise]))[0, 1]),
               "mean_abs_w_minus_base_surprise": float((w - surprise).abs().mean())}
    os.makedirs(os.path.dirname(args.summary), exist_ok=True)
    with open(args.summary, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps(summary, indent=1))
    print(f"\n| pairs | rejected tokens | mean w | median w | w > 0.5 | w > 0.9 | w < 0.1 | time s |\n|---|---|---|---|"
          f"---|---|---|---|\n| {summary['pairs']} | {summary['rejected_tokens']} | {summary['rejected_weight_mean']:.3f} "
          f"| {summary['rejected_weight_median']:.3f} | {summary['critical_fraction_w_gt_0.5']:.3f} | "
          f"{summary['w_gt_0.9']:.3f} | {summary['w_lt_0.1']:.3f} | {summary['seconds']} |")
    print(f"\ncorrelation of w with the base model's own 1 - p(y_t): {summary['corr_w_vs_base_surprise']:.4f}, "
          f"mean |difference| {summary['mean_abs_w_minus_base_surprise']:.4f}")
    print(f"\nweights for token_dpo_quality.py: --weights {args.out}")


if __name__ == "__main__":
    main()
