"""Applying a plan to a model (``requires_grad``) and counting what may change under it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Optional

from torch import nn

from lit_ft.core.params.patterns import ParamIndex, param_index
from lit_ft.core.params.plans import ParamPlan, PlanEntry, check_plan, plan_on_model

__all__ = ["TensorSummary", "PlanSummary", "apply_plan", "plan_summary"]


@dataclass(frozen=True)
class TensorSummary:
    """One tensor in a :class:`PlanSummary`: its state (``"unlisted"`` if the plan does not name it), the number
    of elements that may change, and its size."""

    state: str
    trainable: int
    numel: int


@dataclass(frozen=True)
class PlanSummary:
    """Result of :func:`apply_plan` / :func:`plan_summary`: elements that may change (mask ``True`` counts for masked tensors), all
    elements, their ratio, and the per-tensor breakdown (canonical names; tied tensors counted once)."""

    trainable: int
    total: int
    fraction: float
    by_tensor: dict[str, TensorSummary] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"trainable {self.trainable:,} / {self.total:,} elements ({100 * self.fraction:.3f}%)"


def apply_plan(
    model: nn.Module,
    plan: ParamPlan,
    unlisted: Literal["keep", "trainable", "frozen"] = "keep",
    strict: bool = True,
) -> PlanSummary:
    """Set ``requires_grad`` from ``plan``: frozen -> False, trainable or mask -> True.

    Masks are *not* enforced by ``requires_grad``; call :func:`mask_gradients` before each optimizer step and
    :func:`reproject_masked` after it.

    Args:
        model: the module to edit.
        plan: the (composed) plan.
        unlisted: what to do with parameters the plan does not name: ``"keep"`` their current ``requires_grad``,
            or force them ``"trainable"`` / ``"frozen"``.
        strict: raise if the plan names a parameter the model does not have.

    Returns:
        A :class:`PlanSummary` over every parameter of ``model``.

    Raises:
        KeyError: (``strict``) a plan name is not a parameter of ``model``.
        ValueError: a mask's shape differs from its parameter's, or ``unlisted`` is not an allowed value.
    """
    check_plan(plan)
    if unlisted not in ("keep", "trainable", "frozen"):
        raise ValueError(f"`unlisted` must be 'keep', 'trainable' or 'frozen', got {unlisted!r}.")
    index = param_index(model)
    entries = plan_on_model(index, plan, strict)
    for name, p in index.params.items():
        hit = entries.get(name)
        if hit is not None:
            p.requires_grad_(hit[1].trainable)
        elif unlisted != "keep":
            p.requires_grad_(unlisted == "trainable")
    return _summarize(index, entries)


def plan_summary(model: nn.Module, plan: Optional[ParamPlan] = None, strict: bool = True) -> PlanSummary:
    """What :func:`apply_plan` would report, without changing anything: elements of ``model`` that may change under
    ``plan`` (mask ``True`` counts for masked tensors; a tensor the plan does not name, or every tensor when ``plan``
    is ``None``, counts by its current ``requires_grad``).

    Raises:
        KeyError: (``strict``) a plan name is not a parameter of ``model``.
    """
    index = param_index(model)
    entries = plan_on_model(index, check_plan(plan), strict) if plan is not None else {}
    return _summarize(index, entries)


def _summarize(index: ParamIndex, entries: Mapping[str, tuple[str, PlanEntry]]) -> PlanSummary:
    by_tensor: dict[str, TensorSummary] = {}
    trainable = total = 0
    for name, p in index.params.items():
        hit = entries.get(name)
        if hit is None:
            count = p.numel() if p.requires_grad else 0
            by_tensor[name] = TensorSummary("unlisted", count, p.numel())
        else:
            count = hit[1].trainable_count(p.numel())
            by_tensor[name] = TensorSummary(hit[1].state, count, p.numel())
        trainable += count
        total += p.numel()
    return PlanSummary(trainable, total, trainable / total if total else 0.0, by_tensor)



def trainable_names(index: ParamIndex, plan: Optional[ParamPlan]) -> list[str]:
    """Canonical names that may train: marked trainable or masked by ``plan``, or not named by it (or no plan) and
    ``requires_grad``; in model order."""
    entries = plan_on_model(index, plan) if plan is not None else {}
    out = []
    for name, p in index.params.items():
        e = entries[name][1] if name in entries else None
        if (e is not None and e.trainable) or (e is None and p.requires_grad):
            out.append(name)
    return out

