"""FreezeLayers: freeze the input embeddings and the lowest decoder/encoder layers (Tinn et al., BLURB), optionally
unfreezing them at a later epoch."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_ft.callbacks._param_plan import ParamPlanCallback, param_plans_for
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE
from lit_ft.core.validate import check_bool, check_int, check_layer_count
from lit_ft.core.introspect import (
    ModelLayoutError,
    find_decoder_layers,
    find_hf_model,
    find_input_embeddings,
    find_lm_head,
    module_param_names,
)
from lit_ft.core.optim import sync_schedulers
from lit_ft.core.params import FROZEN, ParamPlan


@technique(name="freeze_layers", family="tensor_selection",
           paper="Fine-Tuning Large Neural Language Models for Biomedical Natural Language Processing",
           arxiv="2112.07869")
class FreezeLayers(ParamPlanCallback):
    """Freeze the input embeddings and the lower ``num_layers`` transformer layers; train the rest.

    Paper: Tinn et al., *Fine-Tuning Large Neural Language Models for Biomedical Natural Language Processing*
    (Patterns 2023, BLURB) — freezing the embeddings and the lower layers stabilises fine-tuning (best for BERT-base
    there).

    Algorithm: at ``setup("fit")`` (before the optimizer exists) the parameters of the input-embedding module and of
    decoder/encoder layers ``0 .. num_layers-1`` (found with :mod:`lit_ft.core.introspect`, mapped to the
    LightningModule's own parameter names) are frozen through a :class:`~lit_ft.core.params.ParamPlan`; the plan
    composes with the other lit_ft parameter callbacks and with what the module already froze (intersection).
    Under PEFT the layers are those of the wrapped model: the adapter tensors inside the lower layers are frozen.
    With ``unfreeze_at_epoch`` the plan is dropped at the start of that epoch (gradual unfreezing): the tensors
    become trainable again and join the optimizer with fresh state, by name.

    With tied input/output embeddings (``tie_word_embeddings=True``, e.g. SmolLM2) the embedding matrix *is* the
    lm_head: ``freeze_embeddings=True`` freezes the output layer too (a warning says so).

    Args:
        num_layers: number of lowest layers to freeze (>= 0, at most the model's layer count).
        freeze_embeddings: also freeze the input-embedding module (and, when tied, the lm_head).
        unfreeze_at_epoch: epoch (>= 1) at whose start everything frozen here is unfrozen again; ``None`` = never.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "freeze_layers"
    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`): what is frozen, and the optimizer state laid
    #: out for it, follow the saved values; the unfreeze epoch applies from now on
    resume_decisions = {
        "num_layers": "the frozen tensors, and the optimizer state laid out for them, follow the saved value",
        "freeze_embeddings": "the frozen tensors, and the optimizer state laid out for them, follow the saved value",
        "unfreeze_at_epoch": RESTORE,
    }

    def __init__(self, num_layers: int = 2, freeze_embeddings: bool = True, unfreeze_at_epoch: Optional[int] = None,
                 picture_every_n_steps: int = 0) -> None:
        super().__init__(picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        self.num_layers = check_int(owner, "num_layers", num_layers, minimum=0)  # lowest layers to freeze
        check_bool(owner, "freeze_embeddings", freeze_embeddings)
        if num_layers == 0 and not freeze_embeddings:
            raise ValueError("FreezeLayers: num_layers=0 with freeze_embeddings=False freezes nothing; set "
                             "num_layers >= 1 or freeze_embeddings=True (or drop the callback).")
        # the epoch at whose start the layers unfreeze
        check_int(owner, "unfreeze_at_epoch", unfreeze_at_epoch, minimum=1, allow_none=True, null_means="never")
        self.freeze_embeddings = freeze_embeddings
        self.unfreeze_at_epoch = unfreeze_at_epoch
        #: whether the unfreeze has happened (saved in the checkpoint)
        self.unfrozen = False
        #: canonical names this callback froze (filled at setup), their element count and the model's
        self.frozen_names: list[str] = []
        self.frozen_numel = 0
        self.total_numel = 0
        self.tied_embeddings: Optional[bool] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_layers=self.num_layers, freeze_embeddings=self.freeze_embeddings)

    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": self.unfrozen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.unfrozen = bool(state_dict.get("unfrozen", False))

    # -- selection ----------------------------------------------------------------------------------------------
    def select_names(self, pl_module: pl.LightningModule) -> list[str]:
        """Canonical parameter names of the embeddings (if frozen here) and the lowest ``num_layers`` layers."""
        hf = find_hf_model(pl_module)
        layers = find_decoder_layers(hf)
        check_layer_count("FreezeLayers", "num_layers", self.num_layers, len(layers), minimum=0)
        modules = list(layers[: self.num_layers])
        if self.freeze_embeddings:
            emb = find_input_embeddings(hf)
            modules.append(emb)
            try:
                self.tied_embeddings = find_lm_head(hf).weight is emb.weight
            except ModelLayoutError:
                self.tied_embeddings = None
        return module_param_names(pl_module, modules, owner="FreezeLayers")

    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[ParamPlan]:
        if self.unfrozen:  # a second fit() after the unfreeze: nothing to freeze any more
            return None
        names = self.select_names(pl_module)
        params = dict(pl_module.named_parameters())
        if self.tied_embeddings:
            emb = find_input_embeddings(find_hf_model(pl_module))
            if emb.weight.requires_grad:
                rank_zero_warn(
                    "FreezeLayers(freeze_embeddings=True): the input embeddings and the lm_head are one tied tensor "
                    "(tie_word_embeddings=True), so the output layer is frozen too. Set freeze_embeddings=False to "
                    "keep training it."
                )
        self.frozen_names = names
        self.frozen_numel = sum(params[n].numel() for n in names)
        self.total_numel = sum(p.numel() for p in params.values())
        rank_zero_info(
            f"FreezeLayers: freezing {'the input embeddings and ' if self.freeze_embeddings else ''}the lowest "
            f"{self.num_layers} layer(s): {len(names)} tensor(s), {self.frozen_numel:,} of {self.total_numel:,} elements"
            + (f"; unfreezing at epoch {self.unfreeze_at_epoch}" if self.unfreeze_at_epoch is not None else "")
        )
        return ParamPlan({n: FROZEN for n in names}, owner="FreezeLayers")

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        reg = param_plans_for(pl_module, create=False)
        if stage == "fit" and reg is not None and self.plan_key in reg.plans and reg.summary(pl_module).trainable == 0:
            raise ValueError(
                f"FreezeLayers(num_layers={self.num_layers}, freeze_embeddings={self.freeze_embeddings}) leaves no "
                f"trainable parameter (together with the other parameter callbacks and what the module froze); "
                f"lower `num_layers` or set freeze_embeddings=False."
            )

    # -- gradual unfreezing -------------------------------------------------------------------------------------
    def _unfreeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # under DDP the base averages the gradients of the unfrozen tensors (DDP's reducer never registered them)
        report = self.update_plan(trainer, pl_module, None)
        self.unfrozen = True
        if report is not None and report.groups_added and trainer.lr_scheduler_configs:
            for opt in trainer.optimizers:
                sync_schedulers(trainer, opt, origin=None, owner="FreezeLayers")
        rank_zero_info(f"FreezeLayers: unfroze {len(report.added) if report else 0} tensor(s) at epoch "
                       f"{trainer.current_epoch} (fresh optimizer state)")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # resumed after the unfreeze: the module's optimizer was built from the frozen plan, the checkpoint's
        # optimizer state holds the unfrozen one. Drop the plan again; the base then arranges the groups like the
        # checkpointed ones before Lightning loads that state.
        if self.unfrozen and self.plan_key in self.registry(pl_module).plans:
            self._unfreeze(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.unfreeze_at_epoch is not None and not self.unfrozen and trainer.current_epoch >= self.unfreeze_at_epoch:
            self._unfreeze(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        frac = self.frozen_numel / self.total_numel if self.total_numel else 0.0
        pl_module.log(f"lit_ft/{self.technique_name}/frozen_fraction", 0.0 if self.unfrozen else frac, batch_size=1)
