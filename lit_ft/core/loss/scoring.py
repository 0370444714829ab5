"""What token scorers see and answer: :class:`TokenScores` in, :class:`TokenDecision` out, composed by
:func:`compose_decisions` (weights multiply, keep-masks AND)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TokenScores:
    """What scorers see for the current micro-batch. All tensors are ``[B, T]`` in *target* space
    (position ``t`` is the prediction of token ``t + 1``) and detached.

    Attributes:
        targets: shifted labels, ``ignore_index`` where no loss is taken.
        valid: ``targets != ignore_index``.
        nll / entropy / lse: float32 per-token quantities of the current model (0 where not valid); present when
            some registered scorer asked for them in ``token_needs``.
        batch: the batch dict as the training step received it (input_ids, labels, sample_idx, ...).
        training: whether this is a training forward (scorers may skip work in evaluation).
    """

    targets: torch.Tensor
    valid: torch.Tensor
    batch: Mapping[str, Any]
    nll: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    training: bool = True


@dataclass
class TokenDecision:
    """A scorer's answer. ``weights`` (float ``[B, T]``, ≥ 0) multiply token losses; ``keep`` (bool ``[B, T]``)
    removes tokens from the loss entirely (the fused op then skips their lm_head FLOPs). ``metrics`` are logged
    under ``lit_ft/<scorer name>/<metric>``."""

    weights: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class TokenScorer:
    """Mixin for callbacks that weight or select tokens inside the loss.

    Subclasses set ``token_needs`` (a subset of ``{"nll", "entropy", "lse"}``) and implement :meth:`score_tokens`.
    ``scorer_name`` names the log prefix.
    """

    token_needs: frozenset[str] = frozenset()
    scorer_name: str = "token_scorer"

    def score_tokens(self, scores: TokenScores) -> TokenDecision:  # pragma: no cover - interface
        raise NotImplementedError

    def nominal_keep_ratio(self) -> float:
        """The fraction of the supervised tokens this scorer keeps, as its paper normalises the loss (Rho-1:
        ``1 / (N · k%)``). The token loss of an accumulation window is divided by ``N_supervised × Π ratios``, a
        count known before the window's first forward (see :mod:`lit_ft.core.loss.window`). Weighting-only
        scorers keep 1.0 (the default)."""
        return 1.0

    def token_normaliser(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """This scorer's own normaliser of the token loss for one raw training micro-batch, in place of its
        supervised-token count: TL-Training divides by ``Σ_t w_t`` (``KeyTokenWeighting(normalize="weights")``).
        It must follow from the raw batch alone (it is counted ahead for the whole accumulation window and summed
        over ranks, like the count it replaces); the other scorers' nominal keep ratios still multiply it. At most
        one registered scorer may return one. Default ``None``: the supervised-token count."""
        return None

    def batch_for_count(self, batch: Mapping[str, Any]) -> Mapping[str, Any]:
        """The batch as the loss will see it, for counting ahead: a scorer that edits ``labels`` at batch start
        *deterministically* (CPT prepends its context's labels) returns the edited copy here. Default: unchanged."""
        return batch


def compose_decisions(
    decisions: Iterable[TokenDecision], valid: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Combine decisions: weights by product, keep-masks by AND (both restricted to ``valid``).

    Returns ``(weights or None, keep)``; ``keep`` is always a bool tensor (``valid`` when nobody selects).
    """
    weights: torch.Tensor | None = None
    keep = valid.clone()
    for d in decisions:
        if d.weights is not None:
            if d.weights.shape != valid.shape:
                raise ValueError(f"token weights have shape {tuple(d.weights.shape)}, expected {tuple(valid.shape)}")
            w = d.weights.detach().float()
            weights = w if weights is None else weights * w
        if d.keep is not None:
            if d.keep.shape != valid.shape or d.keep.dtype != torch.bool:
                raise ValueError(
                    f"token keep-mask must be bool {tuple(valid.shape)}, got {d.keep.dtype} {tuple(d.keep.shape)}"
                )
            keep &= d.keep
    return weights, keep
