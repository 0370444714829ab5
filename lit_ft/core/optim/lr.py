"""Learning rates after a resume: re-apply the run's configured learning rates over the checkpoint's.

Lightning restores the optimizer with ``optimizer.load_state_dict``, which also restores every param group's
hyper-parameters (``lr``, ``initial_lr``) and each LR scheduler's ``base_lrs``: a run resumed with a changed learning
rate silently trains with the checkpoint's. :func:`configured_learning_rates` records, per parameter, the learning
rate this run configured (before the restore); :func:`reapply_learning_rates` (after the restore) rescales every
group whose checkpointed base learning rate differs, keeping the schedule's position: ``lr ← lr · new/old``,
``initial_lr ← new`` and the schedulers' per-group ``base_lrs`` / ``max_lrs`` / ``min_lrs`` scaled alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from lit_ft.core.optim.unwrap import unwrap_optimizer

__all__ = ["configured_learning_rates", "reapply_learning_rates"]


def _base_lr(group: Mapping[str, Any]) -> float:
    """A group's base learning rate: its ``initial_lr`` when a scheduler set one, else its ``lr``."""
    return float(group.get("initial_lr", group["lr"]))


def configured_learning_rates(optimizer: Any) -> dict[int, float]:
    """``id(param) -> base learning rate`` of ``optimizer``'s groups as configured now (call before the restore)."""
    opt = unwrap_optimizer(optimizer)
    return {id(p): _base_lr(g) for g in opt.param_groups for p in g["params"]}


def reapply_learning_rates(
    optimizer: Any, configured: Mapping[int, float], schedulers: Iterable[Any] = (), rel_tol: float = 1e-12,
) -> list[tuple[int, float, float]]:
    """Give every group of ``optimizer`` the base learning rate ``configured`` records for its tensors, keeping the
    schedule's position.

    Args:
        optimizer: the optimizer after Lightning restored its state (a ``LightningOptimizer`` is accepted).
        configured: :func:`configured_learning_rates` of the same optimizer, taken before the restore.
        schedulers: the LR schedulers of ``optimizer``; their per-group ``base_lrs`` (and OneCycle's ``max_lrs`` /
            ``min_lrs``, CosineAnnealing's ``eta_min`` is a single value and is left) are scaled with the group.
        rel_tol: relative difference below which a group is left as it is.

    Returns:
        ``(group index, checkpoint base lr, configured base lr)`` of each group changed.

    Raises:
        ValueError: a group holds tensors configured with different learning rates (the groups were rearranged in
            a way this function cannot map back); the message names the group.
    """
    opt = unwrap_optimizer(optimizer)
    scheds = [s for s in schedulers if getattr(s, "optimizer", None) is opt]
    changed: list[tuple[int, float, float]] = []
    for i, g in enumerate(opt.param_groups):
        lrs = {configured[id(p)] for p in g["params"] if id(p) in configured}
        if not lrs:
            continue  # a group this run did not configure (added by a technique after the capture): left as is
        if len(lrs) > 1:
            raise ValueError(
                f"reapply_learning_rates: param group {i} holds tensors configured with different learning rates "
                f"{sorted(lrs)}; cannot choose one."
            )
        new = lrs.pop()
        old = _base_lr(g)
        if math.isclose(old, new, rel_tol=rel_tol, abs_tol=0.0):
            continue
        scale = new / old if old else None
        g["lr"] = g["lr"] * scale if scale is not None else new
        if "initial_lr" in g:
            g["initial_lr"] = new
        for key in ("max_lr", "min_lr"):  # OneCycleLR keeps its per-group bounds in the group
            if scale is not None and isinstance(g.get(key), (int, float)):
                g[key] = g[key] * scale
        for s in scheds:
            for attr in ("base_lrs", "max_lrs", "min_lrs"):
                values = getattr(s, attr, None)
                if isinstance(values, list) and i < len(values):
                    values[i] = values[i] * scale if scale is not None else new
            last = getattr(s, "_last_lr", None)
            if isinstance(last, list) and i < len(last):
                last[i] = g["lr"]
        changed.append((i, old, new))
    return changed
