"""ProMoT: prompt tuning, then model tuning with that prompt attached (Wang et al., ICLR 2024)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks._prompt import check_optional_lr, check_optional_wd
from lit_ft.core.registry import technique
from lit_ft.callbacks.prompt.prompt_tuning import DEFAULT_LEARNING_RATE, PromptTuning
from lit_ft.core.optim import sync_schedulers
from lit_ft.core.params import FROZEN, ParamPlan, name_matcher
from lit_ft.core.validate import check_bool, check_choice, check_int

EVAL_PROMPT = ("with", "without")
#: optimizer steps of stage 1 when neither ``prompt_steps`` nor ``prompt_epochs`` is given
DEFAULT_PROMPT_STEPS = 100


@technique(name="promot", family="prompt",
           paper="Two-stage LLM Fine-tuning with Less Specialization and More Generalization", arxiv="2211.00635")
class ProMoT(PromptTuning):
    """ProMoT (Prompt Tuning with MOdel Tuning): a two-stage fine-tune that keeps the task's *format* in a removable
    soft prompt, so the model itself specialises less and keeps more of its in-context ability.

    Paper: Wang et al., *Two-stage LLM Fine-tuning with Less Specialization and More Generalization* (ICLR 2024).

    Algorithm:
      1. **Stage 1** — prompt tuning (:class:`PromptTuning`): the model is frozen, only the soft prompt trains; it
         absorbs the task format.
      2. **Stage 2** (after ``prompt_steps`` optimizer steps, or at the start of epoch ``prompt_epochs``) — model
         tuning with the prompt attached: every tensor the module itself trains becomes trainable (under PEFT: the
         adapters), the prompt is frozen (lit-ft's reading of the abstract's "fine-tuning the model itself with
         this soft prompt attached", which could not be confirmed from the full text; keeping it trainable is
         ``train_prompt_in_stage2=True``). The optimizer's param groups are rebuilt by name: the model's tensors
         start with fresh state at ``model_learning_rate``, the prompt's state is deleted.
      3. **Evaluation** — with ``eval_prompt="without"`` validation and test run the bare model (the prompt is
         switched off with ``injector.disabled()``), which measures what the paper cares about: the model's
         behaviour without the task's format prompt. ``"with"`` evaluates on the fine-tuned task as trained.

    Args:
        num_virtual_tokens: as in :class:`PromptTuning` (the soft prompt).
        init: as in :class:`PromptTuning` (the soft prompt).
        init_text: as in :class:`PromptTuning` (the soft prompt).
        peft_weights: as in :class:`PromptTuning` (the soft prompt).
        seed: as in :class:`PromptTuning` (the soft prompt).
        tokenizer: as in :class:`PromptTuning` (the soft prompt).
        learning_rate: the prompt's lr in stage 1 (own param group). Default 0.3, :class:`PromptTuning`'s (stage 1
            is Lester et al.'s prompt tuning; ProMoT's own stage-1 lr could not be read: no released code).
            ``None`` = the optimizer's.
        weight_decay: the prompt's weight decay; ``None`` = the optimizer's.
        prompt_steps: optimizer steps of stage 1 (>= 1). Exclusive with ``prompt_epochs``; when both are ``None``
            stage 1 lasts 100 steps.
        prompt_epochs: epochs of stage 1 (>= 1); stage 2 starts at the start of epoch ``prompt_epochs``.
        train_prompt_in_stage2: keep training the prompt in stage 2 (at its stage-1 lr and state). Default false.
        model_learning_rate: lr of the model's tensors in stage 2; ``None`` = the optimizer's base lr (its first
            group's ``initial_lr`` / ``lr`` when fit starts).
        model_weight_decay: weight decay of the model's tensors in stage 2 (biases, norms and the module's other
            no-decay tensors get 0); ``None`` = the module's ``hparams.weight_decay`` if it has one, else the largest
            weight decay of the optimizer's groups when fit starts.
        eval_prompt: ``"with"`` (default) or ``"without"`` the prompt in validation and test.
        save_dir: write the stage-1 prompt artifact here when fit ends (the model's weights are in the checkpoint).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "promot"
    exports_peft = False  # stage 2 tunes the model too: a PEFT prompt alone would not reproduce the run

    def __init__(self, num_virtual_tokens: int = 20, init: str = "vocab", init_text: str | None = None,
                 peft_weights: str | None = None, seed: int = 0, learning_rate: float | None = DEFAULT_LEARNING_RATE,
                 weight_decay: float | None = None, prompt_steps: int | None = None, prompt_epochs: int | None = None,
                 train_prompt_in_stage2: bool = False, model_learning_rate: float | None = None,
                 model_weight_decay: float | None = None, eval_prompt: str = "with", save_dir: str | None = None,
                 tokenizer: str | None = None, picture_every_n_steps: int = 0) -> None:
        super().__init__(num_virtual_tokens=num_virtual_tokens, init=init, init_text=init_text,
                         peft_weights=peft_weights, seed=seed, freeze_backbone=True, learning_rate=learning_rate,
                         weight_decay=weight_decay, save_dir=save_dir, tokenizer=tokenizer,
                         picture_every_n_steps=picture_every_n_steps)
        self.prompt_steps = check_int("ProMoT", "prompt_steps", prompt_steps, minimum=1, allow_none=True)
        self.prompt_epochs = check_int("ProMoT", "prompt_epochs", prompt_epochs, minimum=1, allow_none=True)
        if self.prompt_steps is not None and self.prompt_epochs is not None:
            raise ValueError("ProMoT: give either `prompt_steps` or `prompt_epochs` (the length of stage 1), not both")
        if self.prompt_steps is None and self.prompt_epochs is None:
            self.prompt_steps = DEFAULT_PROMPT_STEPS
        self.train_prompt_in_stage2 = check_bool("ProMoT", "train_prompt_in_stage2", train_prompt_in_stage2)
        self.model_learning_rate = check_optional_lr(model_learning_rate, "model_learning_rate", "ProMoT")
        self.model_weight_decay = check_optional_wd(model_weight_decay, "model_weight_decay", "ProMoT")
        self.eval_prompt = check_choice("ProMoT", "eval_prompt", eval_prompt, EVAL_PROMPT)
        #: 1 = prompt tuning, 2 = model tuning
        self.stage = 1
        #: global step at which stage 2 began (None before)
        self.switch_step: int | None = None
        self._base_hp: tuple[float, float] | None = None
        self._eval_off: AbstractContextManager | None = None

    # -- plans -----------------------------------------------------------------------------------------------------
    def stage2_plan(self, pl_module: pl.LightningModule) -> ParamPlan | None:
        """Stage 2: what the module trains (its own ``requires_grad`` choices), the prompt frozen unless
        ``train_prompt_in_stage2``. ``None`` = no constraint of ours."""
        if self.train_prompt_in_stage2:
            return None
        return ParamPlan({n: FROZEN for n in self.source_param_names(pl_module)}, owner=type(self).__name__)

    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ParamPlan | None:
        return self.stage2_plan(pl_module) if self.stage == 2 else super().build_plan(trainer, pl_module)

    def model_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        """The tensors stage 2 trains besides the prompt (after composition with every other plan)."""
        prompt = set(self.source_param_names(pl_module))
        return [n for n, p in pl_module.named_parameters() if p.requires_grad and n not in prompt]

    # -- the switch --------------------------------------------------------------------------------------------
    def _record_base_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The optimizer's lr and weight decay as ``configure_optimizers`` made them (before any regrouping)."""
        if not trainer.optimizers:
            return
        groups = trainer.optimizers[0].param_groups
        lr = float(groups[0].get("initial_lr", groups[0]["lr"]))
        hparams = getattr(pl_module, "hparams", None)
        wd = hparams.get("weight_decay") if hparams is not None and hasattr(hparams, "get") else None
        if wd is None:
            wd = max(float(g.get("weight_decay", 0.0)) for g in groups)
        self._base_hp = (lr, float(wd))

    def enter_stage2(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Switch the plan to stage 2 and rebuild every optimizer's groups by name; the model's tensors get
        ``model_learning_rate`` / ``model_weight_decay`` in groups of their own."""
        report = self.update_plan(trainer, pl_module, self.stage2_plan(pl_module))
        if report is not None and report.groups_added and trainer.lr_scheduler_configs:
            for opt in trainer.optimizers:
                sync_schedulers(trainer, opt, origin=None, owner=type(self).__name__)
        for p in self.source.parameters() if self.source is not None else ():
            if not p.requires_grad:
                p.grad = None
        base_lr, base_wd = self._base_hp or (None, None)
        lr = self.model_learning_rate if self.model_learning_rate is not None else base_lr
        wd = self.model_weight_decay if self.model_weight_decay is not None else base_wd
        names = self.model_param_names(pl_module)
        no_decay = [name_matcher(p) for p in self.registry(pl_module).no_decay_patterns]
        assignments: dict[str, dict[str, float]] = {}
        for n in names:
            hp: dict[str, float] = {}
            if lr is not None:
                hp["lr"] = float(lr)
            if wd is not None:
                hp["weight_decay"] = 0.0 if any(m(n) for m in no_decay) else float(wd)
            assignments[n] = hp
        if assignments:
            self.apply_group_hparams(trainer, pl_module, assignments)
        self.stage = 2

    def _switch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.enter_stage2(trainer, pl_module)
        self.switch_step = int(trainer.global_step)
        rank_zero_info(f"ProMoT: stage 2 (model tuning, prompt {'trainable' if self.train_prompt_in_stage2 else 'frozen'})"
                       f" from step {self.switch_step}")

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_base_hparams(trainer, pl_module)
        if self.stage == 2:  # resumed in (or re-fit after) stage 2: same plan and groups before the layout restore
            self.enter_stage2(trainer, pl_module)
        super().on_fit_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stage == 1 and self.prompt_epochs is not None and trainer.current_epoch >= self.prompt_epochs:
            self._switch(trainer, pl_module)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stage == 1 and self.prompt_steps is not None and trainer.global_step >= self.prompt_steps:
            self._switch(trainer, pl_module)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        pl_module.log(f"lit_ft/{self.technique_name}/stage", float(self.stage), on_step=True, on_epoch=False,
                      batch_size=1)

    def _eval_start(self) -> None:
        if self.eval_prompt == "without" and self.injector is not None and self._eval_off is None:
            self._eval_off = self.injector.disabled()
            self._eval_off.__enter__()

    def _eval_end(self) -> None:
        if self._eval_off is not None:
            self._eval_off.__exit__(None, None, None)
            self._eval_off = None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "switch_step": self.switch_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.stage = int(state_dict.get("stage", 1))
        self.switch_step = state_dict.get("switch_step")
