"""Helpers used only while torch.compile traces the op (importing this module imports torch._dynamo)."""

import torch

from . import resolve_impl


@torch.compiler.assume_constant_result
def resolve_impl_constant(impl: str, device: str) -> str:
    # evaluated eagerly by dynamo and baked into the graph (find_spec / device queries are not traceable)
    return resolve_impl(impl, torch.device(device))
