"""Helpers used only while torch.compile traces an op (importing this module imports torch._dynamo, so
:mod:`lit_ft.kernels._common` imports it lazily)."""

import torch

from ._dispatch import resolve_impl


@torch.compiler.assume_constant_result
def resolve_impl_constant(impl: str, device: str) -> str:
    # evaluated eagerly by dynamo and baked into the graph (find_spec / device queries are not traceable)
    return resolve_impl(impl, torch.device(device))
