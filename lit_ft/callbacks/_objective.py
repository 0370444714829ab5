"""Shared life cycle of the objectives family (extra loss terms on the token-loss engine): attach at setup, count the
window at every training batch start, close it at the optimizer step, log the term, detach at teardown. A technique
subclasses :class:`ObjectiveCallback` and implements :meth:`~lit_ft.core.loss.Objective.objective_loss` (and
``objective_counts`` / ``objective_normaliser`` when its unit is not the supervised token)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_ft.core.batch import require_keys
from lit_ft.core.loss import Attachment, Objective, attach, detach

#: objectives need the engine's loss path (level 2 or 3): there is no batch-editing level for a loss term
OBJECTIVE_INTEGRATIONS = ("auto", "mixin", "hook")


class ObjectiveCallback(Callback, Objective):
    """Base class of the objectives family. ``integration``: ``"auto"`` (level 3 for
    :class:`lit_ft.modules.TokenLossMixin` modules — the term gets hidden states and the head, and vocabulary-wide
    work runs through the chunked fused-linear base — else level 2, the HF loss hook), ``"mixin"`` or ``"hook"``.
    The term is logged as ``lit_ft/<objective_name>/loss`` (its value on this micro-batch, weight included)."""

    #: batch keys this objective needs at the first batch (checked once, with a clear error)
    required_batch_keys: tuple[str, ...] = ("input_ids", "labels")

    def __init__(self, integration: str = "auto") -> None:
        if integration not in OBJECTIVE_INTEGRATIONS:
            raise ValueError(f"{type(self).__name__}: `integration` must be one of {OBJECTIVE_INTEGRATIONS}, got "
                             f"{integration!r}")
        self.integration = integration
        self.level: str | None = None
        self._attachment: Attachment | None = None
        self._checked_batch = False

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._attachment is None:
            self._attachment = attach(trainer, pl_module, self, self.integration, allowed=OBJECTIVE_INTEGRATIONS)
            self.level = self._attachment.level

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detach(self._attachment, self)
        self._attachment = None
        self.level = None

    def _check(self, batch: Any) -> None:
        if not self._checked_batch:
            require_keys(batch, self.required_batch_keys, who=type(self).__name__)
            self._checked_batch = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._check(batch)
        if self._attachment is not None:
            self._attachment.begin_batch(trainer, pl_module, batch, batch_idx)
        self.prepare_batch(trainer, pl_module, batch)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        if self._attachment is not None:
            self._attachment.bind(batch)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if self._attachment is not None:
            self._attachment.end_window()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        pipe = None if self._attachment is None else self._attachment.pipeline
        value = None if pipe is None else pipe.last_objective_values.get(self.objective_name)
        if value is not None:
            pl_module.log(f"lit_ft/{self.objective_name}/loss", value, on_step=True, on_epoch=False, batch_size=1)

    def prepare_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any]) -> None:
        """Per-batch work before the forward (a teacher's or reference policy's pass). Default: nothing."""
