"""Optimizer parameter groups shared by lit_ft's modules."""

from __future__ import annotations

from typing import Any

from torch import nn

_NO_DECAY = ("bias", "norm", "layernorm", "layer_norm", "embed", "wte", "wpe")


def adamw_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters split into decay / no-decay groups (biases, norms, embeddings get no decay), each
    group carrying ``param_names`` so callbacks can rebuild groups by name."""
    decay, no_decay = [], []
    decay_names, no_decay_names = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if any(tag in name.lower() for tag in _NO_DECAY) or p.ndim < 2:
            no_decay.append(p)
            no_decay_names.append(name)
        else:
            decay.append(p)
            decay_names.append(name)
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay, "param_names": decay_names})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "param_names": no_decay_names})
    if not groups:
        raise ValueError("No trainable parameters: every parameter has requires_grad=False")
    return groups
