"""GreenTrainer: adaptive backpropagation under a FLOPs budget (FLOPs-budgeted tensor selection).

Paper: Huang et al., "Towards Green AI in Fine-tuning Large Language Models via Adaptive Backpropagation"
(ICLR 2024); reference code ``pittisl/GreenTrainer`` (``decoder_lm/train.py``, ``tensor_selector.py``).

Algorithm (every ``interval`` epochs, on the first batch of the epoch):

1. **FLOPs model** (once, measured with :class:`torch.utils.flop_counter.FlopCounterMode` on that real batch, no
   per-architecture tables): the forward FLOPs ``t_fp``; per parameter tensor ``k`` (ordered output -> input) the
   weight-gradient FLOPs ``t_dw[k]`` and the activation-gradient FLOPs ``t_dy[k]`` that back-propagation must spend
   to reach ``k`` from the tensor before it. See :func:`profile_tensor_flops` for how they are measured.
2. **Importance** (probe step): snapshot the parameters and the optimizer state, take one real optimizer step on
   the batch with every candidate tensor trainable, record ``Δw``, forward/backward again at the new weights for
   ``g``, ``I_k = Σ g_k ⊙ Δw_k`` normalised by ``max |I|`` and negated (larger = more first-order loss reduction);
   then restore parameters and optimizer state exactly.
3. **Selection** (:func:`select_tensors_dp`): maximise ``Σ_{k∈S} I_k`` subject to
   ``Σ_{k∈S} t_dw[k] + Σ_{j ≤ deepest(S)} t_dy[j] ≤ ρ_bp · T_bp`` (back-propagation has to reach the deepest
   selected tensor), with costs quantised to ``quantization`` units; ``ρ`` (fraction of the full training-step
   FLOPs) becomes the backward budget ``ρ_bp = ρ(1 + t_fp/t_bp) − t_fp/t_bp`` (``0.05`` if that is ≤ 0).
4. Unselected tensors are frozen through the shared :class:`~lit_ft.core.params.ParamPlan` machinery (optimizer
   state of tensors that stay selected is kept, state of frozen ones dropped, newly selected ones start fresh).
"""

from __future__ import annotations


import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch

from lit_ft.callbacks._param_plan import ParamPlanCallback
from lit_ft.core.flops import (  # noqa: F401  (flop_counter, FlopsProfile, profile_tensor_flops: re-exported)
    FlopsProfile, flop_counter, profile_tensor_flops,
)
from lit_ft.core.step_probe import StepFlopsFraction, probe_loss, rng_devices
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_int, check_number
from lit_ft.core.optim import optimizer_defaults, optimizer_snapshot, rebuild_param_groups
from lit_ft.core.params import FROZEN, TRAINABLE, ParamPlan, ParamPlanConflict, compose
from lit_ft.core.loss import token_pipeline_for

__all__ = ["GreenTrainer", "FlopsProfile", "profile_tensor_flops", "select_tensors_dp", "backward_budget"]

#: ρ_bp used when the requested ρ is below the forward pass's share of the step (as in the reference code)
MIN_BACKWARD_RHO = 0.05


# ----------------------------------------------------------------------------------------------------------------
# Budget and selection
# ----------------------------------------------------------------------------------------------------------------


def backward_budget(rho: float, t_fp: float, t_bp: float) -> float:
    """Convert ``rho`` (target fraction of the full training-step FLOPs ``t_fp + t_bp``) into the fraction of the
    backward FLOPs ``t_bp`` that may be spent: ``ρ_bp = ρ(1 + t_fp/t_bp) − t_fp/t_bp``, ``MIN_BACKWARD_RHO`` (0.05)
    if that is not positive, at most 1."""
    if t_bp <= 0:
        return 1.0
    r = t_fp / t_bp
    rho_bp = rho * (1.0 + r) - r
    if rho_bp <= 0:
        rho_bp = MIN_BACKWARD_RHO
    return float(min(rho_bp, 1.0))


def selection_cost(t_dy: Sequence[float], t_dw: Sequence[float], selected: Sequence[bool]) -> float:
    """Backward cost of a selection (tensors ordered output -> input):
    ``Σ_{k∈S} t_dw[k] + Σ_{j ≤ max S} t_dy[j]``."""
    sel = np.asarray(selected, dtype=bool)
    if not sel.any():
        return 0.0
    deepest = int(np.flatnonzero(sel).max())
    dw = np.asarray(t_dw, dtype=np.float64)[sel]
    return float(np.sum(dw) + np.sum(np.asarray(t_dy, dtype=np.float64)[: deepest + 1]))


def select_tensors_dp(
    t_dy: Sequence[int], t_dw: Sequence[int], importance: Sequence[float], budget: int
) -> tuple[float, np.ndarray]:
    """Choose the tensors to train: maximise ``Σ_{k∈S} importance[k]`` subject to
    ``Σ_{k∈S} t_dw[k] + Σ_{j ≤ max S} t_dy[j] ≤ budget``, over non-empty ``S``.

    Tensors are ordered output -> input (index 0 is next to the loss); ``t_dy[j]`` is the activation-gradient
    cost of getting back-propagation from tensor ``j − 1`` to tensor ``j``. Selecting tensor ``k`` costs its own
    ``t_dw[k]`` plus ``Σ_{j ≤ k} t_dy[j]`` (back-propagation must reach it), paid once, for the deepest selected
    tensor (the reference code's ``selection_DP`` semantics).

    Exact dynamic programme in ``O(N · budget)`` time (vectorised over the budget axis with numpy): for each
    candidate deepest tensor ``d`` the rest is a 0/1 knapsack over the tensors above it with weights ``t_dw``,
    whose table is extended one tensor at a time (instead of the reference's ``O(N² · T)`` triple loop).

    Args:
        t_dy: non-negative integer activation-gradient costs (quantised).
        t_dw: non-negative integer weight-gradient costs (quantised).
        importance: importance of each tensor (any sign).
        budget: integer backward budget in the same units.

    Returns:
        ``(value, selected)``: the maximal total importance and a bool array. If no single tensor fits the
        budget, the cheapest tensor alone is returned (training needs at least one trainable tensor).
    """
    t_dy = np.asarray(t_dy, dtype=np.int64).reshape(-1)
    t_dw = np.asarray(t_dw, dtype=np.int64).reshape(-1)
    imp = np.asarray(importance, dtype=np.float64).reshape(-1)
    n = t_dy.shape[0]
    if t_dw.shape[0] != n or imp.shape[0] != n:
        raise ValueError(
            f"t_dy, t_dw and importance must have the same length, got {n}, {t_dw.shape[0]}, {imp.shape[0]}")
    if n and (t_dy.min() < 0 or t_dw.min() < 0):
        raise ValueError("t_dy and t_dw must be non-negative")
    if not np.all(np.isfinite(imp)):
        raise ValueError("importance must be finite")
    selected = np.zeros(n, dtype=bool)
    if n == 0:
        return 0.0, selected
    reach = np.cumsum(t_dy)  # reach[d]: t_dy paid when d is the deepest selected tensor
    b = int(budget)
    if b < 0:
        cost = reach + t_dw
        d = int(np.lexsort((-imp, cost))[0])
        selected[d] = True
        return float(imp[d]), selected
    knap = np.zeros(b + 1)  # best importance over tensors < d with Σ t_dw <= t
    take = np.zeros((n, b + 1), dtype=bool)
    best_val, best_d = -math.inf, -1
    for d in range(n):
        base = int(reach[d] + t_dw[d])
        if base <= b:
            v = imp[d] + knap[b - base]
            if v > best_val:
                best_val, best_d = float(v), d
        if reach[d] > b:  # deeper tensors cannot be reached; no need to extend the knapsack
            break
        w = int(t_dw[d])
        if w <= b:
            cand = np.full(b + 1, -math.inf)
            cand[w:] = knap[: b + 1 - w] + imp[d]
            better = cand > knap
            take[d] = better
            knap = np.where(better, cand, knap)
    if best_d < 0:
        cost = reach + t_dw
        d = int(np.lexsort((-imp, cost))[0])
        selected[d] = True
        return float(imp[d]), selected
    selected[best_d] = True
    r = b - int(reach[best_d] + t_dw[best_d])
    for i in range(best_d - 1, -1, -1):
        if take[i, r]:
            selected[i] = True
            r -= int(t_dw[i])
    return best_val, selected


def quantize_costs(
    t_dy: Sequence[float], t_dw: Sequence[float], units: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """Scale costs so that their total is ``units`` and round: ``t_dw`` per tensor, ``t_dy`` through its running sum
    (so the reach cost of every depth is within half a unit). Returns ``(t_dy_q, t_dw_q, scale)``."""
    t_dy = np.asarray(t_dy, dtype=np.float64)
    t_dw = np.asarray(t_dw, dtype=np.float64)
    total = float(t_dy.sum() + t_dw.sum())
    if total <= 0:
        return np.zeros(t_dy.shape, np.int64), np.zeros(t_dw.shape, np.int64), 0.0
    scale = units / total
    reach_q = np.rint(np.cumsum(t_dy) * scale).astype(np.int64)
    t_dy_q = np.diff(reach_q, prepend=0)
    t_dw_q = np.rint(t_dw * scale).astype(np.int64)
    return np.maximum(t_dy_q, 0), t_dw_q, scale


# ----------------------------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------------------------


@technique(name="green_trainer", family="tensor_selection",
           paper="Towards Green AI in Fine-tuning Large Language Models via Adaptive Backpropagation",
           arxiv="2309.13192")
class GreenTrainer(ParamPlanCallback):
    """GreenTrainer (Huang et al., ICLR 2024): train, each epoch, the parameter tensors that give the most loss
    reduction per FLOP, chosen by dynamic programming under a training-FLOPs budget (adaptive backpropagation).

    Every ``interval`` epochs, on the first training batch of the epoch (the probe batch):

    1. the first time, a FLOPs model is measured on that batch with ``FlopCounterMode`` (forward FLOPs, and per
       tensor ordered output -> input the weight-gradient FLOPs ``t_dw`` and the activation-gradient FLOPs
       needed to reach it; see :func:`profile_tensor_flops`);
    2. importance: parameters and optimizer state are snapshotted, one real optimizer step is taken on the batch
       with every candidate tensor trainable (``Δw``), the gradient ``g`` at the new weights is computed,
       ``I_k = −Σ g_k ⊙ Δw_k / max|I|``, and parameters and optimizer state are restored bit-exactly;
    3. :func:`select_tensors_dp` picks the tensors maximising ``Σ I_k`` within the backward budget
       ``ρ_bp = ρ(1 + t_fp/t_bp) − t_fp/t_bp`` (≥ 0.05) of the full backward FLOPs;
    4. unselected tensors are frozen (``requires_grad=False``, dropped from the optimizer); tensors that stay
       selected keep their optimizer state, newly selected ones start fresh.

    Candidates are the tensors the other parameter callbacks and the user's module leave trainable (a PEFT
    model's LoRA tensors, for example); tensors another plan *requires* are always selected (a budget too small
    for them raises :class:`~lit_ft.core.params.ParamPlanConflict`). Under DDP the FLOPs model is measured on
    every rank (the probe's token scorers may communicate) and rank 0's is broadcast, importance is averaged over
    ranks, and rank 0's selection is broadcast, so every rank trains the same tensors; use
    ``strategy="ddp_find_unused_parameters_true"`` (frozen tensors get no gradient).
    FSDP / DeepSpeed (sharded parameters) are not supported.

    Every ``measure_every_n_steps`` steps the real training step (``training_step`` forward + backward) is run
    under ``FlopCounterMode``, and so is a full-backprop forward+backward of the same batch (gradients discarded),
    giving the *measured* FLOPs fraction (``measured_flops_fraction``, ``measured_flops_saved``).

    Args:
        rho: target fraction of the full-backprop training-step FLOPs (forward + backward), in (0, 1]. The
            paper uses 0.4, 0.5 and 0.7.
        interval: re-select every this many epochs (>= 1; the paper: 2).
        quantization: number of integer cost units the DP works in (>= 10; the paper: 1000). Larger = finer and
            slower (time and memory are O(number of tensors × quantization)).
        measure_every_n_steps: measure the real step's FLOPs against full backprop every this many optimizer
            steps (0 = never). Costs one extra forward+backward and FlopCounterMode overhead on those steps.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    #: GreenTrainer measures on its own schedule (``measure_every_n_steps``), probing before the step
    flops_every_n_steps = 0

    technique_name = "green_trainer"
    #: its probes run training_step at on_train_batch_start: token callbacks that prepare the batch there must be
    #: listed before it (checked by lit_ft.core.loss.batch_order when a token participant attaches)
    batch_start_runs_step = True

    def __init__(
        self,
        rho: float = 0.5,
        interval: int = 2,
        quantization: int = 1000,
        measure_every_n_steps: int = 50,
        picture_every_n_steps: int = 0,
    ) -> None:
        super().__init__(picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        check_number(owner, "rho", rho, low=0, high=1, low_open=True)  # fraction of full training FLOPs
        check_int(owner, "interval", interval, minimum=1)
        check_int(owner, "quantization", quantization, minimum=10)
        check_int(owner, "measure_every_n_steps", measure_every_n_steps, minimum=0)
        self.rho = float(rho)
        self.interval = interval
        self.quantization = quantization
        self.measure_every_n_steps = measure_every_n_steps

        #: measured FLOPs model (set at the first selection, restored from checkpoints)
        self.profile: Optional[FlopsProfile] = None
        #: names of the selected tensors (``None`` before the first selection)
        self.last_selection: Optional[list[str]] = None
        #: candidate name -> normalised importance (larger = more loss reduction) of the last selection
        self.last_importance: dict[str, float] = {}
        self.last_selection_epoch: int = -1
        self.n_selections: int = 0
        self.rho_bp: Optional[float] = None
        self.selected_tensor_fraction: Optional[float] = None
        self.selected_param_fraction: Optional[float] = None
        #: model estimate: selected backward FLOPs / full backward FLOPs
        self.est_backward_flops_fraction: Optional[float] = None
        #: model estimate: (forward + selected backward) / (forward + full backward)
        self.est_flops_fraction: Optional[float] = None
        #: measured: FLOPs of the real step / FLOPs of a full-backprop step on the same batch (last measurement)
        #: every measurement as (global_step, step FLOPs, full-backprop FLOPs)

        self._trainer: Optional[pl.Trainer] = None
        self._module: Optional[pl.LightningModule] = None
        self._pending_apply = False
        self._flops = StepFlopsFraction(self.technique_name)
        self._local_importance: Optional[np.ndarray] = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(rho=self.rho, interval=self.interval)

    # -- lifecycle --------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._trainer, self._module = trainer, pl_module
            self._check_strategy(trainer)
            if not pl_module.automatic_optimization:
                raise ValueError(
                    "GreenTrainer needs automatic optimization (the probe step computes the loss with training_step "
                    "and steps the module's optimizer); set `self.automatic_optimization = True`."
                )
        super().setup(trainer, pl_module, stage)

    @staticmethod
    def _check_strategy(trainer: pl.Trainer) -> None:
        from lit_ft.core.strategy import refuse_sharded_strategies, require_unused_parameter_tolerance

        # ModelParallelStrategy (FSDP2) too: its name has no "FSDP", and the FLOPs model finds tied weights by
        # storage pointers, which sharded tensors do not have
        refuse_sharded_strategies(trainer, "GreenTrainer", "it needs whole parameter tensors to probe and freeze")
        require_unused_parameter_tolerance(trainer, "GreenTrainer", "freezes tensors mid-run")

    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[ParamPlan]:
        # every candidate stays trainable until the first selection: the optimizer (and a DDP reducer) then know
        # every tensor a later selection may unfreeze
        return None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._pending_apply and self.last_selection is not None:
            self._pending_apply = False
            self._apply_selection(trainer, pl_module, self.last_selection, self._candidates(pl_module)[0])
        # the base re-applies the checkpointed optimizer layout (shared by every parameter technique)
        super().on_fit_start(trainer, pl_module)

    # -- selection --------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        epoch = trainer.current_epoch
        if self.last_selection is None or (epoch % self.interval == 0 and self.last_selection_epoch != epoch):
            self.reselect(trainer, pl_module, batch)
        if self._flops.due(trainer, pl_module, self.measure_every_n_steps):
            # the full step: every candidate trainable (what plain fine-tuning of them costs)
            self._flops.start(trainer, pl_module, batch, self._candidates(pl_module)[0])

    def _candidates(self, pl_module: pl.LightningModule) -> tuple[list[str], set[str], ParamPlan]:
        """(candidate names, names another plan requires, the composition of every other plan with the baseline)."""
        reg = self.registry(pl_module)
        others = [p for k, p in reg.plans.items() if k != self.plan_key]
        base = compose([reg.baseline, *others], owner="lit_ft")
        cands, required = [], set()
        for n, p in pl_module.named_parameters():
            e = base.get(n)
            if not p.is_floating_point() or (e is not None and not e.trainable):
                continue
            cands.append(n)
            if e is not None and e.required:
                required.add(n)
        return cands, required, base

    def _loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> torch.Tensor:
        return probe_loss(trainer, pl_module, batch, "GreenTrainer")

    def reselect(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> list[str]:
        """Profile (first time), probe importance on ``batch``, run the DP and apply the selection. Returns the
        selected names (identical on every rank)."""
        candidates, required, base = self._candidates(pl_module)
        if not candidates:
            raise ValueError(
                "GreenTrainer: no candidate tensor is trainable (the module and the other parameter callbacks froze "
                "everything), so there is nothing to select."
            )
        strategy = trainer.strategy
        by_name = dict(pl_module.named_parameters())
        with torch.random.fork_rng(devices=rng_devices(pl_module)):
            if self.profile is None:
                # measured on every rank, rank 0's kept: the probe runs the module's training_step, whose token
                # scorers may communicate (ExcessLossSelection's global top-k, QTuning's triage all-gather); a probe
                # on rank 0 alone would wait in their collectives while the other ranks wait in the broadcast
                def loss_fn() -> torch.Tensor:
                    return self._loss(trainer, pl_module, batch)

                measured = profile_tensor_flops(pl_module, loss_fn)
                measured.batch_shape = list(batch["input_ids"].shape) if isinstance(batch, Mapping) and \
                    isinstance(batch.get("input_ids"), torch.Tensor) else []
                prof = strategy.broadcast(measured.state_dict(), src=0)
                self.profile = FlopsProfile.from_state_dict(prof)
            raw = self.probe_importance(trainer, pl_module, batch, candidates, base)
        self._local_importance = raw.copy()
        raw_t = torch.as_tensor(raw, dtype=torch.float64, device=pl_module.device)
        raw = strategy.reduce(raw_t, reduce_op="mean").detach().cpu().numpy()
        scale = float(np.abs(raw).max()) if raw.size else 0.0
        imp = -raw / scale if scale > 0 else np.zeros_like(raw)
        importance = dict(zip(candidates, imp.tolist()))

        names, t_dy, t_dw = self.profile.restricted(candidates)
        # candidates the profile never saw (no gradient) are free and useless: they stay out unless required
        dp_imp = np.array([importance.get(n, 0.0) for n in names])
        bonus = float(len(names) + 1)
        dp_imp = dp_imp + np.array([bonus if n in required else 0.0 for n in names])
        t_bp = float(t_dy.sum() + t_dw.sum())
        self.rho_bp = backward_budget(self.rho, self.profile.t_fp, t_bp)
        t_dy_q, t_dw_q, _ = quantize_costs(t_dy, t_dw, self.quantization)
        budget = int(math.floor(self.rho_bp * self.quantization + 1e-9))
        _, sel = select_tensors_dp(t_dy_q, t_dw_q, dp_imp, budget)
        selected = [n for n, s in zip(names, sel) if s]
        selected = strategy.broadcast(selected, src=0)

        sel_mask = np.array([n in set(selected) for n in names], dtype=bool)
        sel_bwd = selection_cost(t_dy, t_dw, sel_mask)
        self.est_backward_flops_fraction = sel_bwd / t_bp if t_bp > 0 else 1.0
        denom = self.profile.t_fp + t_bp
        self.est_flops_fraction = (self.profile.t_fp + sel_bwd) / denom if denom > 0 else 1.0
        self.selected_tensor_fraction = len(selected) / len(candidates)
        numel = {n: by_name[n].numel() for n in candidates}
        self.selected_param_fraction = sum(numel[n] for n in selected) / max(1, sum(numel.values()))
        self.last_importance = importance
        self.last_selection = list(selected)
        self.last_selection_epoch = trainer.current_epoch
        self.n_selections += 1
        self._apply_selection(trainer, pl_module, selected, candidates)
        return selected

    def _apply_selection(self, trainer: pl.Trainer, pl_module: pl.LightningModule, selected: Sequence[str],
                         candidates: Sequence[str]) -> None:
        sel = set(selected)
        unknown = sel - set(candidates)
        if unknown:
            raise ValueError(
                f"GreenTrainer: the restored selection names tensors that are not trainable candidates of this "
                f"module: {sorted(unknown)[:4]}. Was the checkpoint made with a different model or callbacks?"
            )
        plan = ParamPlan({n: (TRAINABLE if n in sel else FROZEN) for n in candidates}, owner="GreenTrainer")
        try:
            self.update_plan(trainer, pl_module, plan)
        except ParamPlanConflict as e:
            raise ParamPlanConflict(
                f"{e} GreenTrainer could not fit every tensor another callback requires into its FLOPs budget "
                f"(rho={self.rho}); raise `rho`.", e.name, e.required_by, e.restricted_by,
            ) from e

    # -- importance probe -------------------------------------------------------------------------------------------
    def probe_importance(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                         candidates: Sequence[str], base: Optional[ParamPlan] = None) -> np.ndarray:
        """Raw ``Σ g_k ⊙ Δw_k`` per candidate (not normalised, not negated) from one real optimizer step on
        ``batch``; parameters, gradients, ``requires_grad`` and the optimizer's state and param groups are restored
        exactly afterwards."""
        if not trainer.optimizers:
            raise RuntimeError("GreenTrainer: the trainer has no optimizer yet; the probe needs the real optimizer.")
        opt = trainer.optimizers[0]
        opt = getattr(opt, "_optimizer", opt)
        if base is None:
            base = self._candidates(pl_module)[2]
        named = dict(pl_module.named_parameters())
        cand = [named[n] for n in candidates]
        all_params = list(named.items())
        saved_rg = {n: p.requires_grad for n, p in all_params}
        saved_grad = {n: p.grad for n, p in all_params}
        saved_w = [p.detach().clone() for p in cand]
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        masks = {n: base[n].mask for n in candidates if n in base and base[n].mask is not None}

        def backward() -> None:
            # autograd.grad, not loss.backward(): a DDP reducer (find_unused_parameters) would otherwise mark the
            # probe's tensors as used in the next real step
            for p in named.values():
                p.grad = None
            pipe = token_pipeline_for(pl_module, create=False)
            forwards = pipe.training_forwards if pipe is not None else 0
            with torch.enable_grad():
                loss = self._loss(trainer, pl_module, batch)
                grads = torch.autograd.grad(loss, cand, allow_unused=True)
            for p, g in zip(cand, grads):
                p.grad = g
            if pipe is not None and pipe.training_forwards > forwards:
                # the loss went through lit_ft's token-loss engine, whose gradient is scaled for a real step (x the
                # accumulation factor and the world size, which Lightning and DDP divide out): undo that here
                world = int(getattr(trainer, "world_size", 1) or 1)
                for p in cand:
                    if p.grad is not None:
                        p.grad.div_(accumulate * world)

        # the optimizer's state (moments, step counters) and param groups come back exactly with the snapshot;
        # parameters, gradients and requires_grad are restored here
        with optimizer_snapshot(opt):
            try:
                probe_plan = ParamPlan({n: TRAINABLE for n in candidates}, owner="GreenTrainer (probe)")
                lr, wd = optimizer_defaults(opt)
                rebuild_param_groups(opt, pl_module, compose([base, probe_plan]), lr, wd, apply=True)
                backward()
                for n, p in zip(candidates, cand):
                    if n in masks and p.grad is not None:
                        p.grad.mul_(masks[n].to(p.grad.device, p.grad.dtype))
                opt.step()
                with torch.no_grad():
                    dw = torch._foreach_sub([p.detach() for p in cand], saved_w)
                    for i, n in enumerate(candidates):
                        if n in masks:
                            dw[i].mul_(masks[n].to(dw[i].device, dw[i].dtype))
                backward()
                with torch.no_grad():
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in cand]
                    prods = torch._foreach_mul([g.float() for g in grads], [d.float() for d in dw])
                    sums = [x.sum(dtype=torch.float64) for x in prods]
                    raw = torch.stack(sums).cpu().numpy() if prods else np.zeros(0)
            finally:
                with torch.no_grad():
                    for p, w in zip(cand, saved_w):
                        p.copy_(w)
                for n, p in all_params:
                    p.requires_grad_(saved_rg[n])
                    p.grad = saved_grad[n]
        return np.nan_to_num(raw.astype(np.float64))

    # -- measured FLOPs (lit_ft.core.step_probe.StepFlopsFraction) ------------------------------------------------
    @property
    def measured_flops_fraction(self) -> Optional[float]:
        return self._flops.fraction

    @property
    def measured_flops_saved(self) -> Optional[float]:
        return None if self._flops.fraction is None else 1.0 - self._flops.fraction

    @property
    def measurements(self) -> list[tuple[int, float, float]]:
        """(global step, real-step FLOPs, full-step FLOPs) of every measurement."""
        return self._flops.measurements

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flops.after_backward(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        measured = self._flops.batch_end(pl_module)  # logs lit_ft/green_trainer/flops_fraction when new
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        log = lambda k, v: pl_module.log(f"lit_ft/{self.technique_name}/{k}", float(v), on_step=True,  # noqa: E731
                                         on_epoch=False, batch_size=1)
        if self.last_selection is not None and self.selected_tensor_fraction is not None:
            log("selected_tensor_fraction", self.selected_tensor_fraction)
            log("selected_param_fraction", self.selected_param_fraction)
            log("est_backward_flops_fraction", self.est_backward_flops_fraction)
            log("est_flops_fraction", self.est_flops_fraction)
            log("rho_bp", self.rho_bp)
            log("selections", self.n_selections)
        if measured:
            log("measured_flops_fraction", self.measured_flops_fraction)
            log("measured_flops_saved", self.measured_flops_saved)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._flops.abort()

    # -- state ------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "rho": self.rho,
            "interval": self.interval,
            "quantization": self.quantization,
            "last_selection_epoch": self.last_selection_epoch,
            "n_selections": self.n_selections,
            "selection": None if self.last_selection is None else list(self.last_selection),
            "importance": dict(self.last_importance),
            "profile": None if self.profile is None else self.profile.state_dict(),
            "rho_bp": self.rho_bp,
            "fractions": {
                "selected_tensor_fraction": self.selected_tensor_fraction,
                "selected_param_fraction": self.selected_param_fraction,
                "est_backward_flops_fraction": self.est_backward_flops_fraction,
                "est_flops_fraction": self.est_flops_fraction,
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != 1:
            raise ValueError(f"GreenTrainer: unknown checkpoint state version {state_dict.get('version')!r}.")
        for key in ("rho", "interval", "quantization"):
            if state_dict[key] != getattr(self, key):
                warnings.warn(
                    f"GreenTrainer: the checkpoint was made with {key}={state_dict[key]!r}, this callback has "
                    f"{key}={getattr(self, key)!r}; resuming with the checkpoint's value.", stacklevel=2)
                setattr(self, key, state_dict[key])
        self.last_selection_epoch = int(state_dict["last_selection_epoch"])
        self.n_selections = int(state_dict["n_selections"])
        sel = state_dict["selection"]
        self.last_selection = None if sel is None else list(sel)
        self.last_importance = dict(state_dict.get("importance") or {})
        prof = state_dict.get("profile")
        self.profile = None if prof is None else FlopsProfile.from_state_dict(prof)
        self.rho_bp = state_dict.get("rho_bp")
        for k, v in (state_dict.get("fractions") or {}).items():
            setattr(self, k, v)
        self._pending_apply = self.last_selection is not None
