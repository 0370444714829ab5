"""Which implementation of a fused op runs (``impl``) and whether Triton can run — the eager part of
:mod:`lit_ft.kernels._common`, in its own module so that the compile-time helper
(:mod:`lit_ft.kernels._compile_support`) can import it without importing ``_common`` back."""

from __future__ import annotations

import importlib.util
import os

import torch

__all__ = ["IMPLS", "IMPL_ENV", "triton_runnable", "resolve_impl"]

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
