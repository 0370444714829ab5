"""Give chosen tensors their own optimizer hyperparameters (lr, weight decay) after the optimizer exists.

Techniques with several learning rates (a prompt at 0.3 next to a low-rank update at 5e-3, a prompt next to a
classification head) cannot rely on the user's ``configure_optimizers`` knowing about them. :func:`assign_group_hparams`
moves the named tensors out of whatever group they are in, into groups of their own (one per source group and
hyperparameter set: betas, eps, ... of the source group are kept), adds tensors the optimizer does not hold yet, keeps
every tensor's optimizer state, and reports which old group each new group came from so LR schedulers can be
re-mapped. The result is a function of the optimizer's groups and the assignment only, so a resumed run rebuilds the
same layout before the checkpointed optimizer state is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_ft.core.optim.groups import param_group_id
from lit_ft.core.optim.unwrap import unwrap_optimizer

__all__ = ["Regrouping", "assign_group_hparams", "in_optimizer"]

_HP = ("lr", "weight_decay")


@dataclass(frozen=True)
class Regrouping:
    """``origin[k]``: index of the old group new group ``k`` came from (``None`` = new); ``scale[k]``: its lr
    relative to that group's; ``moved``/``added``: names of tensors moved / newly added."""

    origin: list[int | None]
    scale: list[float]
    moved: list[str]
    added: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.moved or self.added)


def _already(group: Mapping[str, Any], hp: Mapping[str, float]) -> bool:
    """The group already has these hyperparameters (a scheduled group is compared by its ``initial_lr``)."""
    for k, v in hp.items():
        cur = group.get("initial_lr", group["lr"]) if k == "lr" else group.get(k)
        if cur is None or float(cur) != float(v):
            return False
    return True


def assign_group_hparams(
    optimizer: Any, model: nn.Module, assignments: Mapping[str, Mapping[str, float]]
) -> Regrouping:
    """Put each named parameter of ``model`` into a group with the given ``lr`` / ``weight_decay``.

    Args:
        optimizer: a torch optimizer (a Lightning ``LightningOptimizer`` is unwrapped); edited in place.
        model: the module whose ``named_parameters()`` the names refer to.
        assignments: parameter name -> ``{"lr": ..., "weight_decay": ...}`` (either key may be absent: kept from
            the source group). Names of frozen tensors are skipped.

    Raises:
        KeyError: a name is not a parameter of ``model``.
    """
    opt = unwrap_optimizer(optimizer)
    params = dict(model.named_parameters())
    unknown = [n for n in assignments if n not in params]
    if unknown:
        raise KeyError(f"assign_group_hparams: not parameters of {type(model).__name__}: {unknown[:4]}")
    for n, hp in assignments.items():
        bad = [k for k in hp if k not in _HP]
        if bad:
            raise KeyError(f"assign_group_hparams: {n}: only {_HP} can be assigned, got {bad}")
    target = {id(params[n]): (n, dict(hp)) for n, hp in assignments.items() if params[n].requires_grad}
    named = any("param_names" in g for g in opt.param_groups)
    new_groups: list[dict[str, Any]] = []
    extra: dict[tuple, dict[str, Any]] = {}
    origin: list[int | None] = []
    extra_origin: list[int | None] = []
    moved: list[str] = []
    seen: set[int] = set()

    def _group_like(src: Mapping[str, Any], hp: Mapping[str, float]) -> dict[str, Any]:
        g = {k: v for k, v in src.items() if k not in ("params", "param_names")}
        g.update(hp)
        if "lr" in hp and "initial_lr" in g:
            g["initial_lr"] = hp["lr"]
        if "group_id" in g:
            g["group_id"] = param_group_id(float(g["lr"]), float(g.get("weight_decay", 0.0)))
        g["params"] = []
        if named:
            g["param_names"] = []
        return g

    for gi, g in enumerate(opt.param_groups):
        keep, keep_names = [], []
        gnames = g.get("param_names")
        for i, p in enumerate(g["params"]):
            seen.add(id(p))
            if id(p) in target and not _already(g, target[id(p)][1]):
                n, hp = target[id(p)]
                key = (gi, tuple(sorted(hp.items())))
                if key not in extra:
                    extra[key] = _group_like(g, hp)
                    extra_origin.append(gi)
                extra[key]["params"].append(p)
                if named:
                    extra[key]["param_names"].append(n)
                moved.append(n)
            else:
                keep.append(p)
                keep_names.append(gnames[i] if gnames else None)
        ng = {k: v for k, v in g.items() if k not in ("params", "param_names")}
        ng["params"] = keep
        if named:
            ng["param_names"] = keep_names
        new_groups.append(ng)  # kept even when emptied: the group count LR schedulers rely on does not shrink
        origin.append(gi)
    added = [n for pid, (n, _) in target.items() if pid not in seen]
    if not moved and not added:
        return Regrouping(list(range(len(opt.param_groups))), [1.0] * len(opt.param_groups), [], [])
    for n in added:  # tensors the optimizer never held: hyperparameters of its first group, then the assignment
        hp = target[id(params[n])][1]
        key = (None, tuple(sorted(hp.items())))
        if key not in extra:
            extra[key] = _group_like(opt.param_groups[0], hp)
            extra_origin.append(None)
        extra[key]["params"].append(params[n])
        if named:
            extra[key]["param_names"].append(n)
    groups = new_groups + list(extra.values())
    origin = origin + extra_origin
    scale = []
    for g, o in zip(groups, origin):
        src = opt.param_groups[o] if o is not None else opt.param_groups[0]
        base = float(src.get("initial_lr", src["lr"]))
        scale.append(float(g.get("initial_lr", g["lr"])) / base if base else 1.0)
    opt.param_groups[:] = groups  # in place: a LightningOptimizer shares this list
    for n in added:
        opt.state.pop(params[n], None)
    return Regrouping(origin, scale, moved, added)


def in_optimizer(optimizer: Any, tensors: list[torch.Tensor]) -> list[bool]:
    """Whether each tensor is held by ``optimizer``."""
    ids = {id(p) for g in unwrap_optimizer(optimizer).param_groups for p in g["params"]}
    return [id(t) in ids for t in tensors]
