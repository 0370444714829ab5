"""Optimizer param groups by parameter name: build them from a plan, bring them in line with a changed plan mid-run
(state kept, reset or dropped per tensor, never stale or duplicated), and check them.

Groups carry ``param_names`` and a ``group_id`` naming their (lr, weight decay) class, so a later rebuild finds
the group a newly trainable tensor belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lit_ft.core.optim.unwrap import unwrap_optimizer
from lit_ft.core.params.apply import apply_plan, trainable_names
from lit_ft.core.params.patterns import ParamIndex, param_index, select_in_index
from lit_ft.core.params.plans import ParamPlan, check_plan

__all__ = [
    "DEFAULT_NO_DECAY_PATTERNS", "RebuildReport", "param_group_id", "build_param_groups", "rebuild_param_groups",
    "verify_optimizer", "optimizer_defaults",
]

#: Default ``no_decay_patterns`` of :func:`build_param_groups`: biases and normalisation weights (HF-style names such
#: as ``input_layernorm.weight``, ``model.norm.weight``, ``LayerNorm.weight``). Embeddings are decayed, as in the
#: HF ``Trainer``; add ``"*embed_tokens*"`` to exclude them.
DEFAULT_NO_DECAY_PATTERNS: tuple[str, ...] = ("*bias", "*norm*", "*Norm*")


def _check_number(value: Any, argname: str, allow_zero: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{argname}` must be a number, got {value!r}.")
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"`{argname}` must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    return v


def _lookup_table(
    index: ParamIndex, table: Optional[Mapping[str, float]], argname: str
) -> list[tuple[Any, float, str]]:
    """Validate an lr table; return ``[(predicate over canonical names, value, key)]`` with exact names first."""
    if table is None:
        return []
    if not isinstance(table, Mapping):
        raise TypeError(f"`{argname}` must be a mapping name-or-pattern -> number, got {type(table).__name__}.")
    exact: list[tuple[Any, float, str]] = []
    pats: list[tuple[Any, float, str]] = []
    for key, value in table.items():
        v = _check_number(value, f"{argname}[{key!r}]")
        names = set(select_in_index(index, [key], argname=argname))
        pred = (lambda n, s=names: n in s)
        (exact if (key in index.alias and not key.startswith("re:")) else pats).append((pred, v, key))
    return exact + pats


def _first(table: list[tuple[Any, float, str]], name: str) -> Optional[float]:
    for pred, v, _ in table:
        if pred(name):
            return v
    return None


def param_group_id(lr: float, wd: float) -> str:
    """The ``group_id`` of a param group of the (lr, weight decay) class, as :func:`build_param_groups` sets it and
    :func:`rebuild_param_groups` looks it up (set it on groups you split or make, so rebuilds find them again)."""
    return f"lr={lr!r},weight_decay={wd!r}"




def build_param_groups(
    model: nn.Module,
    plan: Optional[ParamPlan],
    base_lr: float,
    weight_decay: float,
    lr_overrides: Optional[Mapping[str, float]] = None,
    no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS,
    lr_multipliers: Optional[Mapping[str, float]] = None,
) -> list[dict[str, Any]]:
    """Param groups for a ``torch.optim`` optimizer, containing only the trainable tensors, split by lr and by
    decay / no-decay.

    A tensor is included if ``plan`` marks it trainable or masked, or if the plan does not name it (or ``plan`` is
    ``None``) and it has ``requires_grad=True``. Its lr is ``base_lr``, replaced by the first matching
    ``lr_overrides`` value (absolute lr) and then multiplied by the first matching ``lr_multipliers`` value
    (layer-wise LR decay); in both tables exact names take precedence over patterns, and patterns are tried in
    insertion order. Its weight decay is 0 if its name matches ``no_decay_patterns``, else ``weight_decay``.

    Args:
        model: the module whose parameters are grouped.
        plan: the plan deciding trainability, or ``None`` to use ``requires_grad``.
        base_lr: default learning rate (>= 0).
        weight_decay: weight decay of decayed tensors (>= 0).
        lr_overrides: name or pattern -> absolute learning rate. Each key must match a parameter.
        no_decay_patterns: globs/regexes of tensors without weight decay (need not match anything).
        lr_multipliers: name or pattern -> factor applied to the tensor's lr. Each key must match a parameter.

    Returns:
        ``[{"params": [...], "param_names": [...], "lr": float, "weight_decay": float, "group_id": str}]`` ordered
        by first appearance in ``model.named_parameters()``; ``group_id`` identifies the (lr, weight decay) class so
        :func:`rebuild_param_groups` can find a group again.
    """
    base_lr = _check_number(base_lr, "base_lr")
    weight_decay = _check_number(weight_decay, "weight_decay")
    if plan is not None:
        check_plan(plan)
    index = param_index(model)
    over = _lookup_table(index, lr_overrides, "lr_overrides")
    mult = _lookup_table(index, lr_multipliers, "lr_multipliers")
    no_decay = set(select_in_index(index, no_decay_patterns, argname="no_decay_patterns", allow_unmatched=True))
    groups: dict[str, dict[str, Any]] = {}
    for name in trainable_names(index, plan):
        lr = _first(over, name)
        lr = base_lr if lr is None else lr
        m = _first(mult, name)
        lr = lr * m if m is not None else lr
        wd = 0.0 if name in no_decay else weight_decay
        gid = param_group_id(lr, wd)
        g = groups.setdefault(gid, {"params": [], "param_names": [], "lr": lr, "weight_decay": wd, "group_id": gid})
        g["params"].append(index.params[name])
        g["param_names"].append(name)
    return list(groups.values())


@dataclass(frozen=True)
class RebuildReport:
    """What :func:`rebuild_param_groups` changed (canonical names).

    Attributes:
        kept: tensors that stayed in the optimizer, with their group, hyperparameters and state.
        removed: tensors taken out (no longer trainable); their state was deleted.
        added: tensors newly put in the optimizer, with empty state.
        duplicates_removed: extra occurrences of a tensor found in more than one place and dropped.
        groups_added: indices of param groups appended (an LR scheduler built before the rebuild does not know
            them: rebuild the scheduler, or extend its ``base_lrs``).
    """

    kept: list[str]
    removed: list[str]
    added: list[str]
    duplicates_removed: list[str]
    groups_added: list[int]


def _group_matches(group: Mapping[str, Any], gid: str, lr: float, wd: float) -> bool:
    if "group_id" in group:
        return group["group_id"] == gid
    glr = group.get("initial_lr", group.get("lr"))
    gwd = group.get("weight_decay", 0.0)
    return (
        isinstance(glr, (int, float))
        and math.isclose(float(glr), lr, rel_tol=1e-12, abs_tol=0.0)
        and math.isclose(float(gwd), wd, rel_tol=1e-12, abs_tol=0.0)
    )


def rebuild_param_groups(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    plan: Optional[ParamPlan],
    base_lr: float,
    weight_decay: float,
    lr_overrides: Optional[Mapping[str, float]] = None,
    no_decay_patterns: Sequence[str] = DEFAULT_NO_DECAY_PATTERNS,
    lr_multipliers: Optional[Mapping[str, float]] = None,
    apply: bool = True,
) -> RebuildReport:
    """Bring an existing optimizer's param groups in line with ``plan`` in place, when trainability changes mid-run.

    * Tensors that stay trainable keep their group, its hyperparameters (including a scheduled lr) and their state.
    * Tensors of ``model`` that are no longer trainable are removed from their group and their state is deleted.
      Emptied groups are kept (empty) so the group count an LR scheduler relies on does not shrink.
    * Newly trainable tensors get fresh (deleted) state and join the existing group of their (lr, weight decay)
      class, as computed by :func:`build_param_groups` (matched by ``group_id``, or for groups without one by
      ``initial_lr``/``lr`` and ``weight_decay``), else a new group is appended. If the optimizer has an LR scheduler
      (groups carry ``initial_lr``), a new group gets ``initial_lr`` = its lr and ``lr`` scaled by the current
      schedule factor of the first scheduled group.
    * A tensor never ends up in two groups; tensors of the optimizer that are not parameters of ``model`` are left
      alone. ``param_names`` are maintained if the optimizer's groups carry them (as torch requires all or none).

    Args:
        optimizer: the optimizer to edit (a Lightning ``LightningOptimizer`` is unwrapped).
        model: the module whose parameters the plan names.
        plan: the new plan (``None``: trainability from ``requires_grad``).
        base_lr: default learning rate of newly trainable tensors (as in :func:`build_param_groups`).
        weight_decay: weight decay of newly trainable decayed tensors.
        lr_overrides: name or pattern -> absolute learning rate (as in :func:`build_param_groups`).
        no_decay_patterns: globs/regexes of tensors without weight decay.
        lr_multipliers: name or pattern -> lr factor (as in :func:`build_param_groups`).
        apply: first call :func:`apply_plan` so ``requires_grad`` matches the plan (a tensor in the optimizer
            without ``requires_grad`` would never get a gradient).

    Returns:
        A :class:`RebuildReport`.

    Raises:
        RuntimeError: the result still misses a trainable tensor or holds a frozen one (see :func:`verify_optimizer`).
    """
    opt = unwrap_optimizer(optimizer)
    if plan is not None and apply:
        apply_plan(model, plan)
    index = param_index(model)
    desired = build_param_groups(
        model, plan, base_lr, weight_decay, lr_overrides, no_decay_patterns, lr_multipliers
    )
    want: dict[int, tuple[str, dict[str, Any]]] = {}
    for g in desired:
        for name, p in zip(g["param_names"], g["params"]):
            want[id(p)] = (name, g)
    named = any("param_names" in g for g in opt.param_groups)

    kept: list[str] = []
    removed: list[str] = []
    dups: list[str] = []
    present: set[int] = set()
    for gi, group in enumerate(opt.param_groups):
        names = group.get("param_names")
        new_params, new_names = [], []
        for i, p in enumerate(group["params"]):
            label = index.by_id.get(id(p)) or (names[i] if names else f"<optimizer group {gi} param {i}>")
            if id(p) in present:
                dups.append(label)
                continue
            if id(p) in index.by_id and id(p) not in want:
                opt.state.pop(p, None)
                removed.append(label)
                continue
            present.add(id(p))
            if id(p) in want:
                kept.append(label)
            new_params.append(p)
            if names is not None:
                new_names.append(names[i])
        group["params"] = new_params
        if names is not None:
            group["param_names"] = new_names

    added: list[str] = []
    pending: dict[str, dict[str, Any]] = {}
    for g in desired:
        for name, p in zip(g["param_names"], g["params"]):
            if id(p) in present:
                continue
            opt.state.pop(p, None)
            target = next(
                (grp for grp in opt.param_groups if _group_matches(grp, g["group_id"], g["lr"], g["weight_decay"])),
                None,
            )
            if target is not None:
                target["params"].append(p)
                if "param_names" in target:
                    target["param_names"].append(name)
            else:
                pg = pending.setdefault(
                    g["group_id"],
                    {"params": [], "param_names": [], "lr": g["lr"], "weight_decay": g["weight_decay"],
                     "group_id": g["group_id"]},
                )
                pg["params"].append(p)
                pg["param_names"].append(name)
            present.add(id(p))
            added.append(name)

    scale = None
    for grp in opt.param_groups:
        if "initial_lr" in grp and grp["initial_lr"]:
            scale = grp["lr"] / grp["initial_lr"]
            break
    groups_added: list[int] = []
    for pg in pending.values():
        if scale is not None:
            pg["initial_lr"] = pg["lr"]
            pg["lr"] = pg["lr"] * scale
        if not named and opt.param_groups:
            pg.pop("param_names")
        opt.add_param_group(pg)
        groups_added.append(len(opt.param_groups) - 1)

    verify_optimizer(opt, model, plan)
    return RebuildReport(kept, removed, added, dups, groups_added)



def verify_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module, plan: Optional[ParamPlan] = None) -> None:
    """Check that ``optimizer`` holds every trainable tensor of ``model`` exactly once and no tensor the plan
    freezes (trainability as in :func:`build_param_groups`). Use at ``on_fit_start`` and after changes.

    Raises:
        RuntimeError: naming the missing, frozen-but-present and duplicated tensors.
    """
    opt = unwrap_optimizer(optimizer)
    if plan is not None:
        check_plan(plan)
    index = param_index(model)
    trainable = set(trainable_names(index, plan))
    seen: dict[int, int] = {}
    for g in opt.param_groups:
        for p in g["params"]:
            seen[id(p)] = seen.get(id(p), 0) + 1
    missing = [n for n in trainable if id(index.params[n]) not in seen]
    extra = [n for n, p in index.params.items() if n not in trainable and id(p) in seen]
    dups = [index.by_id.get(i, f"<tensor id {i}>") for i, c in seen.items() if c > 1]
    if missing or extra or dups:
        parts = []
        if missing:
            parts.append(f"trainable tensors missing from the optimizer (they would never be updated): {missing[:8]}")
        if extra:
            parts.append(f"frozen tensors still in the optimizer: {extra[:8]}")
        if dups:
            parts.append(f"tensors in more than one place in the param groups: {dups[:8]}")
        raise RuntimeError(
            "Optimizer does not match the parameter plan: " + "; ".join(parts)
            + ". Use rebuild_param_groups(optimizer, model, plan, ...) after changing trainability."
        )


def optimizer_defaults(optimizer: Any) -> tuple[float, float]:
    """Base lr and weight decay for tensors that become trainable mid-run: those of the first decayed group (its
    ``initial_lr`` when a scheduler set one, so the rebuild's schedule scaling is not applied twice), else of the
    first group."""
    groups = unwrap_optimizer(optimizer).param_groups
    decayed = [g for g in groups if g.get("weight_decay", 0.0) > 0] or groups
    g = decayed[0]
    return float(g.get("initial_lr", g["lr"])), float(g.get("weight_decay", 0.0))
