"""LT-SFT: Lottery-Ticket Sparse Fine-Tuning (Ansell et al., "Composable Sparse Fine-Tuning for Cross-Lingual
Transfer", ACL 2022; reference code ``cambridgeltl/composable-sft``, ``src/sft/lt_sft.py``)."""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
import torch

from lit_ft.callbacks._param_plan import ParamPlanCallback
from lit_ft.callbacks.param_reset._topk_delta import topk_abs_delta_masks
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_choice, check_int, check_number, check_str, check_str_list
from lit_ft.core.sparse_diff import export_sparse_diff
from lit_ft.core.introspect import ModelLayoutError, find_hf_model, find_lm_head, lm_head_is_tied
from lit_ft.core.optim import reset_optimizer_state, restart_schedulers
from lit_ft.core.params import ParamPlan, select_param_names
from lit_ft.core.resume import ARGS_KEY, RESTORE

__all__ = ["LotteryTicketSparseFT", "topk_abs_delta_masks"]

_THETA0_DEVICES = ("cpu", "same")
_THETA0_DTYPES = ("exact", "bfloat16")
_DIFF_DTYPES = ("float64", "float32")
#: phase 2's LR schedule: "restart" (a fresh schedule, as the reference's new Trainer per phase) or "continue"
_PHASE2_SCHEDULES = ("restart", "continue")


# ----------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------


def _head_param_ids(pl_module: torch.nn.Module) -> set[int]:
    """Ids of the output head's parameters: an untied ``lm_head``, or a ``score``/``classifier``/``qa_outputs``."""
    try:
        hf = find_hf_model(pl_module)
    except ModelLayoutError:
        return set()
    try:
        head = find_lm_head(hf)
        return set() if lm_head_is_tied(hf) else {id(p) for p in head.parameters()}
    except ModelLayoutError:
        pass
    for attr in ("score", "classifier", "qa_outputs"):
        m = getattr(hf, attr, None)
        if isinstance(m, torch.nn.Module):
            return {id(p) for p in m.parameters()}
    return set()


def _module_prefix(pl_module: torch.nn.Module) -> str:
    """Path of the HF model inside ``pl_module`` (``"model."``), ``""`` if it is the module itself or absent."""
    try:
        hf = find_hf_model(pl_module)
    except ModelLayoutError:
        return ""
    for name, m in pl_module.named_modules():
        if m is hf:
            return f"{name}." if name else ""
    return ""


# -- resuming with changed arguments (lit_ft.core.resume): θ₀ does not depend on K, the phase-1 length or the split
# into maskable / always-trained tensors, so in phase 1 it is restored and those are recomputed; after the switch the
# kept entries were chosen with the old values and θ₀ outside them is gone, so a change is refused.
def _refuse_after_switch(what: str) -> Any:
    def decide(saved: Any, new: Any, state: Mapping[str, Any]) -> Optional[str]:
        if int(state.get("phase", 1)) != 2 and int(state.get("iteration", 0)) == 0:
            return None
        return (f"the switch to phase 2 already happened at step "
                f"{state.get('first_switch_at') or state.get('switched_at')} and {what}, so the new value cannot apply")
    return decide


def _theta0_dtype_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> Optional[str]:
    if saved == "bfloat16" and new == "exact":
        return "the saved θ₀ is rounded to bfloat16, the exact θ₀ cannot be recovered from it"
    return None  # exact -> bfloat16: the saved θ₀ is rounded on restore


_SELECTION_ARGS = ("proportion", "num_params", "always_train")
_PHASE1_ARGS = ("phase1_steps", "phase1_epochs", "phase1_fraction", "iterations")


@technique(name="lottery_ticket", family="param_reset",
           paper="Composable Sparse Fine-Tuning for Cross-Lingual Transfer", arxiv="2110.07560")
class LotteryTicketSparseFT(ParamPlanCallback):
    """LT-SFT, lottery-ticket sparse fine-tuning (Ansell et al., ACL 2022).

    Algorithm:

    1. *Phase 1*: fine-tune every trainable ("maskable") tensor in full, from ``θ₀`` (the values at fit start).
    2. At the boundary: keep the ``K`` entries with the largest ``|θ₁ − θ₀|`` over all maskable tensors (exact,
       chunked radix select: memory O(chunk), no list of all values); reset *every* trainable tensor to ``θ₀``
       (head included); delete the optimizer state (moments and step counts) of every tensor and, by default,
       restart the LR schedule at step 0 (``phase2_schedule``): the reference trains phase 2 with a fresh optimizer
       and a fresh schedule (a new Trainer per phase).
    3. *Phase 2* (the rest of training): only the ``K`` entries (plus the ``always_train`` tensors) train. The
       element masks go through the shared :class:`~lit_ft.core.params.ParamPlan`: gradients are masked before
       the step and masked-out entries are copied back after it, so AdamW weight decay and momentum cannot move
       them (the reference implementation only zeroes gradients). Tensors without a kept entry are frozen.
    4. At the end of training, ``φ = θ − θ₀`` is written as a sparse diff (masked entries only; ``always_train``
       tensors densely) to ``export_path``; diffs compose with :func:`lit_ft.compose_sparse_diffs`.

    Memory: a copy of ``θ₀`` of every trainable tensor (``theta0_device``, ``theta0_dtype``) during phase 1 — it is
    also written into each phase-1 checkpoint, so those checkpoints hold the trainable weights twice. In phase 2
    only ``θ₀`` at the kept entries (and of the ``always_train`` tensors) is kept; the base class additionally holds
    a copy of each partly-masked tensor for the re-projection.

    Optional L1 pull towards ``θ₀`` (the reference's ``full_l1_reg`` / ``sparse_l1_reg``; off by default, as in its
    NLI recipe; 0.1 in its MLM recipe): ``λ · Σ|θ − θ₀| / N`` over the maskable tensors (``N`` = their entries) is
    added to the loss, as its (sub)gradient ``λ · sign(θ − θ₀) / N`` added to their gradients once per optimizer
    step (after gradient averaging, before clipping and the step) — the same update as the reference's loss term
    under gradient accumulation, without touching the module's loss. Phase 1 compares against the full ``θ₀`` copy
    (one extra pass over the trainable weights per step, and a transfer of ``θ₀`` per step with
    ``theta0_device="cpu"``); phase 2 only the kept entries.

    Several iterations (``iterations`` = the reference's ``n_ft_iterations``, 1 by default as there): the run is cut
    into ``iterations`` equal spans, each a full phase then a sparse phase. Iteration ``i`` snapshots the weights
    at its start, fine-tunes every trainable tensor in full (the earlier masks lifted), unfreezes the ``K // n``
    entries with the largest ``|θ − θ₀|`` among those not unfrozen yet (``θ₀``: the weights at fit start, as the
    reference's ``_original_params``), resets every trainable tensor to the snapshot, and trains the union of the
    unfrozen entries sparsely; every phase starts with a cleared optimizer state and (``phase2_schedule="restart"``)
    a restarted schedule, as the reference builds a fresh optimizer and schedule per phase. Until the last selection
    the full ``θ₀`` copy is kept, and during a later iteration's full phase also the snapshot (a second copy of the
    trainable weights). The reference's separate min/max step and epoch limits per phase are expressed here as
    the run length split into equal iterations and ``phase1_steps`` / ``phase1_fraction`` of each; ``phase1_epochs``
    applies to one iteration only.
    The restarted schedule keeps the length it was built with: the reference's phase
    schedule spans one phase, so build the module's scheduler over one phase's steps to match it (a warm-up-only
    schedule, as ``CausalLMModule``'s, matches as is). Phase-2 resume
    needs a strategy that restores callback state before ``on_fit_start`` (single device, DDP; not DeepSpeed).
    Under DDP set ``find_unused_parameters=True`` (``strategy="ddp_find_unused_parameters_true"``): tensors without
    kept entries stop receiving gradients in phase 2.

    Resuming with changed arguments: in phase 1, θ₀ is restored from the checkpoint and ``proportion`` /
    ``num_params`` / ``always_train`` / ``phase1_*`` take their new values (θ₀ does not depend on them); after the
    switch a change of any of them is refused with an error naming it (the entries were chosen with the old values
    and θ₀ outside them is gone), as is ``theta0_dtype`` ``"bfloat16"`` -> ``"exact"``. A checkpoint without this
    callback's state warns that θ₀ is taken from the checkpoint's weights.

    Args:
        proportion: ``K`` as a fraction of all maskable entries, ``0 < proportion <= 1`` (reference default 0.01);
            ignored when ``num_params`` is set.
        num_params: ``K`` as an absolute number of entries (``>= 1``, at most the number of maskable entries).
        phase1_steps: optimizer steps of phase 1 (of each iteration's full phase). Exclusive with ``phase1_epochs``.
        phase1_epochs: epochs of phase 1 (the switch happens at the end of that epoch).
        phase1_fraction: when neither ``phase1_steps`` nor ``phase1_epochs`` is given, phase 1 lasts this fraction
            of ``trainer.estimated_stepping_batches`` (of one iteration's span with ``iterations > 1``;
            ``0 < phase1_fraction < 1``; the reference recipes use equal phases).
        always_train: name patterns (fnmatch globs or ``"re:"`` regexes over the LightningModule's parameter names)
            of tensors excluded from masking and trained in full in both phases (e.g. a task head; they are still
            reset to ``θ₀`` at the boundary, as in the reference). ``None``: the output head when it is not tied to
            the input embeddings (an untied ``lm_head``, or ``score``/``classifier``); ``[]``: none. Explicit
            patterns are *required*: another callback freezing them raises ``ParamPlanConflict``.
        theta0_device: where the ``θ₀`` copy lives: ``"cpu"`` (spares accelerator memory) or ``"same"`` (the
            parameter's device; faster switch and export).
        theta0_dtype: ``"exact"`` (the parameter's own dtype: exact reset and exact diff) or ``"bfloat16"`` (half
            the memory of an fp32 copy; the reset then lands on bf16-rounded values and the diff is taken against
            them).
        export: write the sparse diff at the end of training (rank 0).
        export_path: file to write; ``None``: ``<trainer.log_dir or default_root_dir>/sparse_diff.safetensors``.
        diff_dtype: dtype of the exported values: ``"float64"`` (exact reconstruction) or ``"float32"``.
        phase2_schedule: ``"restart"`` (default, as the reference): every LR scheduler goes back to step 0 at every
            switch (a warm-up runs again; each group restarts from its base lr), through
            :func:`lit_ft.core.optim.restart_schedulers`. ``"continue"``: the run keeps one schedule across both
            phases (lit-ft's behaviour before). The optimizer state is cleared either way.
        full_l1_reg: ``λ`` of the L1 pull towards ``θ₀`` in phase 1 (>= 0; 0 = off, the default).
        sparse_l1_reg: ``λ`` of the L1 pull towards ``θ₀`` in phase 2, on the kept entries (>= 0; 0 = off).
        iterations: full/sparse iterations (the reference's ``n_ft_iterations``, >= 1; default 1 as there); each
            unfreezes ``K // iterations`` more entries. More than 1 needs a known run length (``max_steps`` or a
            sized data loader) and refuses ``phase1_epochs``.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "lottery_ticket"
    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`): K, ``always_train`` and the phase-1 length
    #: are recomputed from the new values in phase 1 (θ₀ is restored); after the switch they are refused
    resume_decisions = {
        **{a: _refuse_after_switch(f"the kept entries were selected with the saved {a}") for a in _SELECTION_ARGS},
        **{a: _refuse_after_switch("the phase-1 length no longer applies") for a in _PHASE1_ARGS},
        "theta0_device": RESTORE, "theta0_dtype": _theta0_dtype_decision,
        "export": RESTORE, "export_path": RESTORE, "diff_dtype": RESTORE,
        # read at the switch only: in phase 1 the new value applies there; after it the checkpoint's scheduler
        # state (restored by Lightning) already holds what was done then
        "phase2_schedule": RESTORE,
        "full_l1_reg": RESTORE, "sparse_l1_reg": RESTORE,  # a loss weight: the new value applies from now on
    }

    def __init__(
        self,
        proportion: float = 0.01,
        num_params: Optional[int] = None,
        phase1_steps: Optional[int] = None,
        phase1_epochs: Optional[int] = None,
        phase1_fraction: float = 0.5,
        always_train: Optional[list[str]] = None,
        theta0_device: str = "cpu",
        theta0_dtype: str = "exact",
        export: bool = True,
        export_path: Optional[str] = None,
        diff_dtype: str = "float64",
        phase2_schedule: str = "restart",
        full_l1_reg: float = 0.0,
        sparse_l1_reg: float = 0.0,
        iterations: int = 1,
        picture_every_n_steps: int = 0,
    ) -> None:
        super().__init__(picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        check_number(owner, "proportion", proportion, low=0, high=1, low_open=True)
        check_int(owner, "num_params", num_params, minimum=1, allow_none=True, null_means="from `proportion`")
        check_int(owner, "phase1_steps", phase1_steps, minimum=1, allow_none=True)
        check_int(owner, "phase1_epochs", phase1_epochs, minimum=1, allow_none=True)
        if phase1_steps is not None and phase1_epochs is not None:
            raise ValueError(
                f"`phase1_steps` ({phase1_steps}) and `phase1_epochs` ({phase1_epochs}) are exclusive: set one of them."
            )
        check_number(owner, "phase1_fraction", phase1_fraction, low=0, high=1, low_open=True, high_open=True)
        always_train = check_str_list(owner, "always_train", always_train, allow_none=True, allow_empty=True)
        check_choice(owner, "theta0_device", theta0_device, _THETA0_DEVICES)
        check_choice(owner, "theta0_dtype", theta0_dtype, _THETA0_DTYPES)
        check_choice(owner, "diff_dtype", diff_dtype, _DIFF_DTYPES)
        check_choice(owner, "phase2_schedule", phase2_schedule, _PHASE2_SCHEDULES)
        self.full_l1_reg = check_number(owner, "full_l1_reg", full_l1_reg, low=0)
        self.sparse_l1_reg = check_number(owner, "sparse_l1_reg", sparse_l1_reg, low=0)
        check_str(owner, "export_path", export_path, allow_none=True, null_means="next to the checkpoints")
        check_int(owner, "iterations", iterations, minimum=1)
        if iterations > 1 and phase1_epochs is not None:
            raise ValueError(
                f"`phase1_epochs` ({phase1_epochs}) applies to one iteration only; with `iterations`={iterations} set "
                "`phase1_steps` or `phase1_fraction` (of each iteration's span) instead."
            )
        self.iterations = int(iterations)
        self.proportion = float(proportion)
        self.num_params = num_params
        self.phase1_steps = phase1_steps
        self.phase1_epochs = phase1_epochs
        self.phase1_fraction = float(phase1_fraction)
        self.always_train = always_train
        self.theta0_device = theta0_device
        self.theta0_dtype = theta0_dtype
        self.export = bool(export)
        self.export_path = export_path
        self.diff_dtype = diff_dtype
        self.phase2_schedule = phase2_schedule
        # run state
        self.phase = 1
        self.iteration = 0  # 0-based; the current iteration's full phase is phase 1, its sparse phase phase 2
        self.boundary_step: Optional[int] = None  # end of the current iteration's full phase (step-based)
        self.iteration_starts: list[int] = []  # iterations > 1: the first step of each iteration
        self.k: Optional[int] = None  # entries unfrozen in all (K); K // iterations per iteration
        self.threshold: Optional[float] = None
        self.kept = 0
        self.num_maskable = 0
        self.maskable: list[str] = []
        self.always_trained: list[str] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.last_export_path: Optional[str] = None
        self.last_l1_distance: Optional[float] = None
        self._theta0: dict[str, torch.Tensor] = {}
        self._theta0_compact = False  # after the last selection: θ₀ only at the kept entries (flat)
        self._snapshot: dict[str, torch.Tensor] = {}  # iteration >= 1's full phase: the weights at its start
        self._first_switch_at: Optional[int] = None
        self._loaded: Optional[dict[str, Any]] = None
        self._switched_at: Optional[int] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            proportion=self.proportion, num_params=self.num_params, phase1_steps=self.phase1_steps,
            phase1_epochs=self.phase1_epochs, always_train=self.always_train,
        )

    # -- setup ------------------------------------------------------------------------------------------------------
    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[ParamPlan]:
        if not self.always_train:
            return None
        names = select_param_names(pl_module, self.always_train, owner=type(self).__name__)
        return ParamPlan({n: "trainable" for n in names}, owner=type(self).__name__, required=names)

    def _always_train_names(self, pl_module: pl.LightningModule) -> list[str]:
        if self.always_train is not None:
            return select_param_names(pl_module, self.always_train, owner=type(self).__name__) if self.always_train else []
        ids = _head_param_ids(pl_module)
        return [n for n, p in pl_module.named_parameters() if id(p) in ids]

    def _copy_theta0(self, p: torch.Tensor) -> torch.Tensor:
        t = p.detach()
        if self.theta0_dtype == "bfloat16" and t.is_floating_point():
            t = t.to(torch.bfloat16)
        return t.to("cpu" if self.theta0_device == "cpu" else t.device, copy=True)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lit_ft.core.strategy import refuse_sharded_strategies, require_unused_parameter_tolerance

        refuse_sharded_strategies(trainer, "LotteryTicketSparseFT", "its phase-2 top-k selection needs whole "
                                  "parameter tensors")
        require_unused_parameter_tolerance(trainer, "LotteryTicketSparseFT", "leaves tensors without kept entries "
                                           "out of phase 2")
        params = dict(pl_module.named_parameters())
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            self._restore(trainer, pl_module, loaded, params)
        else:
            self._start(trainer, pl_module, params)
        # the base arranges the optimizer's groups like the checkpointed ones (state is restored by position)
        super().on_fit_start(trainer, pl_module)

    def _start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, params: Mapping[str, torch.Tensor],
               restoring: bool = False) -> None:
        # `trainer.global_step` is still 0 here on a resume (the loops are restored after on_fit_start): the
        # checkpoint path tells a resumed run
        if not restoring and trainer.ckpt_path is not None:
            warnings.warn(
                f"LotteryTicketSparseFT: resuming from {trainer.ckpt_path!r}, which holds no state of this callback; "
                "θ₀ is taken from the checkpoint's (already trained) weights.", stacklevel=2,
            )
        always = set(self._always_train_names(pl_module))
        trainable = [n for n, p in params.items() if p.requires_grad]
        self.always_trained = [n for n in trainable if n in always]
        self.maskable = [n for n in trainable if n not in always]
        self.num_maskable = sum(params[n].numel() for n in self.maskable)
        if not self.maskable:
            raise ValueError(
                "LotteryTicketSparseFT: no maskable parameters: every trainable tensor is matched by `always_train` "
                f"({self.always_train!r}) or frozen."
            )
        if self.num_params is not None:
            if self.num_params > self.num_maskable:
                raise ValueError(
                    f"`num_params`={self.num_params} exceeds the {self.num_maskable} maskable entries; allowed range "
                    f"[1, {self.num_maskable}]."
                )
            self.k = self.num_params
        else:
            self.k = int(self.proportion * self.num_maskable)
            if self.k < 1:
                raise ValueError(
                    f"`proportion`={self.proportion} keeps no entry of the {self.num_maskable} maskable ones; use at "
                    f"least {1 / self.num_maskable:.3g} or set `num_params`."
                )
        if self.k // self.iterations < 1:
            raise ValueError(
                f"`iterations`={self.iterations} unfreezes K // iterations = 0 entries per iteration (K = {self.k}); "
                f"allowed range [1, {self.k}]."
            )
        self.iteration, self.phase = 0, 1
        self.boundary_step = self._boundary(trainer)
        self._theta0 = {n: self._copy_theta0(params[n]) for n in self.maskable + self.always_trained}
        self._theta0_compact, self._snapshot, self.masks = False, {}, {}

    @property
    def k_per_iteration(self) -> int:
        """Entries unfrozen at each selection: ``K // iterations`` (the reference's integer division)."""
        return int(self.k or 0) // self.iterations

    def _iteration_schedule(self, trainer: pl.Trainer) -> int:
        """``iterations > 1``: sets ``iteration_starts`` (equal spans of the run) and returns the end of the first
        full phase."""
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                f"LotteryTicketSparseFT: `iterations`={self.iterations} splits the run into equal spans, but the run "
                "length is unknown (trainer.estimated_stepping_batches is infinite); set max_steps."
            )
        n = self.iterations
        self.iteration_starts = [round(i * total / n) for i in range(n)]
        span = min(round((i + 1) * total / n) - s for i, s in enumerate(self.iteration_starts))
        full = self.phase1_steps if self.phase1_steps is not None else max(1, round(self.phase1_fraction * total / n))
        if full >= span:
            raise ValueError(
                f"LotteryTicketSparseFT: each of the {n} iterations spans {span} steps of the {int(total)}, so a full "
                f"phase of {full} steps leaves no sparse phase; lower `phase1_steps` / `phase1_fraction` or "
                "`iterations`, or train longer."
            )
        return full

    def _boundary(self, trainer: pl.Trainer) -> Optional[int]:
        if self.iterations > 1:
            return self._iteration_schedule(trainer)
        if self.phase1_epochs is not None:
            return None
        if self.phase1_steps is not None:
            steps = self.phase1_steps
        else:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    "LotteryTicketSparseFT: the run length is unknown (trainer.estimated_stepping_batches is infinite); "
                    "set `phase1_steps` or `phase1_epochs`."
                )
            steps = max(1, round(self.phase1_fraction * total))
        max_steps = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        if max_steps is not None and steps >= max_steps:
            warnings.warn(
                f"LotteryTicketSparseFT: phase 1 lasts {steps} steps but max_steps={max_steps}: phase 2 (sparse "
                "fine-tuning) will not run and no sparse diff is exported.", stacklevel=2,
            )
        return steps

    # -- the phase switch -------------------------------------------------------------------------------------------
    def _phase2_plan(self, pl_module: pl.LightningModule) -> ParamPlan:
        entries: dict[str, Any] = {n: m for n, m in self.masks.items()}
        entries.update({n: "trainable" for n in self.always_trained})
        return ParamPlan(entries, owner=type(self).__name__,
                         required=self.always_trained if self.always_train else ())

    def switch_to_phase2(self, trainer: pl.Trainer, pl_module: pl.LightningModule, at_epoch_end: bool = False) -> None:
        """Select the top-K entries (``K // iterations`` more, among those not selected yet), reset to ``θ₀`` (a
        later iteration: to the weights at its start), clear the optimizer state and start sparse fine-tuning."""
        params = dict(pl_module.named_parameters())
        maskable = {n: params[n] for n in self.maskable}
        earlier = self.masks if self.iteration > 0 else None
        masks, self.threshold = topk_abs_delta_masks(  # type: ignore[arg-type]
            maskable, {n: self._theta0[n] for n in self.maskable}, self.k_per_iteration, exclude=earlier)
        self.masks = {n: m.cpu() | earlier[n] if earlier else m.cpu() for n, m in masks.items()}
        self.kept = int(sum(int(m.sum()) for m in self.masks.values()))
        reset_to = self._snapshot if self.iteration > 0 else self._theta0
        with torch.no_grad():
            for n in self.maskable + self.always_trained:
                params[n].copy_(reset_to[n].to(device=params[n].device, dtype=params[n].dtype))
        self._snapshot = {}
        if self.iteration == self.iterations - 1:
            # the last selection: keep θ₀ only where it can still differ from θ (the kept entries and the
            # always-trained tensors)
            self._theta0 = {
                **{n: self._theta0[n].reshape(-1)[self.masks[n].reshape(-1).to(self._theta0[n].device)].clone()
                   for n in self.maskable},
                **{n: self._theta0[n] for n in self.always_trained},
            }
            self._theta0_compact = True
        self.phase = 2
        self._switched_at = trainer.global_step
        if self._first_switch_at is None:
            self._first_switch_at = trainer.global_step
        self.rebuild_report = self.update_plan(trainer, pl_module, self._phase2_plan(pl_module))
        self._fresh_optimization(trainer)
        self._log_switch(pl_module, at_epoch_end)

    def switch_to_full(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The next iteration's full phase: snapshot the weights, lift the masks (the entries selected so far stay
        recorded), clear the optimizer state and restart the schedule."""
        params = dict(pl_module.named_parameters())
        self.iteration += 1
        self._snapshot = {n: self._copy_theta0(params[n]) for n in self.maskable + self.always_trained}
        self.phase = 1
        self.boundary_step = self.iteration_starts[self.iteration] + (self.boundary_step - self.iteration_starts[0])  # type: ignore[operator]
        self.rebuild_report = self.update_plan(trainer, pl_module, self.build_plan(trainer, pl_module))
        self._fresh_optimization(trainer)

    def _fresh_optimization(self, trainer: pl.Trainer) -> None:
        """Clear every optimizer's state and (``phase2_schedule="restart"``) restart the schedules, as the
        reference's fresh optimizer and schedule per phase."""
        self.optimizer_states_cleared = 0
        for opt in trainer.optimizers:
            inner = getattr(opt, "_optimizer", opt)
            ps = [p for g in inner.param_groups for p in g["params"]]
            if ps:
                self.optimizer_states_cleared += reset_optimizer_state(inner, ps)
            if self.phase2_schedule == "restart":
                # after the boundary step's scheduler step (Lightning steps schedulers before on_train_batch_end):
                # the first step of the new phase runs at the schedule's step-0 rate, as with a fresh scheduler
                restart_schedulers(trainer, opt, owner=type(self).__name__)

    # -- the optional L1 pull towards θ₀ -------------------------------------------------------------------------
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        super().on_before_optimizer_step(trainer, pl_module, optimizer)  # masks, late-gradient averaging
        lam = self.full_l1_reg if self.phase == 1 else self.sparse_l1_reg
        if lam > 0 and self.num_maskable:
            self.last_l1_distance = self.add_l1_gradient(pl_module, lam)
            pl_module.log(f"lit_ft/{self.technique_name}/l1_distance", self.last_l1_distance, on_step=True,
                          on_epoch=False, batch_size=1)

    @torch.no_grad()
    def add_l1_gradient(self, pl_module: pl.LightningModule, lam: float) -> float:
        """Add ``lam · sign(θ − θ₀) / N`` to the maskable tensors' gradients (phase 2: at the kept entries only,
        the others equal ``θ₀``); returns ``Σ|θ − θ₀| / N`` (the penalty without ``lam``)."""
        params = dict(pl_module.named_parameters())
        n_total = float(self.num_maskable)
        dist = 0.0
        for n in self.maskable:
            p = params[n]
            if not p.requires_grad:
                continue  # phase 2: no kept entry, frozen
            base = self._theta0[n].to(device=p.device, dtype=torch.float32)
            if self.phase == 1:
                delta = p.detach().float() - base
                grad = torch.sign(delta).mul_(lam / n_total).to(p.dtype)
            else:
                mask = self.masks[n].to(p.device)
                if not self._theta0_compact:  # an earlier iteration's sparse phase: θ₀ is still whole
                    base = base.reshape(-1)[mask.reshape(-1)]
                delta = p.detach().float()[mask] - base
                grad = torch.zeros_like(p)
                grad[mask] = torch.sign(delta).mul_(lam / n_total).to(p.dtype)
            dist += float(delta.abs().sum())
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)
        return dist / n_total

    def _log_switch(self, pl_module: pl.LightningModule, at_epoch_end: bool) -> None:
        pre = f"lit_ft/{self.technique_name}"
        kw = dict(on_step=not at_epoch_end, on_epoch=at_epoch_end, batch_size=1)
        pl_module.log(f"{pre}/kept_entries", float(self.kept), **kw)
        pl_module.log(f"{pre}/threshold", float(self.threshold or 0.0), **kw)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if (self.phase == 1 and self.boundary_step is not None and trainer.global_step >= self.boundary_step
                and not self._run_is_over(trainer)):
            self.switch_to_phase2(trainer, pl_module)
        elif (self.phase == 2 and self.iteration + 1 < self.iterations
              and trainer.global_step >= self.iteration_starts[self.iteration + 1] and not self._run_is_over(trainer)):
            self.switch_to_full(trainer, pl_module)
        pl_module.log(f"lit_ft/{self.technique_name}/phase", float(self.phase), on_step=True, on_epoch=False,
                      batch_size=1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase == 1 and self.phase1_epochs is not None and trainer.current_epoch + 1 >= self.phase1_epochs \
                and not self._run_is_over(trainer):
            self.switch_to_phase2(trainer, pl_module, at_epoch_end=True)

    @staticmethod
    def _run_is_over(trainer: pl.Trainer) -> bool:
        """No optimizer step left: switching now would only reset the phase-1 weights."""
        total = trainer.estimated_stepping_batches
        return trainer.should_stop or (math.isfinite(total) and trainer.global_step >= total)

    # -- export -------------------------------------------------------------------------------------------------
    def default_export_path(self, trainer: pl.Trainer) -> str:
        root = trainer.log_dir or trainer.default_root_dir
        return os.path.join(root, "sparse_diff.safetensors")

    def sparse_diff_inputs(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(theta0, masks)`` for :func:`~lit_ft.core.sparse_diff.export_sparse_diff` (phase 2)."""
        if self.phase != 2:
            raise RuntimeError("LotteryTicketSparseFT: the sparse diff exists only in a sparse phase (phase 2).")
        masks = {n: m for n, m in self.masks.items() if bool(m.any())}
        theta0 = {n: self._theta0[n] for n in list(masks) + self.always_trained}
        if not self._theta0_compact:  # stopped before the last iteration's selection: θ₀ at the kept entries
            theta0.update({n: self._theta0[n].reshape(-1)[masks[n].reshape(-1).to(self._theta0[n].device)]
                           for n in masks})
        return theta0, masks

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.export:
            return
        if self.phase != 2:
            warnings.warn(
                "LotteryTicketSparseFT: training ended in phase 1 (the model holds the fully fine-tuned weights); no "
                "sparse diff was exported.", stacklevel=2,
            )
            return
        if not trainer.is_global_zero:
            return
        theta0, masks = self.sparse_diff_inputs()
        path = self.export_path or self.default_export_path(trainer)
        export_sparse_diff(
            pl_module, theta0, masks, path, diff_dtype=self.diff_dtype, module_prefix=_module_prefix(pl_module),
            metadata={"technique": "LT-SFT", "k": self.k, "kept": self.kept, "threshold": self.threshold,
                      "switch_step": self._switched_at, "always_train": self.always_trained,
                      "theta0_dtype": self.theta0_dtype, "iterations": self.iterations},
        )
        self.last_export_path = path

    # -- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {
            "version": 1,
            "phase": self.phase,
            "boundary_step": self.boundary_step,
            "switched_at": self._switched_at,
            "k": self.k,
            "threshold": self.threshold,
            "kept": self.kept,
            "num_maskable": self.num_maskable,
            "maskable": list(self.maskable),
            "always_trained": list(self.always_trained),
            "theta0": {n: t.detach().cpu() for n, t in self._theta0.items()},
            # several iterations (absent from checkpoints written before them: iteration 0, θ₀ compact in phase 2)
            "iteration": self.iteration,
            "iteration_starts": list(self.iteration_starts),
            "theta0_compact": self._theta0_compact,
            "first_switch_at": self._first_switch_at,
        }
        if self.masks:  # phase 2; or a later iteration's full phase: the entries selected so far
            sd["plan"] = ParamPlan(dict(self.masks), owner=type(self).__name__).state_dict()
        if self._snapshot:
            sd["snapshot"] = {n: t.detach().cpu() for n, t in self._snapshot.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(f"LotteryTicketSparseFT: unsupported state version {state_dict.get('version')!r}.")
        self._loaded = dict(state_dict)

    def _restore_theta0(self, t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """A saved θ₀ tensor placed and typed as this run's ``theta0_device`` / ``theta0_dtype`` say."""
        if self.theta0_dtype == "bfloat16" and t.is_floating_point():
            t = t.to(torch.bfloat16)
        return t.to("cpu" if self.theta0_device == "cpu" else param.device)

    def _restore_phase1(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sd: dict[str, Any],
                        params: Mapping[str, torch.Tensor]) -> None:
        """Phase 1: θ₀ comes from the checkpoint; K, the maskable / always-trained split and (when a phase-1
        argument changed) the boundary come from this run's arguments, as a fresh run would compute them."""
        self._start(trainer, pl_module, params, restoring=True)
        theta0 = sd["theta0"]
        expected = self.maskable + self.always_trained
        if set(theta0) != set(expected):
            missing, extra = sorted(set(expected) - set(theta0)), sorted(set(theta0) - set(expected))
            raise ValueError(
                "LotteryTicketSparseFT: the checkpoint's θ₀ does not cover this run's trainable tensors (the module "
                f"or its frozen parameters changed): missing {missing[:5]}, not trainable now {extra[:5]}."
            )
        self._theta0 = {n: self._restore_theta0(theta0[n], params[n]) for n in expected}
        saved_args = sd.get(ARGS_KEY) or {}
        if all(saved_args.get(a, getattr(self, a)) == getattr(self, a) for a in _PHASE1_ARGS):
            self.boundary_step = sd["boundary_step"]  # unchanged arguments: the boundary of the original run

    def _restore_masks(self, sd: dict[str, Any], params: Mapping[str, torch.Tensor]) -> None:
        plan = ParamPlan.from_state_dict(sd["plan"])
        self.masks = {}
        for n in self.maskable:
            e = plan.get(n)
            shape = params[n].shape
            if e is None or e.state == "trainable":
                self.masks[n] = torch.ones(shape, dtype=torch.bool)
            elif e.state == "frozen":
                self.masks[n] = torch.zeros(shape, dtype=torch.bool)
            else:
                self.masks[n] = e.mask.cpu()  # type: ignore[union-attr]

    def _restore(self, trainer: pl.Trainer, pl_module: pl.LightningModule, sd: dict[str, Any],
                 params: Mapping[str, torch.Tensor]) -> None:
        if int(sd["phase"]) == 1 and int(sd.get("iteration", 0)) == 0:
            self._restore_phase1(trainer, pl_module, sd, params)
            return
        # after the first selection every argument the state depends on is unchanged (resume_decisions refuse)
        self.iteration = int(sd.get("iteration", 0))
        self.iteration_starts = list(sd.get("iteration_starts", []))
        self._theta0_compact = bool(sd.get("theta0_compact", int(sd["phase"]) == 2))
        self._first_switch_at = sd.get("first_switch_at", sd["switched_at"])
        self.phase = int(sd["phase"])
        self.boundary_step = sd["boundary_step"]
        self._switched_at = sd["switched_at"]
        self.k, self.threshold, self.kept = sd["k"], sd["threshold"], int(sd["kept"])
        self.num_maskable = int(sd["num_maskable"])
        self.maskable, self.always_trained = list(sd["maskable"]), list(sd["always_trained"])
        missing = [n for n in self.maskable + self.always_trained if n not in params]
        if missing:
            raise ValueError(
                f"LotteryTicketSparseFT: the checkpoint names parameters this module does not have: {missing[:5]}."
            )
        self._theta0 = {n: self._restore_theta0(t, params[n]) for n, t in sd["theta0"].items()}
        self._snapshot = {n: self._restore_theta0(t, params[n]) for n, t in sd.get("snapshot", {}).items()}
        self._restore_masks(sd, params)
        if self.phase == 2:
            # recompose, apply and rebuild the optimizer groups as at the switch (the base then orders them like the
            # checkpoint's); Lightning restores the optimizer state (saved with the phase-2 groups) after on_fit_start
            self.update_plan(trainer, pl_module, self._phase2_plan(pl_module))
