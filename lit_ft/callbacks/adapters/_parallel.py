"""What ParallelAdapters and MAM share (the paper's names and how the parallel adapters are built), so that neither
technique imports the other."""

from __future__ import annotations

import torch
from torch import nn

from lit_ft.callbacks._adapter import adapter_dims, hidden_size_of
from lit_ft.core.adapters import AdapterError, AdapterSet, resolve_targets
from lit_ft.core.parallel_adapter import FusedParallelAdapterSet, ParallelAdapter, ffn_layout

PAPER = "Towards a Unified View of Parameter-Efficient Transfer Learning"
ARXIV = "2110.04366"
#: roles the fused FFN path cannot take
ATTENTION_ROLES = ("attention", "attention_output", "query", "value")


def build_parallel_adapters(hf_model: nn.Module, targets: list[str], bottleneck: int, scale: float, init: str,
                            seed: int, fused: bool, owner: str) -> AdapterSet:
    """One :class:`ParallelAdapter` per target in every decoder layer (a whole sublayer keeps the hidden size; a
    linear layer's own widths otherwise), hooked, or on the fused FFN path when ``fused``."""
    g = torch.Generator().manual_seed(seed)
    hidden = hidden_size_of(hf_model)
    built = {}
    for target, module in resolve_targets(hf_model, targets, owner).items():
        if fused:
            ffn_layout(module, owner)  # fail at setup, naming the block, not at the first forward
            width_in = width_out = hidden
        else:
            try:
                width_in, width_out = adapter_dims(module, owner)
            except AdapterError:
                width_in = width_out = hidden
        a = ParallelAdapter(width_in, width_out, bottleneck, scale, init)
        a.reset(g)
        built[target] = a
    return FusedParallelAdapterSet(built) if fused else AdapterSet(built)
