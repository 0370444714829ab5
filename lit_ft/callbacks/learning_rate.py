"""ConfiguredLearningRate: a resumed run trains with the learning rates it configures, not the checkpoint's (a
utility, not a paper technique)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.core.optim import configured_learning_rates, reapply_learning_rates, unwrap_optimizer
from lit_ft.core.validate import check_bool


class ConfiguredLearningRate(pl.Callback):
    """Re-apply this run's configured learning rates after Lightning restores a checkpoint's optimizer.

    ``trainer.fit(..., ckpt_path=...)`` restores the optimizer with ``load_state_dict``, which brings back every param
    group's ``lr`` / ``initial_lr`` and the LR schedulers' ``base_lrs``: a run resumed with a changed
    ``learning_rate`` (or a technique's per-group learning rate) trains with the *checkpoint's* values, silently.
    With this callback the learning rates that ``configure_optimizers`` and the techniques' ``on_fit_start`` set in
    this run win: right before the restore the callback records each tensor's configured base learning rate; after
    it, every group whose checkpointed base rate differs is rescaled (:func:`lit_ft.core.optim.reapply_learning_rates`:
    ``lr ← lr · new/old`` so the schedule keeps its position, ``initial_lr`` and the schedulers' ``base_lrs`` follow).
    Moments, step counts and the schedule position stay the checkpoint's. Without a checkpoint it does nothing.

    The record is taken when Lightning loads the optimizer state (after every ``on_fit_start``), so the callback's
    place in the list does not matter.

    Args:
        verbose: log each changed group (old -> new base learning rate) on rank 0.
    """

    def __init__(self, verbose: bool = True) -> None:
        self.verbose = check_bool(type(self).__name__, "verbose", verbose)
        self._configured: dict[int, dict[int, float]] = {}  # optimizer index -> id(param) -> configured base lr
        self.changed: list[tuple[int, int, float, float]] = []  # (optimizer, group, checkpoint lr, configured lr)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._configured, self.changed = {}, []
        if trainer.ckpt_path is None:
            return
        for i, opt in enumerate(trainer.optimizers):
            self._intercept(unwrap_optimizer(opt), i)

    def _intercept(self, opt: Any, index: int) -> None:
        """Record the configured rates when ``opt.load_state_dict`` is called (the restore), then remove the hook."""
        original = opt.load_state_dict

        def load_state_dict(state_dict: Any) -> None:
            del opt.load_state_dict  # back to the class's method
            self._configured[index] = configured_learning_rates(opt)
            original(state_dict)

        opt.load_state_dict = load_state_dict

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for i, opt in enumerate(trainer.optimizers):
            inner = unwrap_optimizer(opt)
            if "load_state_dict" in vars(inner):  # no restore happened (a checkpoint without optimizer state)
                del inner.load_state_dict
            if i not in self._configured:
                continue
            schedulers = [c.scheduler for c in trainer.lr_scheduler_configs]
            for g, old, new in reapply_learning_rates(inner, self._configured[i], schedulers):
                self.changed.append((i, g, old, new))
                if self.verbose:
                    rank_zero_info(f"ConfiguredLearningRate: optimizer {i} group {g}: base learning rate {old:g} "
                                   f"(checkpoint) -> {new:g} (this run)")
        self._configured = {}
