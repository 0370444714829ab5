"""Token distribution shift (TDS; Lin et al. 2023, URIAL, "The Unlocking Spell on Base LLMs: Rethinking Alignment via
In-Context Learning", arXiv 2312.01552): how many positions of an aligned (fine-tuned) model's greedy answer the base
model would have decoded differently.

At answer position ``t`` the aligned model chose ``o_t``; the *base rank* of ``o_t`` is its rank in the base model's
next-token distribution given the same prefix ``q, o_1 .. o_{t-1}``. The paper's three kinds of position:

- **unshifted**: base rank 1 (the base model's top token too),
- **marginal**: base rank 2 or 3,
- **shifted**: base rank > 3.

The thresholds are arguments (``unshifted_max_rank=1``, ``marginal_max_rank=3`` are the paper's). Rank ``r`` is
``1 + #{v : base_logit[v] > base_logit[o_t]}``: a token tied with the base model's top logit counts as rank 1 (the
paper does not say how ties are ranked; with real-valued logits they are rare).
"""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics import Metric

from lit_ft.core.validate import check_int

__all__ = ["CATEGORIES", "TokenDistributionShiftMetric", "base_ranks", "categorize"]

#: the kinds of answer position, in the order of the metric's count vectors
CATEGORIES: tuple[str, ...] = ("unshifted", "marginal", "shifted")


def base_ranks(base_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The rank (1 = top) of ``tokens[..., t]`` in ``base_logits[..., t, :]`` (long, shape of ``tokens``).

    ``base_logits[..., t, :]`` must be the base model's scores for the token at ``t`` (already shifted: the logits
    of the prefix that ends just before ``t``). Ties with the chosen token's score do not count against it."""
    if base_logits.shape[:-1] != tokens.shape:
        raise ValueError(f"base_ranks: base_logits {tuple(base_logits.shape)} must be tokens {tuple(tokens.shape)} "
                         "plus a vocabulary dimension")
    chosen = base_logits.gather(-1, tokens.long().unsqueeze(-1))
    return (base_logits > chosen).sum(-1) + 1


def categorize(ranks: torch.Tensor, unshifted_max_rank: int = 1, marginal_max_rank: int = 3) -> torch.Tensor:
    """0 (unshifted), 1 (marginal) or 2 (shifted) per rank (long, shape of ``ranks``)."""
    return (ranks > unshifted_max_rank).long() + (ranks > marginal_max_rank).long()


class TokenDistributionShiftMetric(Metric):
    """Counts of unshifted / marginal / shifted answer positions (URIAL's token distribution shift), overall, per
    answer position and per shifted token id; sums, so they synchronise across DDP ranks exactly.

    ``update(base_logits, tokens, mask)``: ``tokens`` [B, T] are the aligned model's answer tokens, column ``t`` =
    answer position ``t`` (0 = the first answer token); ``base_logits`` [B, T, V] the base model's scores for each
    of them (teacher forcing over prompt + answer, shifted by one); ``mask`` [B, T] marks real answer tokens (an
    answer that stopped early, padding). See :func:`base_ranks` for the rank.

    ``compute()`` returns a dict (flattened by ``MetricCollection``):

    - ``unshifted_share`` / ``marginal_share`` / ``shifted_share``: the shares over all counted positions (NaN with
      none),
    - ``shifted_share_first_k``: the shifted share over answer positions ``0 .. first_k - 1``,
    - ``position_shares`` [max_positions, 3]: each position's shares (the paper's "TDS diminishes over time" curve;
      NaN at positions never reached), ``position_counts`` [max_positions] its token counts,
    - ``tokens``: the number of counted positions.

    States (all ``dist_reduce_fx="sum"``): ``counts`` [3]; ``position_category_counts`` [max_positions, 3]
    (positions ``>= max_positions`` are in ``counts`` but not in the curve); with ``vocab_size`` also
    ``shifted_by_token`` and ``seen_by_token`` [vocab_size] (a fixed-size vector, not a top-N dict, so it sums
    across ranks): :meth:`top_shifted` reads the most frequently shifted tokens from them.

    Args:
        unshifted_max_rank: the largest base rank that counts as unshifted (paper: 1).
        marginal_max_rank: the largest base rank that counts as marginal (paper: 3); ``>= unshifted_max_rank``.
        max_positions: answer positions tracked in the per-position curve.
        first_k: positions in ``shifted_share_first_k``, in [1, max_positions].
        vocab_size: track shifted counts per token id (``None`` = not tracked).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, unshifted_max_rank: int = 1, marginal_max_rank: int = 3, max_positions: int = 32,
                 first_k: int = 5, vocab_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        owner = type(self).__name__
        check_int(owner, "unshifted_max_rank", unshifted_max_rank, minimum=1)
        check_int(owner, "marginal_max_rank", marginal_max_rank, minimum=unshifted_max_rank)
        check_int(owner, "max_positions", max_positions, minimum=1)
        check_int(owner, "first_k", first_k, minimum=1, maximum=max_positions)
        check_int(owner, "vocab_size", vocab_size, minimum=1, allow_none=True, null_means="not tracked")
        self.unshifted_max_rank = unshifted_max_rank
        self.marginal_max_rank = marginal_max_rank
        self.max_positions = max_positions
        self.first_k = first_k
        self.vocab_size = vocab_size
        n = len(CATEGORIES)
        self.add_state("counts", torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("position_category_counts", torch.zeros(max_positions, n, dtype=torch.long),
                       dist_reduce_fx="sum")
        if vocab_size is not None:
            self.add_state("shifted_by_token", torch.zeros(vocab_size, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("seen_by_token", torch.zeros(vocab_size, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, base_logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Count one batch of answers (see the class docstring for the shapes)."""
        if tokens.dim() != 2:
            raise ValueError(f"{type(self).__name__}.update: tokens must be [batch, answer_len], got "
                             f"{tuple(tokens.shape)}")
        if mask is None:
            mask = torch.ones_like(tokens, dtype=torch.bool)
        elif mask.shape != tokens.shape:
            raise ValueError(f"{type(self).__name__}.update: mask {tuple(mask.shape)} must have the shape of tokens "
                             f"{tuple(tokens.shape)}")
        mask = mask.to(self.counts.device, torch.bool)
        tokens = tokens.to(self.counts.device)
        cat = categorize(base_ranks(base_logits, tokens).to(self.counts.device), self.unshifted_max_rank,
                         self.marginal_max_rank)
        n = len(CATEGORIES)
        self.counts += torch.bincount(cat[mask], minlength=n)
        pos = torch.arange(tokens.shape[1], device=mask.device).expand_as(tokens)
        tracked = mask & (pos < self.max_positions)
        flat = pos[tracked] * n + cat[tracked]
        self.position_category_counts += torch.bincount(flat, minlength=self.max_positions * n).view(-1, n)
        if self.vocab_size is not None:
            ids = tokens[mask].long()
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                raise ValueError(f"{type(self).__name__}.update: token ids must be in [0, {self.vocab_size}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
            self.seen_by_token += torch.bincount(ids, minlength=self.vocab_size)
            self.shifted_by_token += torch.bincount(ids[cat[mask] == 2], minlength=self.vocab_size)

    def compute(self) -> dict[str, torch.Tensor]:
        """The shares (see the class docstring)."""
        total = self.counts.sum()
        shares = self.counts.double() / total
        per_pos = self.position_category_counts.double()
        pos_total = per_pos.sum(-1)
        first = self.position_category_counts[: self.first_k].sum(0).double()
        out = {f"{name}_share": shares[i].float() for i, name in enumerate(CATEGORIES)}
        out["shifted_share_first_k"] = (first[2] / first.sum()).float()
        out["position_shares"] = (per_pos / pos_total[:, None]).float()
        out["position_counts"] = pos_total.long()
        out["tokens"] = total
        return out

    def top_shifted(self, n: int = 20) -> list[tuple[int, int, int]]:
        """The ``n`` most frequently shifted token ids as ``(token_id, times_shifted, times_seen)``, most shifted
        first (ties: the smaller id first); only tokens shifted at least once. Needs ``vocab_size``. Reads the
        current (local, unsynchronised) states: call after ``compute()`` inside a synced context, or on one
        process, for the global list."""
        if self.vocab_size is None:
            raise ValueError(f"{type(self).__name__}.top_shifted needs vocab_size (the metric was built without it)")
        shifted = self.shifted_by_token.cpu()
        seen = self.seen_by_token.cpu()
        order = sorted((i for i in torch.nonzero(shifted).flatten().tolist()), key=lambda i: (-int(shifted[i]), i))
        return [(i, int(shifted[i]), int(seen[i])) for i in order[:n]]
