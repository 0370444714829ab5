"""Helpers every fused op shares: which implementation runs (``impl``), whether Triton can run, and the same
choice while ``torch.compile`` traces.

Importing this module imports neither triton nor ``torch._dynamo`` (about a second, and it pulls triton in): the
compile-time variant lives in :mod:`lit_ft.kernels._compile_support`, imported only while tracing.
"""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["IMPLS", "IMPL_ENV", "triton_runnable", "resolve_impl", "resolve_impl_traced"]

#: values of every op's ``impl`` argument
IMPLS = ("auto", "torch", "triton")
#: environment variable that overrides ``impl="auto"`` for every op (benchmarks, CI without a GPU)
IMPL_ENV = "LIT_FT_IMPL"


def triton_runnable(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton path can run on ``device`` (never imports triton), and why not."""
    if device.type != "cuda":
        return False, f"the Triton path needs CUDA tensors, got device {device}"
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"the Triton path needs compute capability >= 8.0, this GPU has {major}.{minor}"
    return True, ""


def resolve_impl(impl: str, device: torch.device) -> str:
    """``auto`` (or env ``LIT_FT_IMPL``) -> ``triton`` on capable CUDA GPUs, else ``torch``; explicit choices raise."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        env = os.environ.get(IMPL_ENV, "").strip().lower()
        if env and env != "auto":
            if env not in IMPLS:
                raise ValueError(f"environment variable {IMPL_ENV} must be one of {IMPLS}, got {env!r}")
            impl = env
    if impl == "torch":
        return "torch"
    ok, why = triton_runnable(device)
    if impl == "triton":
        if not ok:
            raise RuntimeError(f"impl='triton' was requested but cannot run: {why}. Use impl='torch' or 'auto'.")
        return "triton"
    return "triton" if ok else "torch"


def resolve_impl_traced(impl: str, device: torch.device) -> str:
    """:func:`resolve_impl` that also works while ``torch.compile`` traces the caller: there ``find_spec`` and device
    queries are not traceable, so the choice is evaluated eagerly and baked into the graph as a constant."""
    if torch.compiler.is_compiling():
        from ._compile_support import resolve_impl_constant

        return resolve_impl_constant(impl, str(device))
    return resolve_impl(impl, device)
