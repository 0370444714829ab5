"""Token-level loss from final hidden states and the lm_head weight (no ``[N, V]`` logits tensor).

:class:`TokenLossMixin` is integration level 3 of DESIGN.md §4: the LightningModule computes its loss through the
fused op ``lit_ft.kernels.fused_linear_token_ce`` and hands per-token quantities (NLL, entropy, LSE) to the token
scorers registered on its :class:`~lit_ft.core.tokens.TokenPipeline`. Tokens a scorer drops are packed out before
the lm_head matmul, so they cost no lm_head FLOPs in forward or backward. Callbacks that add a loss term of their
own (:class:`~lit_ft.core.tokens.AuxiliaryLoss`, e.g. PANDA's distillation) register it on the same pipeline; they
get logits only at the positions they ask for (:func:`logits_at`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.introspect import CausalLMParts, causal_lm_parts, find_hf_model
from lit_ft.core.tokens import AuxLossInputs, TokenPipeline, TokenScores, shift_targets, token_pipeline_for
from lit_ft.kernels.token_ce.flops import register as _register_flop_formulas

_register_flop_formulas()  # profiling a lit_ft module with FlopCounterMode counts the fused lm_head

#: keys forwarded to the HF trunk; everything else in the batch (sample_idx, token_weights, ...) stays out
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


def final_hidden_states(parts: CausalLMParts, batch: Mapping[str, Any]) -> torch.Tensor:
    """Run only the trunk (no lm_head) and return the final hidden states ``[B, T, D]``."""
    out = parts.base(**model_inputs(batch), use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def batch_token_weights(batch: Mapping[str, Any]) -> torch.Tensor:
    """``batch["token_weights"]`` (aligned with unshifted labels) moved to target space, float32."""
    from lit_ft.core.batch import check_token_tensor

    w = check_token_tensor(batch, "token_weights", "labels", "token_weights", "float")
    return shift_targets(w.float(), ignore_index=0)


@dataclass
class TokenStats:
    """Per-token quantities in target space ``[B, T]`` (float32, detached, 0 where not computed)."""

    nll: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    lse: torch.Tensor | None = None


def token_stats(
    parts: CausalLMParts,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    needs: frozenset[str] | set[str] = frozenset({"nll"}),
    impl: str = "auto",
) -> TokenStats:
    """No-grad per-token NLL / entropy / LSE of ``hidden`` under ``parts``' lm_head, via the fused op."""
    from lit_ft.kernels import fused_linear_token_ce

    B, T, D = hidden.shape
    with torch.no_grad():
        out = fused_linear_token_ce(
            hidden.detach().reshape(B * T, D),
            parts.weight.detach(),
            targets.reshape(B * T),
            bias=None if parts.bias is None else parts.bias.detach(),
            reduction="sum",
            return_nll="nll" in needs,
            return_entropy="entropy" in needs,
            return_lse="lse" in needs,
            logit_softcap=parts.logit_softcap,
            logit_scale=parts.logit_scale,
            impl=impl,
        )
    shape = (B, T)
    return TokenStats(
        nll=None if out.nll is None else out.nll.view(shape),
        entropy=None if out.entropy is None else out.entropy.view(shape),
        lse=None if out.lse is None else out.lse.view(shape),
    )


@torch.no_grad()
def causal_lm_token_nll(hf_model: nn.Module, batch: Mapping[str, Any], impl: str = "auto") -> torch.Tensor:
    """Per-token NLL ``[B, T]`` (target space) of any HF causal LM on ``batch``, without materialising logits.

    Used for reference / history models (Rho-1's reference, ssToken's history model).
    """
    parts = causal_lm_parts(hf_model)
    hidden = final_hidden_states(parts, batch)
    targets = shift_targets(batch["labels"])
    stats = token_stats(parts, hidden, targets, {"nll"}, impl)
    assert stats.nll is not None
    return stats.nll


@dataclass
class TokenLossOutput:
    """``loss``: what ``training_step`` returns (value = mean over kept tokens, plus the auxiliary terms; gradient
    normalised globally at the optimizer step in training). ``mean``: detached mean token loss for logging (without
    the auxiliary terms). ``n_tokens``: kept tokens in this batch. ``aux``: detached sum of the registered
    :class:`~lit_ft.core.tokens.AuxiliaryLoss` terms divided by ``n_tokens`` (what they add to ``loss``), or
    ``None`` when none contributed."""

    loss: torch.Tensor
    mean: torch.Tensor
    n_tokens: torch.Tensor
    keep: torch.Tensor
    weights: torch.Tensor | None
    aux: torch.Tensor | None = None


def logits_at(parts: CausalLMParts, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[mask.sum(), V]`` (float32, differentiable) of the positions of a bool ``[B, T]`` mask: the lm_head
    applied to those hidden states only, then the model's logit scale and soft-cap (as the fused op applies them)."""
    if mask.shape != hidden.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"logits_at: mask must be bool {tuple(hidden.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    z = torch.nn.functional.linear(hidden[mask], parts.weight, parts.bias).float()
    if parts.logit_scale is not None:
        z = z * parts.logit_scale
    if parts.logit_softcap is not None:
        z = parts.logit_softcap * torch.tanh(z / parts.logit_softcap)
    return z


class TokenLossMixin:
    """LightningModule mixin: the causal-LM loss from final hidden states + lm_head through the fused op.

    Use it before ``LightningModule`` in the bases (``class M(TokenLossMixin, L.LightningModule)``) and call
    :meth:`compute_token_loss` in ``training_step`` / ``validation_step``. Registered token scorers (lit_ft
    callbacks such as :class:`lit_ft.callbacks.ExcessLossSelection`) attach to this module automatically.

    Class attributes you may override: ``token_loss_impl`` (``"auto" | "torch" | "triton"``, the fused op's
    dispatch), ``token_loss_weight_grad_accumulation`` (``"fp32" | "input"``: how the op sums the lm_head gradient
    over token chunks for bf16/fp16 models, see :func:`lit_ft.kernels.fused_linear_token_ce`) and
    :meth:`token_loss_model` (which HF model to use; default: the one :func:`find_hf_model` finds).
    """

    token_loss_impl: str = "auto"
    token_loss_weight_grad_accumulation: str = "fp32"

    @property
    def token_pipeline(self) -> TokenPipeline:
        pipe = token_pipeline_for(self)  # type: ignore[arg-type]
        assert pipe is not None
        return pipe

    def token_loss_model(self) -> nn.Module:
        return find_hf_model(self, require_lm_head=True)  # type: ignore[arg-type]

    def compute_token_loss(self, batch: Mapping[str, Any], hf_model: nn.Module | None = None) -> TokenLossOutput:
        require_keys(batch, ("input_ids", "labels"), who=type(self).__name__)
        parts = causal_lm_parts(hf_model if hf_model is not None else self.token_loss_model())
        pipeline = self.token_pipeline
        training = bool(getattr(self, "training", True)) and torch.is_grad_enabled()
        hidden = final_hidden_states(parts, batch)
        B, T, D = hidden.shape
        targets = shift_targets(batch["labels"])
        valid = targets != IGNORE_INDEX

        weights: torch.Tensor | None = None
        keep = valid
        if pipeline.scorers:
            needs = pipeline.needs if training else frozenset()
            stats = token_stats(parts, hidden, targets, needs, self.token_loss_impl) if needs else TokenStats()
            scores = TokenScores(
                targets=targets, valid=valid, batch=batch, nll=stats.nll, entropy=stats.entropy, lse=stats.lse,
                training=training,
            )
            weights, keep = pipeline.decide(scores)
        if training and batch.get("token_weights") is not None:
            # batch-level weights (level-1 producers) are aligned with the labels: shift them the same way
            bw = batch_token_weights(batch)
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
            impl=self.token_loss_impl,
            weight_grad_accumulation=self.token_loss_weight_grad_accumulation,
        )
        n_tokens = keep.sum()
        mean = loss_sum.detach() / n_tokens.clamp_min(1)
        aux = None
        if pipeline.aux_losses:
            aux = pipeline.aux_sum(AuxLossInputs(
                targets=targets, valid=valid, keep=keep, n_tokens=n_tokens, batch=batch, training=training,
                logits_at=lambda mask: logits_at(parts, hidden, mask),
            ))
        total = loss_sum if aux is None else loss_sum + aux
        if training:
            trainer = getattr(self, "_trainer", None)
            accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1) if trainer is not None else 1
            loss = pipeline.training_loss(total, n_tokens, accumulate)
        else:
            loss = total / n_tokens.clamp_min(1)
        aux_mean = None if aux is None else aux.detach() / n_tokens.clamp_min(1)
        return TokenLossOutput(loss=loss, mean=mean, n_tokens=n_tokens, keep=keep, weights=weights, aux=aux_mean)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        trainer = getattr(self, "_trainer", None)
        self.token_pipeline.finalize_gradients(
            self.parameters(),  # type: ignore[attr-defined]
            strategy=getattr(trainer, "strategy", None),
            world_size=int(getattr(trainer, "world_size", 1) or 1),
        )
        parent = super()
        if hasattr(parent, "on_before_optimizer_step"):
            parent.on_before_optimizer_step(optimizer)  # type: ignore[misc]
