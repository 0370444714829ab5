"""Optimizer parameter groups shared by lit_ft's modules (a thin policy over ``lit_ft.core.optim``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from lit_ft.core.optim import DEFAULT_NO_DECAY_PATTERNS, build_param_groups

#: biases and norms (core default) plus embeddings get no weight decay in lit_ft's modules
MODULE_NO_DECAY_PATTERNS = (*DEFAULT_NO_DECAY_PATTERNS, "*embed*", "*LayerNorm*")


def adamw_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters (``requires_grad``) in decay / no-decay groups, each with ``param_names`` so callbacks
    can rebuild groups by name."""
    groups = build_param_groups(model, None, lr, weight_decay, no_decay_patterns=MODULE_NO_DECAY_PATTERNS)
    if not groups:
        raise ValueError("No trainable parameters: every parameter has requires_grad=False")
    return groups
