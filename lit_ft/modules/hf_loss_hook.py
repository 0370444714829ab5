"""Integration level 2 (DESIGN.md §4): a token-weighted loss installed as a HF model's ``loss_function``.

For user modules that only ``return self.model(**batch).loss``: the model still materialises its logits (we do
not own its forward), but the per-token scores of the *current* forward reach the registered scorers, whose
weights / selections then shape the loss. Normalisation is deferred to the optimizer step like level 3
(see :class:`~lit_ft.core.tokens.TokenPipeline`), so gradient accumulation stays exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.core.batch import IGNORE_INDEX
from lit_ft.core.tokens import TokenPipeline, TokenScores, shift_targets

_HOOK_ATTR = "_lit_ft_loss_hook"


class TokenWeightedLoss:
    """Callable with HF's ``ForCausalLMLoss`` signature that applies a :class:`TokenPipeline`."""

    def __init__(self, pipeline: TokenPipeline, previous: Any) -> None:
        self.pipeline = pipeline
        self.previous = previous
        self.accumulate_grad_batches = 1
        self._warned_num_items = False

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: torch.Tensor | None = None,
        ignore_index: int = IGNORE_INDEX,
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if num_items_in_batch is not None and not self._warned_num_items:
            rank_zero_warn(
                "lit_ft: `num_items_in_batch` is ignored while a lit_ft token callback owns the loss; it normalises "
                "by the global kept-token count of the accumulation window instead."
            )
            self._warned_num_items = True
        targets = shift_labels if shift_labels is not None else shift_targets(labels, ignore_index)
        logits = logits.float()
        targets = targets.to(logits.device)
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        lse = torch.logsumexp(logits, dim=-1)
        nll = lse - logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
        nll = torch.where(valid, nll, torch.zeros_like(nll))
        batch = self.pipeline.current_batch or {}
        # the module's own `training` flag decides, as in the mixin
        training = torch.is_grad_enabled() and logits.requires_grad
        needs = self.pipeline.needs if training else frozenset()
        entropy = None
        if "entropy" in needs:
            with torch.no_grad():
                p = torch.softmax(logits, dim=-1)
                entropy = torch.where(valid, lse - (p * logits).sum(-1), torch.zeros_like(lse))
        scores = TokenScores(
            targets=targets, valid=valid, batch=batch, nll=nll.detach(), entropy=entropy,
            lse=lse.detach() if "lse" in needs else None, training=training,
        )
        weights, keep = self.pipeline.decide(scores)
        if training and batch.get("token_weights") is not None:
            from lit_ft.modules.token_loss import batch_token_weights

            bw = batch_token_weights(batch).to(logits.device)
            weights = bw if weights is None else weights * bw
        per_token = nll if weights is None else nll * weights
        loss_sum = torch.where(keep, per_token, torch.zeros_like(per_token)).sum()
        n_tokens = keep.sum()
        if training:
            return self.pipeline.training_loss(loss_sum, n_tokens, self.accumulate_grad_batches)
        return loss_sum / n_tokens.clamp_min(1)


def install_token_loss_hook(hf_model: nn.Module, pipeline: TokenPipeline) -> TokenWeightedLoss:
    """Install (once) a :class:`TokenWeightedLoss` as ``hf_model.loss_function``; returns it.

    A second call with the same pipeline returns the installed hook; the previous loss function is restored by
    :func:`remove_token_loss_hook`.
    """
    hook = hf_model.__dict__.get(_HOOK_ATTR)
    if hook is not None:
        if hook.pipeline is not pipeline:
            raise RuntimeError(
                f"{type(hf_model).__name__} already has a lit_ft loss hook bound to another LightningModule"
            )
        return hook
    if not hasattr(type(hf_model), "loss_function"):
        raise TypeError(
            f"{type(hf_model).__name__} has no `loss_function` (transformers >= 4.46 models have one); use "
            "lit_ft.modules.TokenLossMixin or integration='batch' instead"
        )
    previous = hf_model.__dict__.get("_loss_function", None)
    hook = TokenWeightedLoss(pipeline, previous)
    hf_model.loss_function = hook  # transformers' setter stores it as _loss_function
    hf_model.__dict__[_HOOK_ATTR] = hook
    return hook


def remove_token_loss_hook(hf_model: nn.Module) -> None:
    hook = hf_model.__dict__.pop(_HOOK_ATTR, None)
    if hook is None:
        return
    if hook.previous is None:
        hf_model.__dict__.pop("_loss_function", None)
    else:
        hf_model._loss_function = hook.previous


def installed_hook(hf_model: nn.Module) -> TokenWeightedLoss | None:
    return hf_model.__dict__.get(_HOOK_ATTR)
