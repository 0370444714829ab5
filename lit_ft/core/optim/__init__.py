"""The optimizer service: every change lit_ft makes to a user's optimizer goes through here.

* param groups by name — :func:`build_param_groups`, :func:`rebuild_param_groups` (trainability changed mid-run),
  :func:`verify_optimizer`, :func:`optimizer_defaults` (lr / weight decay for tensors that join mid-run)
* resume — :func:`optimizer_layout` / :func:`apply_optimizer_layout` (which named tensor sits where)
* state — :func:`reset_optimizer_state`, :func:`masked_state_reset`, :func:`optimizer_snapshot` (restore exactly)
* per-group hyper-parameters — :func:`assign_group_hparams`
* LR schedulers after a regrouping — :func:`sync_schedulers`; back to step 0 — :func:`restart_schedulers`
* the configured learning rates over a checkpoint's — :func:`configured_learning_rates`, :func:`reapply_learning_rates`

Names refer to ``model.named_parameters()`` and follow the pattern syntax of :mod:`lit_ft.core.params`. Nothing here
imports Lightning; a ``LightningOptimizer`` is accepted wherever an optimizer is.
"""

from lit_ft.core.optim.groups import (
    DEFAULT_NO_DECAY_PATTERNS,
    RebuildReport,
    build_param_groups,
    optimizer_defaults,
    param_group_id,
    rebuild_param_groups,
    verify_optimizer,
)
from lit_ft.core.optim.hparams import Regrouping, assign_group_hparams, in_optimizer
from lit_ft.core.optim.layout import apply_optimizer_layout, optimizer_layout
from lit_ft.core.optim.lr import configured_learning_rates, reapply_learning_rates
from lit_ft.core.optim.schedulers import SUPPORTED_SCHEDULERS, restart_schedulers, sync_schedulers
from lit_ft.core.optim.snapshot import optimizer_snapshot
from lit_ft.core.optim.state import masked_state_reset, reset_optimizer_state
from lit_ft.core.optim.unwrap import unwrap_optimizer

__all__ = [
    "DEFAULT_NO_DECAY_PATTERNS", "RebuildReport", "build_param_groups", "optimizer_defaults", "param_group_id",
    "rebuild_param_groups", "verify_optimizer",
    "Regrouping", "assign_group_hparams", "in_optimizer",
    "apply_optimizer_layout", "optimizer_layout",
    "configured_learning_rates", "reapply_learning_rates",
    "SUPPORTED_SCHEDULERS", "restart_schedulers", "sync_schedulers",
    "optimizer_snapshot",
    "masked_state_reset", "reset_optimizer_state",
    "unwrap_optimizer",
]
