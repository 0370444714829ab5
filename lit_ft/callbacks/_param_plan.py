"""Shared plumbing for parameter techniques (gradient tensor selection, parameter reset, freezing).

Each technique expresses what may train as a :class:`~lit_ft.core.params.ParamPlan` keyed by the LightningModule's
own parameter names (``pl_module.named_parameters()``). A :class:`ParamPlanRegistry` on the module composes the
plans of every active callback with the user's own ``requires_grad`` choices (intersection; a conflict raises
:class:`~lit_ft.core.params.ParamPlanConflict` naming both owners), applies the result, keeps the optimizer's
param groups and state consistent when trainability changes mid-run, masks gradients of element-masked tensors
before the optimizer step and re-projects masked-out entries after it (so weight decay and momentum cannot move
them), on resume arranges the fresh optimizer's param groups like the checkpointed ones, and under DDP averages
the gradients of tensors that became trainable after DDP was set up (its reducer never sees them).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lit_ft.core.optim import (
    DEFAULT_NO_DECAY_PATTERNS,
    RebuildReport,
    apply_optimizer_layout,
    optimizer_defaults,
    optimizer_layout,
    rebuild_param_groups,
    sync_schedulers,
    unwrap_optimizer,
)
from lit_ft.core.pictures import PictureEvery, is_picture_step, log_figure
from lit_ft.core.resume import adopt_saved_state, record_resume_args
from lit_ft.core.step_probe import StepFlopsFraction, flops_monitor_of
from lit_ft.core.params import (
    FROZEN,
    TRAINABLE,
    ParamPlan,
    PlanSummary,
    apply_plan,
    compose,
    mask_gradients,
    plan_summary,
    reproject_masked,
    snapshot_masked,
)

_REGISTRY_ATTR = "_lit_ft_param_plans"
#: top-level checkpoint key of the state shared by every parameter callback (the optimizer group layout)
CHECKPOINT_KEY = "lit_ft_param_plans"
#: attribute of the DDP wrapper: ids of the parameters trainable when it was built (its reducer averages only those)
_TRAINABLE_AT_WRAP = "_lit_ft_trainable_at_wrap"


def _ddp_wrapper(trainer: pl.Trainer) -> torch.nn.parallel.DistributedDataParallel | None:
    model = getattr(trainer.strategy, "model", None)
    return model if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None


class ParamPlanRegistry:
    """The composed parameter plan of one LightningModule.

    ``no_decay_patterns``: tensors that get no weight decay when they join the optimizer mid-run — the module's own
    ``no_decay_patterns`` attribute if it defines one (lit_ft's modules do: biases, norms and embeddings), else
    :data:`~lit_ft.core.optim.DEFAULT_NO_DECAY_PATTERNS`, so a rebuild follows the policy the module's
    ``configure_optimizers`` used.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        #: the user's own choices (tensors frozen before any lit_ft callback ran stay frozen)
        self.baseline = ParamPlan.from_requires_grad(module, owner=f"{type(module).__name__} (requires_grad)")
        patterns = getattr(module, "no_decay_patterns", None)
        self.no_decay_patterns: tuple[str, ...] = (
            (patterns,) if isinstance(patterns, str) else tuple(patterns) if patterns is not None else DEFAULT_NO_DECAY_PATTERNS
        )
        self.plans: dict[str, ParamPlan] = {}
        self.composed: ParamPlan | None = None
        self._snapshot: dict[str, torch.Tensor] = {}
        self._summary: PlanSummary | None = None  # of the composed plan; replaced at every set()

    @property
    def has_masks(self) -> bool:
        return bool(self._snapshot)

    def set(self, key: str, plan: ParamPlan | None, module: torch.nn.Module) -> PlanSummary:
        """Register (or replace, or with ``None`` remove) one callback's plan, recompose and apply it."""
        if plan is None:
            self.plans.pop(key, None)
        else:
            self.plans[key] = plan
        self.composed = compose([self.baseline, *self.plans.values()], owner="lit_ft")
        summary = self._summary = apply_plan(module, self.composed, unlisted="keep")
        # values to restore masked-out entries to: taken when the plan changes
        self._snapshot = snapshot_masked(module, self.composed)
        return summary

    def summary(self, module: torch.nn.Module) -> PlanSummary:
        """What may train now under the composed plan of every registered callback (the baseline alone before any
        plan is set)."""
        if self._summary is None:
            self._summary = plan_summary(module, self.composed or self.baseline, strict=False)
        return self._summary

    def mask_gradients(self, module: torch.nn.Module) -> None:
        if self.composed is not None:
            mask_gradients(module, self.composed)

    def reproject(self, module: torch.nn.Module) -> None:
        if self.composed is not None and self._snapshot:
            reproject_masked(module, self.composed, self._snapshot)


def param_plans_for(module: torch.nn.Module, create: bool = True) -> ParamPlanRegistry | None:
    """The :class:`ParamPlanRegistry` of ``module`` (created on first use: the baseline is read then)."""
    reg = module.__dict__.get(_REGISTRY_ATTR)
    if reg is None and create:
        reg = ParamPlanRegistry(module)
        module.__dict__[_REGISTRY_ATTR] = reg
    return reg


def selection_plan(
    pl_module: torch.nn.Module, names: list[str], baseline: ParamPlan, owner: str, required: bool, what: str,
    hint: str = "",
) -> tuple[ParamPlan, list[str]]:
    """Plan that trains ``names`` minus what the user's module already froze (``baseline``) and freezes every
    other tensor; returns it with the names it trains. Raises if nothing would train."""
    keep = [n for n in names if n not in baseline or baseline[n].trainable]
    if not keep:
        raise ValueError(
            f"{owner}: {what} selects {len(names)} tensor(s) ({names[:4]}{' ...' if len(names) > 4 else ''}), but "
            f"your LightningModule froze all of them (requires_grad=False before training, e.g. PEFT's frozen base "
            f"weights), so nothing would train. {owner} never unfreezes what your module froze; {hint}"
        )
    keep_set = set(keep)
    entries = {n: (TRAINABLE if n in keep_set else FROZEN) for n, _ in pl_module.named_parameters()}
    return ParamPlan(entries, owner, required=keep if required else ()), keep


class ParamPlanCallback(PictureEvery, Callback):
    """Base class for parameter techniques.

    Subclasses implement :meth:`build_plan` (called at ``setup("fit")``, before the optimizer exists) and may call
    :meth:`update_plan` later (epoch start, phase switch); ``technique_name`` names the log prefix
    ``lit_ft/<technique_name>/``. Gradient masking (``on_before_optimizer_step``) and exact re-projection
    (``on_train_batch_end``) of element-masked tensors are done here for every registered plan.

    DDP: the reducer only all-reduces the tensors that were trainable when the strategy wrapped the model. The
    first :meth:`update_plan` after the wrap records that set; tensors trainable later get their gradients averaged
    across ranks here before each optimizer step (all ranks change plans at the same step).

    Resume: mid-run plan changes rebuild the param groups by name, so a run's group layout depends on its history,
    while Lightning restores the optimizer state *by position* after ``on_fit_start``. Every checkpoint therefore
    records each optimizer's layout (:func:`~lit_ft.core.optim.optimizer_layout`, under ``checkpoint[
    "lit_ft_param_plans"]``), and :meth:`on_fit_start` of the last parameter callback re-applies it
    (:meth:`restore_optimizer_layout`). A subclass that overrides ``on_fit_start`` restores its own plan there
    (``update_plan``) and then calls ``super().on_fit_start(trainer, pl_module)``.

    Pictures: ``picture_every_n_steps`` (0 = off, the default): after every that many optimizer steps, a layer ×
    module-kind map of the composed plan (trainable / frozen / element-masked share of each cell),
    ``<log_dir>/<technique_name>/param_map_step{N}.png`` and a W&B image when a ``WandbLogger`` is attached
    (:mod:`lit_ft.core.picture_params`; the table drawn is kept as ``last_param_map`` on rank 0). Drawn from the
    plan already held; nothing runs in between.
    """

    technique_name: str = "param_plan"
    #: resuming with changed arguments (:mod:`lit_ft.core.resume`): argument -> ``RESTORE``, a reason to refuse, or
    #: ``(saved, new, state) -> reason | None``; ``None`` = every change of the state key's arguments is refused
    resume_decisions: Any = None
    #: path of the last picture and the table it drew (rank 0; ``None`` before the first)
    last_picture: str | None = None
    last_param_map: Any = None
    _picture_done: int | None = None  # the last step drawn (one picture per step under accumulation)

    def __init__(self, picture_every_n_steps: int = 0) -> None:
        super().__init__()
        self.picture_every_n_steps = picture_every_n_steps  # checked by PictureEvery

    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ParamPlan | None:
        """The plan to apply before training (``None`` = no constraint yet)."""
        return None

    @property
    def plan_key(self) -> str:
        return self.state_key

    def registry(self, pl_module: pl.LightningModule) -> ParamPlanRegistry:
        reg = param_plans_for(pl_module)
        assert reg is not None
        return reg

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._plan_module = pl_module
        self._restored_layout: list[list[list[str]] | None] | None = None  # set by on_load_checkpoint
        plan = self.build_plan(trainer, pl_module)
        if plan is not None:
            self.registry(pl_module).set(self.plan_key, plan, pl_module)

    def update_plan(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, plan: ParamPlan | None
    ) -> RebuildReport | None:
        """Replace this callback's plan mid-run: recompose, apply ``requires_grad``, and rebuild every optimizer's
        param groups by name (state of tensors that stay trainable is kept, state of frozen ones deleted, newly
        trainable ones start fresh). Returns the first optimizer's report."""
        reg = self.registry(pl_module)
        ddp = _ddp_wrapper(trainer)
        if ddp is not None and _TRAINABLE_AT_WRAP not in ddp.__dict__:  # first change since the wrap: what DDP syncs
            ddp.__dict__[_TRAINABLE_AT_WRAP] = {id(p) for p in pl_module.parameters() if p.requires_grad}
        reg.set(self.plan_key, plan, pl_module)
        report = None
        for opt in trainer.optimizers:
            lr, wd = optimizer_defaults(opt)
            r = rebuild_param_groups(opt, pl_module, reg.composed, lr, wd, no_decay_patterns=reg.no_decay_patterns,
                                     apply=False)
            report = report or r
        return report

    def trainable_fraction(self) -> float:
        """Fraction of the module's elements that may change now, after composing every active parameter plan with
        the user's own ``requires_grad`` (read from the registry when called, so another callback's later plan
        change is included). ``1.0`` before ``setup("fit")``."""
        module = getattr(self, "_plan_module", None)
        if module is None:
            return 1.0
        reg = param_plans_for(module, create=False)
        return float(reg.summary(module).fraction if reg is not None else plan_summary(module).fraction)

    # -- resume: the optimizer's group layout ------------------------------------------------------------------
    @staticmethod
    def optimizer_layouts(trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[list[list[str]] | None]:
        """:func:`~lit_ft.core.optim.optimizer_layout` of every optimizer (``None`` for one holding tensors that
        are not parameters of ``pl_module``)."""
        out: list[list[list[str]] | None] = []
        for opt in trainer.optimizers:
            try:
                out.append(optimizer_layout(opt, pl_module))
            except ValueError:
                out.append(None)
        return out

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        shared = checkpoint.setdefault(CHECKPOINT_KEY, {})
        if "optimizer_layout" not in shared:  # the same for every parameter callback: written once
            shared["optimizer_layout"] = self.optimizer_layouts(trainer, pl_module)
        record_resume_args(self, checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        # before any load_state_dict: a changed argument restores the saved state or refuses (never a silent reset)
        adopt_saved_state(self, trainer, checkpoint)
        self._restored_layout = (checkpoint.get(CHECKPOINT_KEY) or {}).get("optimizer_layout")

    def _is_last_plan_callback(self, trainer: pl.Trainer) -> bool:
        plan_callbacks = [c for c in trainer.callbacks if isinstance(c, ParamPlanCallback)]
        return bool(plan_callbacks) and plan_callbacks[-1] is self

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._is_last_plan_callback(trainer):  # every parameter callback has restored its plan by now
            self.restore_optimizer_layout(trainer, pl_module)
        self._restored_layout = None

    def restore_optimizer_layout(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule,
        layout: list[list[list[str]] | None] | None = None,
    ) -> None:
        """Arrange every optimizer's param groups as ``layout`` (one entry per optimizer, ``None`` = leave it; by
        default the layout of the checkpoint being resumed), so the optimizer state Lightning restores by position
        after ``on_fit_start`` lands on the right tensors. LR schedulers are re-mapped if the group count changed.

        Raises:
            RuntimeError: an optimizer does not hold the checkpointed tensors (the model or a parameter callback
                changed between the runs).
        """
        if layout is None:
            layout = getattr(self, "_restored_layout", None)
        if not layout:
            return
        for i, (opt, lay) in enumerate(zip(trainer.optimizers, layout)):
            if lay is None:
                continue
            n_before = len(opt.param_groups)
            try:
                origin = apply_optimizer_layout(opt, pl_module, lay)
            except ValueError as e:
                raise RuntimeError(
                    f"{type(self).__name__}: cannot give optimizer {i} the param-group layout of the checkpoint: {e}"
                ) from None
            if origin is not None and len(origin) != n_before and trainer.lr_scheduler_configs:
                sync_schedulers(trainer, opt, origin=origin, owner=type(self).__name__)

    # -- enforcement, shared by every parameter technique (idempotent when several are active) -------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.registry(pl_module).mask_gradients(pl_module)
        if self._is_last_plan_callback(trainer):  # once per step, whatever the number of parameter callbacks
            self.average_late_gradients(trainer, pl_module, optimizer)

    @staticmethod
    def average_late_gradients(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> int:
        """Under DDP with several ranks, all-reduce-average the gradients of ``optimizer``'s tensors that are
        trainable now but were not when DDP wrapped the model (DDP's reducer does not know them). Returns how many
        tensors were averaged."""
        ws = trainer.world_size
        ddp = _ddp_wrapper(trainer) if ws > 1 else None
        at_wrap = ddp.__dict__.get(_TRAINABLE_AT_WRAP) if ddp is not None else None
        if at_wrap is None:
            return 0
        in_opt = {id(p) for g in unwrap_optimizer(optimizer).param_groups for p in g["params"]}
        late = [p for p in pl_module.parameters()
                if p.requires_grad and p.grad is not None and id(p) not in at_wrap and id(p) in in_opt]
        for p in late:
            p.grad.copy_(trainer.strategy.reduce(p.grad, reduce_op="sum") / ws)
        return len(late)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.registry(pl_module).reproject(pl_module)
        pl_module.log(f"lit_ft/{self.technique_name}/trainable_fraction", self.trainable_fraction(),
                      on_step=True, on_epoch=False, batch_size=1)
        self._measure_flops(trainer, pl_module, batch)
        step = int(trainer.global_step)  # optimizer steps done: the same on every rank
        if is_picture_step(step, self.picture_every_n_steps) and self._picture_done != step:
            self._picture_done = step
            self.draw_pictures(trainer, pl_module, step)

    def draw_pictures(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> None:
        """The family's picture at optimizer step ``step``, called on every rank (the log dir is broadcast; only
        rank 0 draws and writes): the layer × module-kind map of the composed plan."""
        fig = None
        if trainer.is_global_zero:
            from lit_ft.core.picture_params import param_map_figure, param_map_table

            table = self.last_param_map = param_map_table(pl_module, self.registry(pl_module).summary(pl_module))
            fig = param_map_figure(table, title=f"{type(self).__name__}: trainable share, step {step} "
                                                f"({100 * self.trainable_fraction():.2f}% of elements)")
        self.last_picture = log_figure(trainer, fig, self.technique_name, "param_map", step)

    # -- measured FLOPs: lit_ft/<technique>/flops_fraction -----------------------------------------------------------
    #: every how many optimizer steps the FLOPs of the real step are measured against the full step (every tensor
    #: the user's module trains made trainable again) on the same batch, logged as ``lit_ft/<technique>/flops_fraction``
    #: (0 = never). Costs one extra forward + backward of that batch per measurement; the first measurement is the
    #: step after the first optimizer step (the plan is in force by then). The counted step runs under
    #: FlopCounterMode (a dispatch mode), which can change float rounding (~1e-8 on a weight, measured).
    flops_every_n_steps: int = 50

    @property
    def flops_monitor(self) -> StepFlopsFraction:
        return flops_monitor_of(self, self.technique_name)

    def _measure_flops(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        if not self.flops_every_n_steps:
            return
        mon = self.flops_monitor
        if mon.counted:  # this step was counted: the full step on the same batch, then log the fraction
            named = dict(pl_module.named_parameters())
            full = [n for n, e in self.registry(pl_module).baseline.items() if e.trainable and n in named]
            mon.probe(trainer, pl_module, batch, full)
        mon.batch_end(pl_module)
        nxt = trainer.global_step  # the optimizer steps done: the next micro-batch is part of step nxt + 1
        if nxt == 1 or (nxt > 1 and nxt % self.flops_every_n_steps == 0):
            if mon.due(trainer, pl_module, 1, step=nxt):  # once per step, at an accumulation window's start
                mon.arm(trainer, pl_module, step=nxt)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "_flops_monitor" in self.__dict__:
            self.flops_monitor.after_backward(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if "_flops_monitor" in self.__dict__:
            self.flops_monitor.abort()


class SelectionPlanCallback(ParamPlanCallback):
    """Base of techniques that train one fixed selection of tensors and freeze every other (TrainOnly,
    LocalizedTuning): :meth:`plan_selection` builds the plan (never unfreezing what the module froze) and records
    ``selected_names`` / ``selected_numel`` / ``total_numel``. Subclasses set ``self.required``."""

    selected_numel: int = 0
    total_numel: int = 0
    required: bool = False

    @property
    def selected_fraction(self) -> float:
        """Fraction of the model's elements this callback's selection trains (before composition with others)."""
        return self.selected_numel / self.total_numel if self.total_numel else 0.0

    def plan_selection(self, pl_module: pl.LightningModule, names: list[str], owner: str, what: str,
                       hint: str = "") -> ParamPlan:
        """:func:`selection_plan` of ``names`` against the user's baseline, with the selection bookkeeping."""
        plan, keep = selection_plan(pl_module, names, self.registry(pl_module).baseline, owner, self.required, what,
                                    hint=hint)
        numel = {n: p.numel() for n, p in pl_module.named_parameters()}
        self.selected_names = keep
        self.selected_numel = sum(numel[n] for n in keep)
        self.total_numel = sum(numel.values())
        return plan
