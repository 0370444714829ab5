"""Integration level 2: the token-loss engine installed as a HF model's ``loss_function``.

For user modules that only ``return self.model(**batch).loss``: the model still materialises its logits (we do not
own its forward), but the per-token scores of the *current* forward reach the registered scorers, whose weights /
selections shape the loss, and the registered objectives add their terms (from the model's logits). Every term is
normalised by its window count (:mod:`lit_ft.core.loss.pipeline`), so gradient accumulation stays exact.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Any

import torch
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX
from lit_ft.core.loss.objectives import ObjectiveInputs
from lit_ft.core.loss.pipeline import TokenPipeline
from lit_ft.core.loss.primitives import batch_token_weights, shift_targets, stats_from_logits
from lit_ft.core.loss.scoring import TokenScores

_HOOK_ATTR = "_lit_ft_loss_hook"


class TokenWeightedLoss:
    """Callable with HF's ``ForCausalLMLoss`` signature that runs a :class:`TokenPipeline`."""

    def __init__(self, pipeline: TokenPipeline, previous: Any) -> None:
        self.pipeline = pipeline
        self.previous = previous
        self._trainer_ref: Any = None
        self._accumulate_override: int | None = None
        self._world_override: int | None = None
        self._warned_num_items = False

    def bind_trainer(self, trainer: Any) -> None:
        """Read ``accumulate_grad_batches`` and ``world_size`` from ``trainer`` at every call (weakly referenced).

        Read live, not copied at setup: Lightning's ``GradientAccumulationScheduler`` changes
        ``trainer.accumulate_grad_batches`` between epochs, and the gradient scale must follow it (as the level-3
        path does, which reads the trainer at each step)."""
        try:
            self._trainer_ref = weakref.ref(trainer)
        except TypeError:  # an object that cannot be weakly referenced (a test double): keep it
            self._trainer_ref = lambda: trainer

    def _trainer_value(self, name: str) -> int:
        trainer = self._trainer_ref() if self._trainer_ref is not None else None
        return int(getattr(trainer, name, 1) or 1) if trainer is not None else 1

    @property
    def accumulate_grad_batches(self) -> int:
        """The trainer's current ``accumulate_grad_batches`` (1 without a trainer), unless set explicitly."""
        if self._accumulate_override is not None:
            return self._accumulate_override
        return self._trainer_value("accumulate_grad_batches")

    @accumulate_grad_batches.setter
    def accumulate_grad_batches(self, value: int | None) -> None:
        self._accumulate_override = None if value is None else int(value)

    @property
    def world_size(self) -> int:
        """The trainer's world size (1 without a trainer), unless set explicitly."""
        if self._world_override is not None:
            return self._world_override
        return self._trainer_value("world_size")

    @world_size.setter
    def world_size(self, value: int | None) -> None:
        self._world_override = None if value is None else int(value)

    def note_num_items_in_batch(self, num_items_in_batch: Any) -> None:
        """Warn once that HF's ``num_items_in_batch`` is ignored (the pipeline counts the window itself); also
        called by the fused forward (:mod:`lit_ft.core.loss.fused_forward`) when it routes through this hook."""
        if num_items_in_batch is not None and not self._warned_num_items:
            warnings.warn(  # not lightning's rank_zero_warn: importing lightning pulls in triton
                "lit_ft: `num_items_in_batch` is ignored while a lit_ft token callback owns the loss; it counts the "
                "accumulation window's normalisers itself.", stacklevel=3
            )
            self._warned_num_items = True

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
        self.note_num_items_in_batch(num_items_in_batch)
        targets = shift_labels if shift_labels is not None else shift_targets(labels, ignore_index)
        targets = targets.to(logits.device)
        valid = targets != ignore_index
        training = torch.is_grad_enabled() and logits.requires_grad
        needs = self.pipeline.needs if training else frozenset()
        nll, stats = stats_from_logits(logits, targets, needs, ignore_index)
        batch = self.pipeline.current_batch or {}
        scores = TokenScores(targets=targets, valid=valid, batch=batch, nll=stats.nll, entropy=stats.entropy,
                             lse=stats.lse, training=training)
        weights, keep = self.pipeline.decide(scores)
        if training and batch.get("token_weights") is not None:
            bw = batch_token_weights(batch).to(logits.device)
            weights = bw if weights is None else weights * bw
        per_token = nll if weights is None else nll * weights
        loss_sum = torch.where(keep, per_token, torch.zeros_like(per_token)).sum()
        terms = []
        if self.pipeline.objectives:
            terms = self.pipeline.objective_terms(ObjectiveInputs(
                targets=targets, valid=valid, keep=keep, weights=weights, batch=batch, training=training,
                level="hook", logits=logits,
            ))
        if not batch:  # called outside a bound step (e.g. a user's own forward): count this batch's labels
            batch = {"labels": labels}
        return self.pipeline.combine(loss_sum, keep.sum(), terms, batch, training, self.accumulate_grad_batches,
                                     self.world_size)


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
