"""Keeping LR schedulers in step with an optimizer whose param groups changed after the schedulers were built.

A scheduler keeps per-group state (``base_lrs``, per-group lambdas, OneCycle's ``max_lrs``/``min_lrs``) by group
*position*. After a regrouping (layer-wise LR decay, per-technique learning rates, a restored checkpoint layout,
an unfreeze that appends a group) :func:`sync_schedulers` re-maps that state to the new groups.
:func:`restart_schedulers` puts them back at step 0, as if freshly built (a technique whose second phase is a new
training run, e.g. LT-SFT's sparse phase).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import torch
from torch.optim import lr_scheduler as _lrs

from lit_ft.core.optim.unwrap import unwrap_optimizer

if TYPE_CHECKING:  # only for the annotation: lit_ft.core does not import Lightning at runtime
    import lightning.pytorch as pl

__all__ = ["SUPPORTED_SCHEDULERS", "restart_schedulers", "sync_schedulers"]

#: schedulers whose per-group state is ``base_lrs`` (from the groups' ``initial_lr``) and the lists handled below
SUPPORTED_SCHEDULERS = (
    _lrs.LambdaLR, _lrs.MultiplicativeLR, _lrs.StepLR, _lrs.MultiStepLR, _lrs.ConstantLR, _lrs.LinearLR,
    _lrs.ExponentialLR, _lrs.PolynomialLR, _lrs.CosineAnnealingLR, _lrs.CosineAnnealingWarmRestarts, _lrs.CyclicLR,
    _lrs.OneCycleLR, _lrs.ReduceLROnPlateau, _lrs.SequentialLR, _lrs.ChainedScheduler,
)


def _remap(values: list, origin: Optional[list[int]], n: int, what: str, owner: str,
           scale: Optional[list[float]] = None) -> list:
    """Per-group list of a scheduler mapped to the new groups: new group k takes entry ``origin[k]`` (times
    ``scale[k]``); groups the scheduler never knew (``origin`` None or out of range) take the common entry."""
    out = []
    for k in range(n):
        j = origin[k] if origin is not None else k
        if j is None or j >= len(values):
            if len({id(v) if callable(v) else v for v in values}) > 1:
                raise ValueError(
                    f"{owner}: the LR scheduler's per-group `{what}` differ between groups and a new param group has "
                    f"no counterpart; use one {what[:-1]} for all groups, or build the groups in configure_optimizers."
                )
            j = 0
        v = values[j]
        out.append(v * scale[k] if scale is not None and not callable(v) else v)
    return out


def _sync_one(s: Any, opt: torch.optim.Optimizer, origin: Optional[list[int]], scale: Optional[list[float]],
              owner: str) -> None:
    if not isinstance(s, SUPPORTED_SCHEDULERS):
        raise TypeError(
            f"{owner}: cannot re-map the LR scheduler {type(s).__name__} to new param groups (it keeps per-group state "
            f"{owner} does not know). Supported: {sorted({c.__name__ for c in SUPPORTED_SCHEDULERS})}. Build the "
            f"param groups in configure_optimizers instead, or use a supported scheduler (transformers' schedulers "
            f"are LambdaLR)."
        )
    groups = opt.param_groups
    n = len(groups)
    if isinstance(s, (_lrs.SequentialLR, _lrs.ChainedScheduler)):
        for child in s._schedulers:
            _sync_one(child, opt, origin, scale, owner)
    if hasattr(s, "lr_lambdas"):
        s.lr_lambdas = _remap(list(s.lr_lambdas), origin, n, "lr_lambdas", owner)
    if hasattr(s, "max_lrs"):
        s.max_lrs = _remap(list(s.max_lrs), origin, n, "max_lrs", owner, scale)
    if hasattr(s, "min_lrs"):
        s.min_lrs = _remap(list(s.min_lrs), origin, n, "min_lrs", owner)
    if hasattr(s, "base_lrs"):
        s.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
    s._last_lr = [g["lr"] for g in groups]


def sync_schedulers(
    trainer: "pl.Trainer", optimizer: Any, origin: Optional[list[int]] = None, scale: Optional[list[float]] = None,
    owner: str = "LayerwiseLRDecay",
) -> int:
    """Bring every LR scheduler of ``optimizer`` in line with its (changed) param groups: ``base_lrs`` from the
    groups' ``initial_lr``, per-group lists (``lr_lambdas``, ``max_lrs``, ``min_lrs``) re-mapped with ``origin``
    (new group -> old group index, ``None`` = same index) and ``scale``. Returns how many schedulers were synced.

    Raises:
        TypeError: a scheduler type whose per-group state is unknown (custom ``LRScheduler`` subclasses).
    """
    opt = unwrap_optimizer(optimizer)
    count = 0
    for cfg in trainer.lr_scheduler_configs:
        s = cfg.scheduler
        s_opt = getattr(s, "optimizer", None)
        if s_opt is None or unwrap_optimizer(s_opt) is opt:
            _sync_one(s, opt, origin, scale, owner)
            count += 1
    return count


def _check_supported(s: Any, owner: str, what: str) -> None:
    if not isinstance(s, SUPPORTED_SCHEDULERS):
        raise TypeError(
            f"{owner}: cannot {what} the LR scheduler {type(s).__name__} (it keeps state {owner} does not know). "
            f"Supported: {sorted({c.__name__ for c in SUPPORTED_SCHEDULERS})} (transformers' schedulers are LambdaLR)."
        )


def _initial_lrs(opt: torch.optim.Optimizer) -> None:
    """Every group's ``lr`` back to its ``initial_lr`` (the base rate a scheduler starts from)."""
    for g in opt.param_groups:
        if "initial_lr" in g:
            g["lr"] = g["initial_lr"]


def _restart_one(s: Any, opt: torch.optim.Optimizer, owner: str) -> None:
    _check_supported(s, owner, "restart")
    if isinstance(s, _lrs.ReduceLROnPlateau):
        s._reset()  # its counters; it has no schedule position
        _initial_lrs(opt)
        return
    _initial_lrs(opt)
    if isinstance(s, _lrs.SequentialLR):
        # as its constructor: every child "before its first step", then only the first one takes its initial step
        for child in s._schedulers:
            _check_supported(child, owner, "restart")
            child.last_epoch = -1
        s.last_epoch = 0
        s._schedulers[0]._initial_step()
        s._last_lr = s._schedulers[0].get_last_lr()
        return
    if isinstance(s, _lrs.ChainedScheduler):
        # as built: each child takes its initial step in order (chainable ones multiply the rate they find)
        for child in s._schedulers:
            _check_supported(child, owner, "restart")
            child.last_epoch = -1
            child._initial_step()
        s._last_lr = [g["lr"] for g in opt.param_groups]
        return
    s.last_epoch = -1  # CosineAnnealingWarmRestarts recomputes its cycle from epoch 0 when last_epoch < 0
    s._initial_step()


def restart_schedulers(trainer: "pl.Trainer", optimizer: Any, owner: str = "restart_schedulers") -> int:
    """Put every LR scheduler of ``optimizer`` back at step 0, as freshly built over the optimizer's current groups:
    each group's ``lr`` returns to its ``initial_lr``, the schedule position to 0 and the scheduler takes its initial
    step (a warm-up starts again; OneCycle / cosine start a new cycle over their configured length). Call it after
    the scheduler's last step of the old phase (e.g. from ``on_train_batch_end``); the next optimizer step then runs
    at the schedule's step-0 rate. ``ReduceLROnPlateau`` has no position: its counters are reset. Returns how many
    schedulers were restarted.

    The schedule's *length* is the one it was built with (for a run-long schedule, the rest of the run covers only
    the start of it): a scheduler built over one phase's steps restarts exactly like the reference's fresh one.

    Raises:
        TypeError: a scheduler type whose state is unknown (custom ``LRScheduler`` subclasses).
    """
    opt = unwrap_optimizer(optimizer)
    count = 0
    for cfg in trainer.lr_scheduler_configs:
        s = cfg.scheduler
        s_opt = getattr(s, "optimizer", None)
        if s_opt is None or unwrap_optimizer(s_opt) is opt:
            _restart_one(s, opt, owner)
            count += 1
    return count
