"""The life cycle shared by techniques that add their own tensors to the model (prompts, adapters): the backbone frozen
through the parameter plan, the added tensors in their own optimizer groups at the technique's learning rate, an
artifact written at fit end."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks._param_plan import ParamPlanCallback, selection_plan
from lit_ft.core.optim import assign_group_hparams, sync_schedulers
from lit_ft.core.params import ParamPlan
from lit_ft.core.validate import check_bool, check_optional_lr, check_optional_wd


class OwnedTensorsCallback(ParamPlanCallback):
    """Base of techniques that own tensors they add to the model.

    Subclasses implement :meth:`owned_param_names` (the LightningModule's names of the added tensors) and may
    override :meth:`extra_trainable` (model tensors that train with them, e.g. a classification head) and
    :meth:`group_hparams`.

    Common arguments (subclasses expose them):
        freeze_backbone: freeze every model tensor except the technique's (default). ``False`` trains the added
            tensors together with whatever the module itself trains.
        learning_rate: lr of the added tensors (their own param group); ``None`` = the optimizer's lr. Applied at
            ``on_fit_start`` through :func:`~lit_ft.core.optim.assign_group_hparams` (a resumed run restores the
            checkpoint's rates unless ``ConfiguredLearningRate`` re-applies this run's).
        weight_decay: weight decay of the added tensors; ``None`` = that of the group they came from.
        save_dir: write the technique's artifact here when ``fit`` ends (rank 0); a relative path is relative to
            the trainer's ``default_root_dir``; ``None`` = do not.
        picture_every_n_steps: the parameter family's picture interval (0 = off).
    """

    #: what the added tensors are called in messages ("the prompt", "the adapters")
    owned_what: str = "the technique's tensors"

    def __init__(self, freeze_backbone: bool = True, learning_rate: float | None = None,
                 weight_decay: float | None = None, save_dir: str | None = None,
                 picture_every_n_steps: int = 0) -> None:
        owner = type(self).__name__
        super().__init__(picture_every_n_steps=picture_every_n_steps)
        self.freeze_backbone = check_bool(owner, "freeze_backbone", freeze_backbone)
        self.learning_rate = check_optional_lr(learning_rate, "learning_rate", owner)
        self.weight_decay = check_optional_wd(weight_decay, "weight_decay", owner)
        if save_dir is not None and not isinstance(save_dir, str):
            raise ValueError(f"{owner}: `save_dir` must be a path string or null, got {save_dir!r}")
        self.save_dir = save_dir

    # -- to implement ----------------------------------------------------------------------------------------------
    def owned_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        raise NotImplementedError

    def extra_trainable(self, pl_module: pl.LightningModule) -> list[str]:
        """Names of model tensors (not the technique's own) that train with them while the backbone is frozen."""
        return []

    def group_hparams(self, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        """Parameter name -> ``{"lr": .., "weight_decay": ..}`` given at ``on_fit_start`` (default: the owned
        tensors get ``learning_rate`` / ``weight_decay`` when set)."""
        hp: dict[str, float] = {}
        if self.learning_rate is not None:
            hp["lr"] = self.learning_rate
        if self.weight_decay is not None:
            hp["weight_decay"] = self.weight_decay
        return {n: dict(hp) for n in self.owned_param_names(pl_module)} if hp else {}

    # -- plan and optimizer groups ---------------------------------------------------------------------------------
    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ParamPlan | None:
        if not self.freeze_backbone:
            return None
        names = self.owned_param_names(pl_module) + self.extra_trainable(pl_module)
        plan, _ = selection_plan(pl_module, names, self.registry(pl_module).baseline, type(self).__name__,
                                 required=False, what=self.owned_what)
        return plan

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.apply_group_hparams(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)  # param-group layout of the checkpoint on resume

    def apply_group_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                            assignments: dict[str, dict[str, float]] | None = None) -> None:
        """Give the technique's tensors their learning rates (and add any the optimizer does not hold: a
        ``configure_optimizers`` over ``self.model.parameters()`` would otherwise never train them)."""
        if assignments is None:
            assignments = self.group_hparams(pl_module)
            for n in self.owned_param_names(pl_module) + self.extra_trainable(pl_module):
                assignments.setdefault(n, {})
        params = dict(pl_module.named_parameters())
        assignments = {n: hp for n, hp in assignments.items() if params[n].requires_grad}
        for opt in trainer.optimizers:
            r = assign_group_hparams(opt, pl_module, assignments)
            if r.changed and trainer.lr_scheduler_configs:
                sync_schedulers(trainer, opt, origin=r.origin, scale=r.scale, owner=type(self).__name__)
            if r.added:
                rank_zero_info(f"{type(self).__name__}: added {len(r.added)} tensor(s) of {self.owned_what} the "
                               "optimizer did not hold")

    # -- artifact ----------------------------------------------------------------------------------------------------
    def resolved_save_dir(self, trainer: pl.Trainer) -> str | None:
        """``save_dir``; a relative path is taken relative to ``trainer.default_root_dir``."""
        if not self.save_dir:
            return None
        return self.save_dir if os.path.isabs(self.save_dir) else os.path.join(trainer.default_root_dir, self.save_dir)

    def artifact_metadata(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        """What an artifact records about its making: the technique and the base model's name."""
        from lit_ft.core.introspect import find_hf_model

        hf = find_hf_model(pl_module)
        return {"technique": type(self).__name__,
                "base_model": str(getattr(getattr(hf, "config", None), "_name_or_path", ""))}
