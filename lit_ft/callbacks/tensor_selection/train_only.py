"""TrainOnly: lightweight fine-tuning — train a fixed subset of tensors (embeddings + head, the top layers, or any
name patterns) and freeze everything else."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks._param_plan import SelectionPlanCallback
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_choice, check_int, check_str_list
from lit_ft.core.introspect import (
    ModelLayoutError,
    find_decoder_layers,
    find_final_norm,
    find_hf_model,
    find_input_embeddings,
    find_lm_head,
    lm_head_is_tied,
    module_param_names,
)
from lit_ft.core.params import ParamPlan, select_param_names

PRESETS = ("embeddings_and_head", "last_layers", "patterns")


@technique(name="train_only", family="tensor_selection",
           paper="Exploring and Evaluating Personalized Models for Code Generation", arxiv="2208.13928")
class TrainOnly(SelectionPlanCallback):
    """Lightweight fine-tuning: train only a fixed subset of tensors, freeze the rest.

    Paper: Zlotchevski et al., *Exploring and Evaluating Personalized Models for Code Generation* (FSE 2022) —
    "lightweight fine-tuning": (a) token embeddings plus the output softmax layer only, or (b) the final layer only.
    The same selection covers Lightning's ``BaseFinetuning`` "freeze the backbone" recipes and PEFT's
    ``modules_to_save``.

    Algorithm: at ``setup("fit")`` (before the optimizer exists) the chosen tensors are resolved on the
    LightningModule's own parameter names, intersected with what the module already froze (PEFT's base weights stay
    frozen), and registered as a :class:`~lit_ft.core.params.ParamPlan`; every other tensor is frozen. The plan
    composes with other lit_ft parameter callbacks by intersection.

    With tied input/output embeddings (``tie_word_embeddings=True``, e.g. SmolLM2) the embedding matrix *is* the
    lm_head: ``"embeddings_and_head"`` then trains one tensor, and ``"last_layers"`` with ``include_head=True`` also
    trains the input embeddings (``tied_embeddings`` tells which case applies).

    Args:
        preset: ``"embeddings_and_head"`` (input embeddings + lm_head), ``"last_layers"`` (the top ``last_k``
            decoder layers, plus the final norm and lm_head if ``include_head``), or ``"patterns"`` (the tensors
            whose ``pl_module.named_parameters()`` names match ``patterns``).
        last_k: number of top decoder layers for ``"last_layers"`` (>= 1, at most the model's layer count).
        patterns: for ``"patterns"`` only: fnmatch globs over the full parameter name (``*`` crosses dots), or
            regexes with a ``"re:"`` prefix (fullmatch). Each must match at least one parameter.
        include_head: for ``"last_layers"``: also train the final norm and the lm_head.
        required: mark the selected tensors as required, so that another parameter callback freezing one of them
            raises :class:`~lit_ft.core.params.ParamPlanConflict` at setup instead of silently shrinking the set.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "train_only"

    def __init__(
        self,
        preset: str = "embeddings_and_head",
        last_k: int = 2,
        patterns: Optional[list[str]] = None,
        include_head: bool = True,
        required: bool = False,
        picture_every_n_steps: int = 0,
    ) -> None:
        super().__init__(picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        check_choice(owner, "preset", preset, PRESETS)
        check_int(owner, "last_k", last_k, minimum=1)  # number of top decoder layers
        patterns = check_str_list(owner, "patterns", patterns, allow_none=True)
        if preset == "patterns" and not patterns:
            raise ValueError("TrainOnly: preset='patterns' needs `patterns` (e.g. ['*lm_head*', 're:.*layers\\.1\\..*']).")
        if preset != "patterns" and patterns is not None:
            raise ValueError(
                f"TrainOnly: `patterns` is only used with preset='patterns' (got preset={preset!r} and "
                f"patterns={patterns!r}); set preset='patterns' or drop `patterns`."
            )
        check_bool(owner, "include_head", include_head)
        check_bool(owner, "required", required)
        self.preset = preset
        self.last_k = last_k
        self.patterns = patterns
        self.include_head = include_head
        self.required = required
        #: filled at setup: the tensors this callback trains (canonical names), their element count, the model's
        #: element count, and whether the input embeddings and lm_head are one tied tensor (None: not known)
        self.selected_names: list[str] = []
        self.selected_numel = 0
        self.total_numel = 0
        self.tied_embeddings: Optional[bool] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            preset=self.preset, last_k=self.last_k, patterns=tuple(self.patterns or ()), include_head=self.include_head
        )

    # -- selection --------------------------------------------------------------------------------------------
    def _hf_model(self, pl_module: pl.LightningModule):  # noqa: ANN202
        try:
            return find_hf_model(pl_module)
        except ModelLayoutError as e:
            raise ModelLayoutError(f"TrainOnly(preset={self.preset!r}): {e} Use preset='patterns' for other models.") from None

    def select_names(self, pl_module: pl.LightningModule) -> list[str]:
        """Canonical parameter names the preset selects (before intersecting with the module's own freezing)."""
        if self.preset == "patterns":
            return select_param_names(pl_module, self.patterns, owner="TrainOnly")
        hf = self._hf_model(pl_module)
        try:
            self.tied_embeddings = lm_head_is_tied(hf)
        except ModelLayoutError:
            self.tied_embeddings = None
        if self.preset == "embeddings_and_head":
            modules = [find_input_embeddings(hf), find_lm_head(hf)]
        else:
            layers = find_decoder_layers(hf)
            if self.last_k > len(layers):
                raise ValueError(
                    f"TrainOnly: `last_k`={self.last_k} exceeds the model's {len(layers)} decoder layers; allowed: "
                    f"1..{len(layers)}."
                )
            modules = list(layers[len(layers) - self.last_k :])
            if self.include_head:
                try:
                    modules.append(find_final_norm(hf))
                except ModelLayoutError:
                    pass  # models without a final norm: the head alone
                modules.append(find_lm_head(hf))
        return module_param_names(pl_module, modules, owner="TrainOnly")

    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ParamPlan:
        names = self.select_names(pl_module)
        what = f"preset={self.preset!r}" + (f" (patterns={self.patterns})" if self.preset == "patterns" else "")
        plan = self.plan_selection(
            pl_module, names, "TrainOnly", what,
            hint="select tensors that are trainable there (under PEFT: the adapter parameters, e.g. preset='patterns', "
            "patterns=['*lora_*'], or add the module to LoraConfig(modules_to_save=...)).",
        )
        rank_zero_info(
            f"TrainOnly({what}): training {len(self.selected_names)} tensor(s), {self.selected_numel:,} of {self.total_numel:,} "
            f"elements ({100 * self.selected_fraction:.3f}%)"
            + (" — input embeddings and lm_head are one tied tensor" if self.tied_embeddings and self.preset != "patterns" else "")
        )
        return plan

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log(f"lit_ft/{self.technique_name}/selected_fraction", self.selected_fraction, batch_size=1)

