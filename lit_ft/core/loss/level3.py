"""Integration level 3: the token loss from final hidden states and the lm_head through the fused op.

:class:`TokenLossHost` is the engine behind the user-facing :class:`lit_ft.modules.TokenLossMixin`: it runs the
trunk, hands per-token quantities (NLL, entropy, LSE) to the registered scorers, computes ``Σ w·ℓ`` over the kept
tokens only (dropped tokens are packed out before the lm_head matmul, so they cost no lm_head FLOPs), adds the
registered objectives' terms (which get the hidden states and the head, never ``[N, V]`` logits) and normalises
every term by its window count (:mod:`lit_ft.core.loss.pipeline`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.introspect import CausalLMParts, find_hf_model
from lit_ft.core.loss.objectives import ObjectiveInputs
from lit_ft.core.loss.pipeline import TokenPipeline, token_pipeline_for
from lit_ft.core.loss.primitives import (
    TokenStats,
    batch_token_weights,
    final_hidden_states,
    shift_targets,
    token_stats,
)
from lit_ft.core.loss.scoring import TokenScores

_flop_formulas_registered = False


def _ensure_flop_formulas() -> None:
    """Register the fused op's FLOP formulas (so profiling a lit_ft module with FlopCounterMode counts the fused
    lm_head) at the first loss, not at import: ``torch.utils.flop_counter`` imports triton."""
    global _flop_formulas_registered
    if not _flop_formulas_registered:
        from lit_ft.kernels.token_ce.flops import register

        register()
        _flop_formulas_registered = True


@dataclass
class TokenLossOutput:
    """``loss``: what ``training_step`` returns (value = mean over kept tokens plus the objectives' terms; gradient
    normalised by the window counts in training). ``mean``: detached mean token loss for logging (without the
    objectives). ``n_tokens``: kept tokens in this batch. ``objectives``: detached value of each objective's term
    (``objective_name -> weight · sum / normaliser``), empty when none contributed."""

    loss: torch.Tensor
    mean: torch.Tensor
    n_tokens: torch.Tensor
    keep: torch.Tensor
    weights: torch.Tensor | None
    objectives: dict[str, torch.Tensor]


def _trainer_of(module: Any) -> Any:
    return getattr(module, "_trainer", None)


def token_loss_from_hidden(
    pipeline: TokenPipeline,
    parts: CausalLMParts,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    batch: Mapping[str, Any],
    *,
    training: bool,
    accumulate: int = 1,
    world_size: int = 1,
    count_batch: Mapping[str, Any] | None = None,
    impl: str = "auto",
    weight_grad_accumulation: str = "fp32",
    chunk_size: int | None = None,
) -> TokenLossOutput:
    """The token loss of a pipeline from final hidden states ``[B, T, D]`` and the lm_head, through the fused op.

    The one implementation behind :meth:`TokenLossHost.compute_token_loss` (level 3) and the fused forward of a plain
    HF model (:func:`lit_ft.core.loss.fused_forward.patch_fused_loss`, which sees a level-2 hook's pipeline):
    scorers get per-token NLL / entropy / LSE from a no-grad pass of the op, decide weights / keep-mask; the op
    computes ``Σ w·ℓ`` over kept tokens only; objectives get the hidden states and the head; every term is
    normalised by its window count (:meth:`TokenPipeline.combine`).

    Args:
        pipeline: the module's scorers, objectives and window counts.
        parts: the trunk / lm_head / logit transforms (:func:`lit_ft.core.introspect.causal_lm_parts`).
        hidden: final hidden states ``[B, T, D]`` (with gradient in training).
        targets: shifted labels ``[B, T]`` (:func:`~lit_ft.core.loss.primitives.shift_targets`), ``-100`` ignored.
        batch: the batch scorers and objectives read (``{}`` when the caller has none bound).
        training: a training forward (scorers' ``needs`` are computed, batch token weights apply, the gradient is
            normalised by the window totals).
        accumulate, world_size: ``accumulate_grad_batches`` and the number of ranks (see ``combine``).
        count_batch: the batch whose labels are counted when no window is bound (default ``batch``).
        impl, weight_grad_accumulation, chunk_size: passed to :func:`lit_ft.kernels.fused_linear_token_ce`.
    """
    B, T, D = hidden.shape
    valid = targets != IGNORE_INDEX

    weights: torch.Tensor | None = None
    keep = valid
    if pipeline.scorers:
        needs = pipeline.needs if training else frozenset()
        stats = token_stats(parts, hidden, targets, needs, impl) if needs else TokenStats()
        scores = TokenScores(
            targets=targets, valid=valid, batch=batch, nll=stats.nll, entropy=stats.entropy, lse=stats.lse,
            training=training,
        )
        weights, keep = pipeline.decide(scores)
    if training and batch.get("token_weights") is not None:
        # batch-level weights (level-1 producers) are aligned with the labels: shift them the same way
        bw = batch_token_weights(batch).to(hidden.device)
        weights = bw if weights is None else weights * bw

    from lit_ft.kernels import fused_linear_token_ce

    loss_sum = fused_linear_token_ce(
        hidden.reshape(B * T, D),
        parts.weight,
        targets.reshape(B * T),
        bias=parts.bias,
        token_weights=None if weights is None else weights.reshape(B * T),
        keep=keep.reshape(B * T),
        reduction="sum",
        logit_softcap=parts.logit_softcap,
        logit_scale=parts.logit_scale,
        chunk_size=chunk_size,
        impl=impl,
        weight_grad_accumulation=weight_grad_accumulation,
    )
    n_tokens = keep.sum()
    mean = loss_sum.detach() / n_tokens.clamp_min(1)
    terms = []
    if pipeline.objectives:
        terms = pipeline.objective_terms(ObjectiveInputs(
            targets=targets, valid=valid, keep=keep, weights=weights, batch=batch, training=training,
            level="mixin", hidden=hidden, head=parts,
        ))
    loss = pipeline.combine(loss_sum, n_tokens, terms, count_batch if count_batch is not None else batch, training,
                            accumulate, world_size)
    return TokenLossOutput(loss=loss, mean=mean, n_tokens=n_tokens, keep=keep, weights=weights,
                           objectives=dict(pipeline.last_objective_values) if terms else {})


class TokenLossHost:
    """The level-3 engine as a LightningModule mixin (subclassed by :class:`lit_ft.modules.TokenLossMixin`).

    Class attributes: ``token_loss_impl`` (``"auto" | "torch" | "triton"``, the fused op's dispatch),
    ``token_loss_weight_grad_accumulation`` (``"fp32" | "input"``: how the op sums the lm_head gradient over token
    chunks for bf16/fp16 models); :meth:`token_loss_model` picks the HF model.
    """

    token_loss_impl: str = "auto"
    token_loss_weight_grad_accumulation: str = "fp32"

    @property
    def token_pipeline(self) -> TokenPipeline:
        pipe = token_pipeline_for(self)  # type: ignore[arg-type]
        if pipe is None:  # pragma: no cover - create=True always returns one
            raise RuntimeError("no token pipeline")
        return pipe

    def token_loss_model(self) -> nn.Module:
        return find_hf_model(self, require_lm_head=True)  # type: ignore[arg-type]

    def compute_token_loss(self, batch: Mapping[str, Any], hf_model: nn.Module | None = None) -> TokenLossOutput:
        require_keys(batch, ("input_ids", "labels"), who=type(self).__name__)
        _ensure_flop_formulas()
        parts = self.loss_parts(hf_model)
        training = bool(getattr(self, "training", True)) and torch.is_grad_enabled()
        hidden = final_hidden_states(parts, batch)
        trainer = _trainer_of(self)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        return token_loss_from_hidden(
            self.token_pipeline, parts, hidden, shift_targets(batch["labels"]), batch, training=training,
            accumulate=accumulate, world_size=world, impl=self.token_loss_impl,
            weight_grad_accumulation=self.token_loss_weight_grad_accumulation,
        )

    def loss_parts(self, hf_model: nn.Module | None = None) -> CausalLMParts:
        """The trunk, lm_head and logit transforms a loss of this module runs (``hf_model``, default
        :meth:`token_loss_model`), the trunk compiled when the user compiled the HF model
        (:func:`lit_ft.core.compiled_trunk.loss_parts`): every loss that runs the trunk itself (the token loss, a
        preference step) takes its parts from here, or compiling the model compiles nothing."""
        from lit_ft.core.compiled_trunk import loss_parts

        return loss_parts(self, hf_model if hf_model is not None else self.token_loss_model())  # type: ignore[arg-type]

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        trainer = _trainer_of(self)
        if trainer is not None:
            self.token_pipeline.begin_micro_batch(trainer, self, batch, batch_idx)
        parent = super()
        if hasattr(parent, "on_train_batch_start"):
            return parent.on_train_batch_start(batch, batch_idx)  # type: ignore[misc]
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.token_pipeline.end_window()
        parent = super()
        if hasattr(parent, "on_before_optimizer_step"):
            parent.on_before_optimizer_step(optimizer)  # type: ignore[misc]
