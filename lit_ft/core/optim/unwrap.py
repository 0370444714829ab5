"""The torch optimizer behind a Lightning ``LightningOptimizer`` (every optimizer helper accepts either)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer: Any, argname: str = "optimizer") -> torch.optim.Optimizer:
    """The ``torch.optim.Optimizer`` itself: a Lightning ``LightningOptimizer`` is unwrapped, a torch optimizer is
    returned as is.

    Raises:
        TypeError: ``optimizer`` is neither.
    """
    inner = getattr(optimizer, "_optimizer", None)  # lightning.pytorch.core.optimizer.LightningOptimizer
    if isinstance(inner, torch.optim.Optimizer):
        return inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"`{argname}` must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    return optimizer


