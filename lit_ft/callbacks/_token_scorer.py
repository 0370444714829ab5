"""Shared plumbing for token-scoring callbacks: attach to the best integration level, bind batches, let the engine
count the window normalisers, log metrics. Technique files subclass :class:`TokenScorerCallback` and implement
``score_tokens`` (levels 2-3) and, optionally, ``edit_batch`` (level 1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.introspect import causal_lm_parts, find_hf_model
from lit_ft.core.loss import (
    INTEGRATIONS,
    Attachment,
    TokenLossHost,
    TokenScorer,
    TokenScores,
    attach,
    detach,
    final_hidden_states,
    shift_targets,
    token_stats,
)
from lit_ft.core.resume import Decision, adopt_saved_state, record_resume_args
from lit_ft.core.validate import check_choice


class TokenScorerCallback(Callback, TokenScorer):
    """Base class. ``integration``: ``"auto"`` (mixin when the module is a :class:`lit_ft.modules.TokenLossMixin`,
    else the HF loss hook), ``"mixin"``, ``"hook"`` or ``"batch"`` (edit ``labels`` before the forward; needs a
    scoring forward of its own). The level is chosen and the scorer registered by :func:`lit_ft.core.loss.attach`."""

    #: batch keys this technique needs at the first batch (checked once, with a clear error)
    required_batch_keys: tuple[str, ...] = ("input_ids", "labels")
    #: resuming with changed arguments (:mod:`lit_ft.core.resume`): argument -> ``RESTORE``, a reason to refuse, or
    #: ``(saved, new, state) -> reason | None``; ``None`` = every change of the state key's arguments is refused
    resume_decisions: Mapping[str, Decision] | None = None

    def __init__(self, integration: str = "auto") -> None:
        self.integration = check_choice(type(self).__name__, "integration", integration, INTEGRATIONS)
        self.level: str | None = None  # resolved at setup
        self._attachment: Attachment | None = None
        self._checked_batch = False

    # -- attach / detach ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._attachment = attach(trainer, pl_module, self, self.integration)
        self.level = self._attachment.level

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detach(self._attachment, self)
        self._attachment = None

    # -- resume with changed arguments: restore or refuse, never a silent reset (lit_ft.core.resume) -------------
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        record_resume_args(self, checkpoint)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        adopt_saved_state(self, trainer, checkpoint)

    @property
    def _pipeline(self) -> Any:
        return None if self._attachment is None else self._attachment.pipeline

    # -- per batch ----------------------------------------------------------------------------------------------
    def _check(self, batch: Any) -> None:
        if not self._checked_batch:
            require_keys(batch, self.required_batch_keys, who=type(self).__name__)
            self._checked_batch = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._check(batch)
        if self._attachment is not None:
            self._attachment.begin_batch(trainer, pl_module, batch, batch_idx)
        self.prepare_batch(trainer, pl_module, batch, training=True)
        if self.level == "batch":
            self.edit_batch(trainer, pl_module, batch)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check(batch)
        if self._attachment is not None:
            self._attachment.bind(batch)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._attachment is not None:
            self._attachment.end_window()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = self._pipeline.last_metrics if self._pipeline is not None else self._batch_metrics
        prefix = f"lit_ft/{self.scorer_name}/"
        for name, value in metrics.items():
            if name.startswith(prefix) or name == "lit_ft/tokens/kept_fraction":
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])

    # -- for subclasses -----------------------------------------------------------------------------------------
    _batch_metrics: dict[str, Any] = {}

    def prepare_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any], training: bool) -> None:
        """Per-batch work before the forward (e.g. a reference model's NLL). Default: nothing."""

    def edit_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict[str, Any]) -> None:
        """Level 1: score with a no-grad forward of the current model, then set dropped targets to -100."""
        hf_model = find_hf_model(pl_module, require_lm_head=True)
        parts = causal_lm_parts(hf_model)
        targets = shift_targets(batch["labels"])
        valid = targets != IGNORE_INDEX
        with torch.no_grad():
            needs = self.token_needs
            stats = token_stats(parts, final_hidden_states(parts, batch), targets, needs) if needs else None
        scores = TokenScores(
            targets=targets, valid=valid, batch=batch, training=True,
            nll=None if stats is None else stats.nll,
            entropy=None if stats is None else stats.entropy,
            lse=None if stats is None else stats.lse,
        )
        decision = self.score_tokens(scores)
        keep = valid if decision.keep is None else valid & decision.keep
        labels = batch["labels"].clone()
        # target t is label t+1
        labels[:, 1:] = torch.where(keep[:, :-1], labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE_INDEX))
        batch["labels"] = labels
        if decision.weights is not None:
            if not isinstance(pl_module, TokenLossHost):
                # a plain module's HF loss ignores `token_weights`: refuse rather than silently drop the weights
                raise TypeError(
                    f"{type(self).__name__}(integration='batch') produces token weights, which only a "
                    "lit_ft.modules.TokenLossMixin module or the HF loss hook consume; use integration='auto'"
                )
            w = torch.ones_like(labels, dtype=torch.float32)
            w[:, 1:] = decision.weights[:, :-1].float()
            batch["token_weights"] = w if batch.get("token_weights") is None else batch["token_weights"] * w
        m = {f"lit_ft/{self.scorer_name}/{k}": v for k, v in decision.metrics.items()}
        m["lit_ft/tokens/kept_fraction"] = (keep.sum() / valid.sum().clamp_min(1)).float()
        self._batch_metrics = m
