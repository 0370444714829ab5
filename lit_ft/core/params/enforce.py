"""Enforcing a plan's element masks during training, exactly (weight decay and momentum included).

:func:`mask_gradients` runs before the optimizer step (``on_before_optimizer_step``); zeroed gradients alone do not
stop weight decay or momentum from moving masked-out elements, so :func:`snapshot_masked` keeps their values when
the plan changes and :func:`reproject_masked` copies them back after every step.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import torch
from torch import nn

from lit_ft.core.params.patterns import param_index
from lit_ft.core.params.plans import FROZEN, MASK, ParamPlan, check_plan, plan_on_model

__all__ = ["mask_gradients", "snapshot_masked", "reproject_masked"]


def mask_gradients(model: nn.Module, plan: ParamPlan) -> None:
    """Zero the gradient of every masked-out element (``masked_fill``, so NaN/inf there are cleared too) and drop
    the ``.grad`` of frozen tensors (set to ``None``, so torch optimizers skip them: no weight decay, no momentum).

    Call in ``on_before_optimizer_step`` (after AMP unscale, before clipping). Zeroed gradients alone do not stop
    weight decay or momentum from moving masked-out elements: also call :func:`reproject_masked` after the step.
    """
    check_plan(plan)
    index = param_index(model)
    with torch.no_grad():
        for name, (key, entry) in plan_on_model(index, plan).items():
            p = index.params[name]
            if p.grad is None:
                continue
            if entry.state == FROZEN:
                p.grad = None
            elif entry.state == MASK:
                _, inv = plan._masks_on(key, p.grad.device)
                p.grad.masked_fill_(inv, 0)


def snapshot_masked(
    model: nn.Module, plan: ParamPlan, compact: bool = False, device: Optional[Union[str, torch.device]] = None
) -> dict[str, torch.Tensor]:
    """Save the current values that :func:`reproject_masked` restores, for every masked tensor in ``plan``.

    Memory: with ``compact=False`` (default) a full copy of each masked tensor (``numel * element_size`` bytes per
    tensor); restoring is a sync-free ``torch.where``. With ``compact=True`` only the masked-out elements
    (``(numel - mask.sum()) * element_size`` bytes) as a 1-D tensor; restoring uses boolean indexing, which
    synchronises with the GPU once per tensor. Frozen and trainable tensors are not stored (a frozen tensor without
    ``.grad`` is never touched by torch optimizers).

    Args:
        model: the module whose parameters are read.
        plan: the plan whose ``"mask"`` entries are saved.
        compact: store only the masked-out elements (see Memory).
        device: where to keep the copies (e.g. ``"cpu"`` to spare accelerator memory); default: each parameter's
            device.

    Returns:
        canonical name -> saved values.
    """
    check_plan(plan)
    index = param_index(model)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, (key, entry) in plan_on_model(index, plan).items():
            if entry.state != MASK:
                continue
            p = index.params[name].detach()
            if compact:
                _, inv = plan._masks_on(key, p.device)
                val = p[inv].clone()
            else:
                val = p.clone()
            out[name] = val.to(device) if device is not None else val
    return out


def reproject_masked(model: nn.Module, plan: ParamPlan, reference_values: Mapping[str, torch.Tensor]) -> None:
    """Copy the saved values back into every masked-out element (exact re-projection), leaving ``True`` elements as
    the optimizer left them. Call after ``optimizer.step()`` (``on_train_batch_end`` in Lightning).

    Args:
        model: the module whose parameters are edited in place.
        plan: the plan whose ``"mask"`` entries are enforced.
        reference_values: output of :func:`snapshot_masked` (full or compact) for the same plan.

    Raises:
        KeyError: a masked tensor has no saved values.
        ValueError: saved values have a size that fits neither the full tensor nor its masked-out elements.
    """
    check_plan(plan)
    if not isinstance(reference_values, Mapping):
        raise TypeError(
            "`reference_values` must be the mapping returned by snapshot_masked, got "
            f"{type(reference_values).__name__}."
        )
    index = param_index(model)
    with torch.no_grad():
        for name, (key, entry) in plan_on_model(index, plan).items():
            if entry.state != MASK:
                continue
            ref = reference_values.get(name)
            if ref is None:
                raise KeyError(
                    f"{plan.owner}: `reference_values` has no entry for masked tensor {name!r}; take it with "
                    f"snapshot_masked(model, plan) after building the plan."
                )
            p = index.params[name]
            mask, inv = plan._masks_on(key, p.device)
            ref = ref.to(device=p.device, dtype=p.dtype)
            if ref.shape == p.shape:
                p.copy_(torch.where(mask, p, ref))
            elif ref.dim() == 1 and ref.numel() == inv.sum().item():
                p[inv] = ref
            else:
                raise ValueError(
                    f"{plan.owner}: saved values for {name!r} have shape {tuple(ref.shape)}, which is neither the "
                    f"parameter's shape {tuple(p.shape)} nor the number of its masked-out elements; re-take the "
                    f"snapshot after changing the plan."
                )


