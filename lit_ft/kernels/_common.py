"""Helpers every fused op shares: which implementation runs (``impl``), whether Triton can run, and the same
choice while ``torch.compile`` traces.

Importing this module imports neither triton nor ``torch._dynamo`` (about a second, and it pulls triton in): the
compile-time variant lives in :mod:`lit_ft.kernels._compile_support`, imported only while tracing.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import IMPL_ENV, IMPLS, resolve_impl, triton_runnable

__all__ = ["IMPLS", "IMPL_ENV", "triton_runnable", "resolve_impl", "resolve_impl_traced", "FLOAT_DTYPES",
           "check_tensor", "check_linear_inputs", "check_logit_options", "check_bias_and_keep",
           "linear_grad_mask", "reference_logits"]

#: which inputs of a fused-linear op need a gradient (bits of the ops' ``grad_mask``)
GRAD_HIDDEN, GRAD_WEIGHT, GRAD_BIAS = 1, 2, 4

#: floating dtypes the fused ops accept for hidden states and weights
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, t: object, *, ndim: int, dtypes: tuple[torch.dtype, ...] | None = None,
                 what: str | None = None) -> None:
    """An op argument's type, rank and dtype, with an error naming the argument."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}" + (f" ({what})" if what else ""))
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[int, int, int]:
    """The checks every fused-linear op makes on ``hidden [N, D]`` and ``weight [V, D]``; returns ``(N, D, V)``."""
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES, what="[N, D]; flatten batch and time first")
    n, d = hidden.shape
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, what="[V, D]")
    if weight.shape[1] != d:
        raise ValueError(f"weight must be [V, D] with D={d} (hidden's last dim), got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    v = weight.shape[0]
    if v == 0 or d == 0:
        raise ValueError(f"weight must be non-empty, got shape {tuple(weight.shape)}")
    return n, d, v


def check_bias_and_keep(bias: torch.Tensor | None, keep: torch.Tensor | None, hidden: torch.Tensor, n: int,
                        v: int) -> None:
    """``bias`` ``[V]`` in hidden's dtype and device, ``keep`` bool ``[N]``: the optional inputs every fused-linear op
    shares."""
    if bias is not None:
        check_tensor("bias", bias, ndim=1, what="[V]")
        if bias.shape[0] != v:
            raise ValueError(f"bias must have shape [V]=[{v}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype or bias.device != hidden.device:
            raise TypeError(f"bias must match hidden's dtype/device ({hidden.dtype}, {hidden.device}), "
                            f"got ({bias.dtype}, {bias.device})")
    if keep is not None:
        check_tensor("keep", keep, ndim=1, dtypes=(torch.bool,), what="[N]")
        if keep.shape[0] != n:
            raise ValueError(f"keep must have shape [N]=[{n}], got {tuple(keep.shape)}")


def check_logit_options(logit_softcap: float | None, logit_scale: float | None, chunk_size: int | None) -> None:
    """The options every fused-linear op shares: soft-cap (> 0), logit scale (non-zero), rows per chunk (> 0)."""
    if logit_softcap is not None and not (isinstance(logit_softcap, (int, float)) and logit_softcap > 0
                                          and math.isfinite(logit_softcap)):
        raise ValueError(f"logit_softcap must be None or a finite float > 0, got {logit_softcap!r}")
    if logit_scale is not None and not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale)
                                        and logit_scale != 0):
        raise ValueError(f"logit_scale must be None or a finite non-zero float, got {logit_scale!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be None or an int > 0, got {chunk_size!r}")


def linear_grad_mask(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> int:
    """Which of hidden / weight / bias need a gradient (bits 1, 2, 4; 0 under ``no_grad``): what the ops' backward
    computes."""
    if not torch.is_grad_enabled():
        return 0
    return (GRAD_HIDDEN if hidden.requires_grad else 0) | (GRAD_WEIGHT if weight.requires_grad else 0) | \
        (GRAD_BIAS if bias is not None and bias.requires_grad else 0)


def reference_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     logit_scale: float | None, logit_softcap: float | None,
                     compute_dtype: torch.dtype) -> torch.Tensor:
    """The full ``[N, V]`` logits as the reference implementations (the specs) define them: the matmul in the input
    dtype, then the upcast, the logit scale and the soft-cap."""
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(compute_dtype)
    if logit_scale is not None:
        z = z * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    return z


def resolve_impl_traced(impl: str, device: torch.device) -> str:
    """:func:`resolve_impl` that also works while ``torch.compile`` traces the caller: there ``find_spec`` and device
    queries are not traceable, so the choice is evaluated eagerly and baked into the graph as a constant."""
    if torch.compiler.is_compiling():
        from ._compile_support import resolve_impl_constant

        return resolve_impl_constant(impl, str(device))
    return resolve_impl(impl, device)
