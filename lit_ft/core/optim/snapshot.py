"""Run code that changes an optimizer (a probe step, a trial regrouping) and put the optimizer back exactly.

GreenTrainer measures tensor importance with one *real* optimizer step and must leave no trace of it: per-tensor
state (AdamW's ``exp_avg``, ``exp_avg_sq``, ``step``), the param groups (their tensors and hyper-parameters, groups a
rebuild appended) all return to what they were, bit for bit. Parameters, gradients and ``requires_grad`` are not
optimizer state and are not covered.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from lit_ft.core.optim.unwrap import unwrap_optimizer

__all__ = ["optimizer_snapshot"]

_GROUP_LISTS = ("params", "param_names")  # lists a regrouping edits in place: saved as copies


class _SavedTensor:
    """A tensor hyper-parameter: the object the group held (schedulers may hold it too) and its values."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.original = tensor
        self.values = tensor.detach().clone()


def _copy_value(value: Any) -> Any:
    # tensors are cloned (the optimizer updates them in place); anything else is copied so that in-place edits of
    # lists or dicts in the state cannot reach the saved copy
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return copy.deepcopy(value)


def _save_group(group: dict[str, Any]) -> dict[str, Any]:
    saved: dict[str, Any] = {}
    for key, value in group.items():
        if key in _GROUP_LISTS:
            saved[key] = list(value)
        elif isinstance(value, torch.Tensor):  # a tensor lr (capturable / fused optimizers): keep the object too
            saved[key] = _SavedTensor(value)
        elif isinstance(value, (list, dict, set)):  # a mutable hyper-parameter could be edited in place
            saved[key] = copy.deepcopy(value)
        else:
            saved[key] = value
    return saved


def _restore_group(group: dict[str, Any], saved: dict[str, Any]) -> None:
    group.clear()  # in place: LR schedulers and a LightningOptimizer hold these dicts
    for key, value in saved.items():
        if key in _GROUP_LISTS:
            group[key] = list(value)
        elif isinstance(value, _SavedTensor):
            with torch.no_grad():
                value.original.copy_(value.values)
            group[key] = value.original
        elif isinstance(value, (list, dict, set)):
            group[key] = copy.deepcopy(value)  # the saved copy stays pristine if the group is restored again
        else:
            group[key] = value


@contextmanager
def optimizer_snapshot(optimizer: Any) -> Iterator[torch.optim.Optimizer]:
    """Save ``optimizer``'s state and param groups on enter; restore them exactly on exit, also when the body raises.

    Saved: every tensor's state (tensors cloned: moments, ``step`` counters; other values deep-copied), which
    tensors have state at all, and each param group (its tensors and ``param_names`` in order, every
    hyper-parameter). On exit the state is replaced by the saved copies (tensors that gained state in the body lose
    it), each group is restored in place, groups appended in the body are dropped and groups removed in the body
    come back.

    Args:
        optimizer: a torch optimizer or a Lightning ``LightningOptimizer`` (unwrapped).

    Yields:
        The torch optimizer.

    Memory: one copy of the optimizer state (for AdamW twice the trainable parameters) while the body runs.
    """
    opt = unwrap_optimizer(optimizer)
    saved_groups = [_save_group(g) for g in opt.param_groups]
    saved_state = {p: {k: _copy_value(v) for k, v in s.items()} for p, s in opt.state.items()}
    try:
        yield opt
    finally:
        groups = opt.param_groups
        for group, saved in zip(groups, saved_groups):
            _restore_group(group, saved)
        del groups[len(saved_groups):]  # groups the body appended (e.g. a rebuild for newly trainable tensors)
        for saved in saved_groups[len(groups):]:  # groups the body removed
            restored: dict[str, Any] = {}
            _restore_group(restored, saved)
            groups.append(restored)
        opt.state.clear()  # keeps the defaultdict torch optimizers rely on
        opt.state.update(saved_state)
