"""Name-keyed parameter plans: which parameters (or which elements of a parameter) a technique lets change.

The shared mechanism behind every technique that freezes or masks parameters: GreenTrainer, Half Fine-Tuning,
lottery-ticket sparse fine-tuning, FreezeLayers, TrainOnly, LocalizedTuning, prompt tuning. No technique logic, no
Lightning. Contract: ``docs/core/params.md``.

* :mod:`~lit_ft.core.params.patterns` — parameter names and the pattern syntax (globs, ``"re:"`` regexes).
* :mod:`~lit_ft.core.params.plans` — :class:`ParamPlan`, :func:`compose` (intersection), :class:`ParamPlanConflict`.
* :mod:`~lit_ft.core.params.apply` — :func:`apply_plan` (``requires_grad``), :func:`plan_summary`.
* :mod:`~lit_ft.core.params.masks` — element masks as data: :func:`pack_mask` / :func:`unpack_mask`.
* :mod:`~lit_ft.core.params.enforce` — :func:`mask_gradients`, :func:`snapshot_masked`, :func:`reproject_masked`.

What the optimizer does with a plan (param groups by name, state reset, layouts) is :mod:`lit_ft.core.optim`.
"""

from lit_ft.core.params.apply import PlanSummary, TensorSummary, apply_plan, plan_summary
from lit_ft.core.params.enforce import mask_gradients, reproject_masked, snapshot_masked
from lit_ft.core.params.masks import pack_mask, unpack_mask
from lit_ft.core.params.patterns import ParamPatternError, name_matcher, select_param_names
from lit_ft.core.params.plans import FROZEN, MASK, TRAINABLE, ParamPlan, ParamPlanConflict, PlanEntry, compose

__all__ = [
    "TRAINABLE", "FROZEN", "MASK", "ParamPatternError", "ParamPlanConflict", "PlanEntry", "ParamPlan",
    "TensorSummary", "PlanSummary", "select_param_names", "name_matcher", "compose", "apply_plan", "plan_summary",
    "mask_gradients", "snapshot_masked", "reproject_masked", "pack_mask", "unpack_mask",
]
