"""The optimizer's param-group layout by name, saved with a checkpoint and re-applied on resume.

Lightning restores an optimizer's state *by position* after ``on_fit_start``; mid-run rebuilds make the layout of a
run depend on its history, so the layout (which named tensor sits where) is saved and the fresh optimizer's groups
are arranged like it before the state is loaded.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import nn

from lit_ft.core.optim.unwrap import unwrap_optimizer
from lit_ft.core.params.patterns import param_index

__all__ = ["optimizer_layout", "apply_optimizer_layout"]


def optimizer_layout(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The canonical names of each param group's tensors, group by group, in order: what an optimizer ``state_dict``
    (which keys state by position) needs to be loaded into the right tensors. Save it with the checkpoint and give it
    to :func:`apply_optimizer_layout` on resume.

    Raises:
        ValueError: a group holds a tensor that is not a parameter of ``model``.
    """
    opt = unwrap_optimizer(optimizer)
    by_id = param_index(model).by_id
    layout: list[list[str]] = []
    for gi, g in enumerate(opt.param_groups):
        names = []
        for i, p in enumerate(g["params"]):
            name = by_id.get(id(p))
            if name is None:
                raise ValueError(
                    f"optimizer param group {gi} holds a tensor (index {i}, shape {tuple(p.shape)}) that is not a "
                    f"parameter of {type(model).__name__}; its position cannot be named."
                )
            names.append(name)
        layout.append(names)
    return layout


def apply_optimizer_layout(
    optimizer: torch.optim.Optimizer, model: nn.Module, layout: Sequence[Sequence[str]]
) -> Optional[list[int]]:
    """Arrange ``optimizer``'s param groups as ``layout`` (from :func:`optimizer_layout`): same groups, same tensors,
    same order, so that an optimizer state saved with that layout (restored by position, as Lightning does after
    ``on_fit_start``) lands on the right tensors after mid-run rebuilds moved tensors between or within groups.

    Each group keeps the hyperparameters of the current group that holds its first tensor (an empty group: those of
    the current group at its index, else of the last); loading the optimizer state overwrites them anyway. State is
    keyed by tensor and is not touched; ``param_names`` are kept in step if the groups carry them.

    Returns:
        ``None`` if the groups already had this layout, else for each new group the index of the old group its
        hyperparameters came from (to re-map LR schedulers when the group count changed).

    Raises:
        ValueError: ``layout`` names a tensor ``model`` does not have, or the optimizer does not hold exactly the
            tensors of ``layout``.
    """
    opt = unwrap_optimizer(optimizer)
    index = param_index(model)
    current = optimizer_layout(opt, model)
    wanted = [list(g) for g in layout]
    if current == wanted:
        return None
    unknown = [n for g in wanted for n in g if n not in index.params]
    if unknown:
        raise ValueError(f"`layout` names tensors that are not parameters of {type(model).__name__}: {unknown[:8]}.")
    now, saved = sorted(n for g in current for n in g), sorted(n for g in wanted for n in g)
    if now != saved:
        missing, extra = sorted(set(saved) - set(now)), sorted(set(now) - set(saved))
        raise ValueError(
            f"the optimizer does not hold the tensors of `layout` ({len(now)} vs {len(saved)} entries; in the layout "
            f"only: {missing[:8]}; in the optimizer only: {extra[:8]}). Trainability differs from the run that saved "
            "the layout: was the model or a parameter callback changed between the runs?"
        )
    where = {n: gi for gi, g in enumerate(current) for n in g}
    named = any("param_names" in g for g in opt.param_groups)
    new_groups, origin = [], []
    for i, names in enumerate(wanted):
        src = where[names[0]] if names else min(i, len(opt.param_groups) - 1)
        g = {k: v for k, v in opt.param_groups[src].items() if k not in ("params", "param_names")}
        g["params"] = [index.params[n] for n in names]
        if named:
            g["param_names"] = list(names)
        new_groups.append(g)
        origin.append(src)
    opt.param_groups[:] = new_groups  # in place: a LightningOptimizer shares this list
    return origin


