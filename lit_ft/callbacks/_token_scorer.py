"""Shared plumbing for token-scoring callbacks: attach to the best integration level, bind batches, finalise the
global normalisation, log metrics. Technique files subclass :class:`TokenScorerCallback` and implement
``score_tokens`` (levels 2-3) and, optionally, ``edit_batch`` (level 1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.introspect import find_hf_model
from lit_ft.core.tokens import TokenPipeline, TokenScorer, TokenScores, shift_targets, token_pipeline_for

INTEGRATIONS = ("auto", "mixin", "hook", "batch")


class TokenScorerCallback(Callback, TokenScorer):
    """Base class. ``integration``: ``"auto"`` (mixin when the module is a :class:`lit_ft.modules.TokenLossMixin`,
    else the HF loss hook), ``"mixin"``, ``"hook"`` or ``"batch"`` (edit ``labels`` before the forward; needs a
    scoring forward of its own)."""

    #: batch keys this technique needs at the first batch (checked once, with a clear error)
    required_batch_keys: tuple[str, ...] = ("input_ids", "labels")

    def __init__(self, integration: str = "auto") -> None:
        if integration not in INTEGRATIONS:
            raise ValueError(f"integration must be one of {INTEGRATIONS}, got {integration!r}")
        self.integration = integration
        self.level: str | None = None  # resolved at setup
        self._pipeline: TokenPipeline | None = None
        self._hooked_model: torch.nn.Module | None = None
        self._checked_batch = False

    # -- attach / detach ----------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lit_ft.modules.hf_loss_hook import install_token_loss_hook
        from lit_ft.modules.token_loss import TokenLossMixin

        level = self.integration
        if level == "auto":
            level = "mixin" if isinstance(pl_module, TokenLossMixin) else "hook"
        if level == "mixin" and not isinstance(pl_module, TokenLossMixin):
            raise TypeError(
                f"{type(self).__name__}(integration='mixin') needs a module that subclasses "
                f"lit_ft.modules.TokenLossMixin; {type(pl_module).__name__} does not. Use integration='auto'."
            )
        self.level = level
        if level == "batch":
            return
        self._pipeline = token_pipeline_for(pl_module)
        assert self._pipeline is not None
        self._pipeline.register(self)
        if level == "hook":
            hf_model = find_hf_model(pl_module, require_lm_head=True)
            hook = install_token_loss_hook(hf_model, self._pipeline)
            hook.accumulate_grad_batches = int(trainer.accumulate_grad_batches or 1)
            self._hooked_model = hf_model

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lit_ft.modules.hf_loss_hook import remove_token_loss_hook

        if self._pipeline is not None:
            self._pipeline.unregister(self)
            if self._hooked_model is not None and not self._pipeline.scorers:
                remove_token_loss_hook(self._hooked_model)
        self._hooked_model = None
        self._pipeline = None

    # -- per batch ----------------------------------------------------------------------------------------------
    def _bind(self, batch: Any) -> None:
        if not self._checked_batch:
            require_keys(batch, self.required_batch_keys, who=type(self).__name__)
            self._checked_batch = True
        if self._pipeline is not None:
            self._pipeline.current_batch = batch

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._bind(batch)
        self.prepare_batch(trainer, pl_module, batch, training=True)
        if self.level == "batch":
            self.edit_batch(trainer, pl_module, batch)

    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._bind(batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._pipeline is not None:  # idempotent: the mixin or another scorer may already have done it
            self._pipeline.finalize_gradients(pl_module.parameters(), trainer.strategy, trainer.world_size)

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
        from lit_ft.modules.token_loss import causal_lm_parts, final_hidden_states, token_stats

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
            from lit_ft.modules.token_loss import TokenLossMixin

            if not isinstance(pl_module, TokenLossMixin):
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
