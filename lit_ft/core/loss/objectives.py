"""The objective contract: an extra loss term with its own normaliser (multi-token heads, token-level DPO, rollout,
distillation), at integration levels 2 (HF loss hook) and 3 (:class:`TokenLossHost`).

An :class:`Objective` is registered on a module's :class:`~lit_ft.core.loss.pipeline.TokenPipeline` with
:func:`lit_ft.core.loss.attach`. In every forward that computes the token loss it receives
:class:`ObjectiveInputs` — the final hidden states and the head (level 3) or the model's logits (level 2), the
shifted targets, the pipeline's keep-mask and weights, the batch — and returns the **sum** of its loss over its own
units. The engine divides that sum by the objective's normaliser: :meth:`Objective.objective_counts` says what one
micro-batch contributes (a count read from the batch alone, before any forward), the engine sums it over the
accumulation window and all ranks, and :meth:`Objective.objective_normaliser` turns the totals into the divisor.
So every term is normalised exactly under gradient accumulation and DDP, independently of the token loss and of
any term the user adds to the loss themselves.

Vocabulary-wide work goes through :meth:`ObjectiveInputs.chunked_loss`: at level 3 the chunked fused-linear base
(:func:`lit_ft.kernels.chunked_linear_loss`, never an ``[N, V]`` tensor), at level 2 the model's own logits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from lit_ft.core.introspect import CausalLMParts
from lit_ft.core.loss.primitives import logits_at, supervised_count


@dataclass
class ObjectiveInputs:
    """What an objective sees in one forward. Target-space tensors are ``[B, T]`` (position ``t`` predicts token
    ``t + 1``).

    Attributes:
        targets: shifted labels (``-100`` where no loss is taken); ``valid``: ``targets != -100``.
        keep: the tokens the pipeline keeps (scorers' keep-masks AND ``valid``); ``weights``: their composed
            per-token weights (scorers × ``batch["token_weights"]``), ``None`` when nothing weights tokens.
        batch: the batch of this forward; ``training``: a training forward (gradients flow).
        level: ``"mixin"`` (level 3: ``hidden`` and ``head`` set) or ``"hook"`` (level 2: ``logits`` set).
        hidden: final hidden states ``[B, T, D]`` with gradient (level 3).
        head: the lm_head weight/bias and logit scale/soft-cap (level 3).
        logits: the model's logits ``[B, T, V]`` (level 2; the model materialised them already).
    """

    targets: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor
    weights: torch.Tensor | None
    batch: Mapping[str, Any]
    training: bool
    level: str
    hidden: torch.Tensor | None = None
    head: CausalLMParts | None = None
    logits: torch.Tensor | None = None

    def logits_at(self, mask: torch.Tensor) -> torch.Tensor:
        """Logits ``[mask.sum(), V]`` (float32, with gradient) at the positions of a bool ``[B, T]`` mask. Level 3
        applies the head to those rows only; level 2 slices the model's logits."""
        if self.hidden is not None and self.head is not None:
            return logits_at(self.head, self.hidden, mask)
        if self.logits is None:  # pragma: no cover - the engine always sets one of the two
            raise RuntimeError("ObjectiveInputs has neither hidden states nor logits")
        if mask.shape != self.logits.shape[:2] or mask.dtype != torch.bool:
            raise ValueError(f"logits_at: mask must be bool {tuple(self.logits.shape[:2])}, got {mask.dtype} "
                             f"{tuple(mask.shape)}")
        return self.logits[mask.to(self.logits.device)].float()

    def chunked_loss(self, chunk_fn: Callable[..., torch.Tensor], mask: torch.Tensor,
                     rows: Mapping[str, torch.Tensor] | None = None, chunk_size: int | None = None) -> torch.Tensor:
        """``Σ chunk_fn(logits_block, **rows_block)`` over the rows of ``mask`` (bool ``[B, T]``), where each block
        holds at most ``chunk_size`` rows' float32 logits and ``rows`` are per-row inputs ``[mask.sum(), ...]``
        (e.g. a teacher's logits). Level 3 runs the chunked fused-linear base (no ``[N, V]`` tensor); level 2
        calls ``chunk_fn`` once on the model's logits at those rows. ``chunk_fn`` returns the **sum** over its rows."""
        rows = dict(rows or {})
        if self.hidden is not None and self.head is not None:
            from lit_ft.kernels import chunked_linear_loss

            h = self.hidden[mask]
            return chunked_linear_loss(
                h, self.head.weight, chunk_fn, rows, bias=self.head.bias, logit_scale=self.head.logit_scale,
                logit_softcap=self.head.logit_softcap, chunk_size=chunk_size,
            )
        return chunk_fn(self.logits_at(mask), **rows)


class Objective:
    """Mixin for a loss term on the token-loss engine. Subclasses set ``objective_name`` (the log prefix
    ``lit_ft/<objective_name>/``) and implement :meth:`objective_loss`; they override :meth:`objective_counts` /
    :meth:`objective_normaliser` when their unit is not the supervised token.

    The term added to the loss is ``objective_weight() · loss_sum / normaliser``; in training the normaliser is
    the window-and-ranks total, in evaluation this batch's.
    """

    objective_name: str = "objective"

    def objective_weight(self) -> float:
        """The term's weight in the total loss (default 1)."""
        return 1.0

    def objective_counts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """What one micro-batch contributes to the normaliser, read from the batch alone (this rank; summed over
        the accumulation window and all ranks by the engine). Default: its supervised tokens."""
        return {"tokens": supervised_count(batch)}

    def objective_normaliser(self, totals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The divisor from the summed counts (default: the supervised tokens)."""
        return totals["tokens"]

    def objective_loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:  # pragma: no cover - interface
        """The **sum** of the term over its units for this forward (a scalar), or ``None`` for nothing."""
        raise NotImplementedError
