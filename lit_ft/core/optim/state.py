"""Optimizer-state surgery: delete the state of chosen tensors, or zero it element-wise under a mask."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Optional, Union

import torch
from torch import nn

from lit_ft.core.optim.unwrap import unwrap_optimizer
from lit_ft.core.params.masks import check_mask
from lit_ft.core.params.patterns import name_matcher, no_match_error, param_index, select_in_index

__all__ = ["reset_optimizer_state", "masked_state_reset"]


def reset_optimizer_state(
    optimizer: torch.optim.Optimizer,
    params_or_names: Union[torch.Tensor, str, Iterable[Union[torch.Tensor, str]]],
    model: Optional[nn.Module] = None,
) -> int:
    """Delete the optimizer state (e.g. AdamW ``step``, ``exp_avg``, ``exp_avg_sq``) of the chosen tensors, so their
    next step starts fresh. Other tensors' state is untouched.

    Args:
        optimizer: the optimizer (a ``LightningOptimizer`` is unwrapped).
        params_or_names: tensors, names, or patterns (globs / ``"re:"`` regexes; each must match). Names are
            resolved against ``model`` if given, else against the optimizer groups' ``param_names``.
        model: module used to resolve names.

    Returns:
        The number of chosen tensors that had state.

    Raises:
        ValueError: a chosen tensor is not in the optimizer, or names are given with neither ``model`` nor
            ``param_names`` in the optimizer.
        ParamPatternError: a name/pattern matches nothing.
    """
    opt = unwrap_optimizer(optimizer)
    items: list[Union[torch.Tensor, str]]
    if isinstance(params_or_names, (torch.Tensor, str)):
        items = [params_or_names]
    else:
        items = list(params_or_names)
    in_opt = {id(p): p for g in opt.param_groups for p in g["params"]}
    chosen: list[torch.Tensor] = []
    names = [x for x in items if isinstance(x, str)]
    for x in items:
        if isinstance(x, torch.Tensor):
            chosen.append(x)
        elif not isinstance(x, str):
            raise TypeError(
                f"`params_or_names` entries must be tensors or parameter names, got {type(x).__name__}."
            )
    if names:
        if model is not None:
            index = param_index(model)
            chosen += [index.params[n] for n in select_in_index(index, names, argname="params_or_names")]
        else:
            opt_names: dict[str, torch.Tensor] = {}
            for g in opt.param_groups:
                for n, p in zip(g.get("param_names", ()), g["params"]):
                    opt_names[n] = p
            if not opt_names:
                raise ValueError(
                    "`params_or_names` contains names, but `model` is None and the optimizer's param groups carry "
                    "no 'param_names'; pass `model=` or the tensors themselves."
                )
            for pat in names:
                pred = name_matcher(pat, "params_or_names")
                hits = [p for n, p in opt_names.items() if pred(n)]
                if not hits:
                    raise no_match_error(pat, list(opt_names), None, "params_or_names")
                chosen += hits
    count = 0
    for p in chosen:
        if id(p) not in in_opt:
            raise ValueError(
                f"`params_or_names`: a chosen tensor of shape {tuple(p.shape)} is not in the optimizer's param groups."
            )
        if opt.state.pop(p, None):
            count += 1
    return count


def masked_state_reset(optimizer: torch.optim.Optimizer, param: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Zero the optimizer's per-element state of ``param`` where ``mask`` is ``False`` (e.g. AdamW ``exp_avg``,
    ``exp_avg_sq``, ``max_exp_avg_sq``; SGD ``momentum_buffer``). State tensors whose shape differs from the
    parameter's (scalar ``step``, quantised 8-bit state) are left as they are; ``step`` is per tensor, so reset
    elements keep the tensor's bias correction.

    Args:
        optimizer: the optimizer (a ``LightningOptimizer`` is unwrapped).
        param: a parameter in the optimizer.
        mask: ``torch.bool`` of ``param``'s shape; ``True`` = keep the state, ``False`` = zero it.

    Returns:
        The state keys that were zeroed (empty if the tensor has no state yet).
    """
    opt = unwrap_optimizer(optimizer)
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"`param` must be a tensor in the optimizer, got {type(param).__name__}.")
    if not any(param is p for g in opt.param_groups for p in g["params"]):
        raise ValueError(f"`param` (shape {tuple(param.shape)}) is not in the optimizer's param groups.")
    mask = check_mask(mask, "mask", param.shape)
    state = opt.state.get(param)
    done: list[str] = []
    if not state:
        return done
    with torch.no_grad():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == param.shape:
                value.masked_fill_(~mask.to(value.device), 0)
                done.append(key)
    return done


