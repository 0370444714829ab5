"""What ``lit-ft`` prints: dependency noise filtered, and a progress bar that says something true.

Only the ``lit-ft`` command installs these (library users keep their own warning and logging settings):

* :func:`quiet_dependencies` drops lines from dependencies that say nothing about the user's run: Lightning's
  advertising tip for its hosted logger, and deprecation notices that lightning and transformers raise against each
  other's newer versions (``LeafSpec``, ``is_gradient_checkpointing``) — the user can act on none of them. Warnings
  from lit_ft's own code are not filtered: those are fixed at their source.
* :class:`StepProgressBar` is Lightning's rich bar without the ``Epoch 0/-2`` it shows when training is bounded by
  ``max_steps`` (Lightning then sets ``max_epochs = -1`` and prints ``max_epochs - 1``); it shows the step budget.
"""

from __future__ import annotations

import logging
import warnings

from lightning.pytorch.callbacks import RichProgressBar

__all__ = ["DEPENDENCY_NOISE", "StepProgressBar", "quiet_dependencies"]

#: (category, message regex) of the dependency warnings the CLI drops
DEPENDENCY_NOISE: tuple[tuple[type[Warning], str], ...] = (
    # lightning's pytree copy against torch >= 2.10
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # transformers 5 renamed gradient -> activation checkpointing; PEFT and lightning still call the old name
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)

_TIP_PREFIX = "💡 Tip:"


class _DropLightningTips(logging.Filter):
    """Drops Lightning's ``💡 Tip: ...`` advertising lines (sent through ``rank_zero_info``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_TIP_PREFIX)


def quiet_dependencies() -> None:
    """Install the filters above (idempotent)."""
    for category, message in DEPENDENCY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in logger.filters):
            logger.addFilter(_DropLightningTips())


class StepProgressBar(RichProgressBar):
    """Lightning's ``RichProgressBar`` whose train description reads ``Epoch 0`` / ``Epoch 0/9`` and, when
    ``max_steps`` bounds training, ``· max_steps 30`` — never ``Epoch 0/-2``."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        text = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            text += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps is not None and trainer.max_steps > 0:
            text += f" · max_steps {trainer.max_steps}"
        if len(self.validation_description) > len(text):  # Lightning pads to avoid flicker; keep that
            text = f"{text:{len(self.validation_description)}}"
        return text
