"""Helpers every fused op shares: which implementation runs (``impl``), whether Triton can run, and the same
choice while ``torch.compile`` traces.

Importing this module imports neither triton nor ``torch._dynamo`` (about a second, and it pulls triton in): the
compile-time variant lives in :mod:`lit_ft.kernels._compile_support`, imported only while tracing.
"""

from __future__ import annotations

import torch

from ._dispatch import IMPL_ENV, IMPLS, resolve_impl, triton_runnable

__all__ = ["IMPLS", "IMPL_ENV", "triton_runnable", "resolve_impl", "resolve_impl_traced"]


def resolve_impl_traced(impl: str, device: torch.device) -> str:
    """:func:`resolve_impl` that also works while ``torch.compile`` traces the caller: there ``find_spec`` and device
    queries are not traceable, so the choice is evaluated eagerly and baked into the graph as a constant."""
    if torch.compiler.is_compiling():
        from ._compile_support import resolve_impl_constant

        return resolve_impl_constant(impl, str(device))
    return resolve_impl(impl, device)
