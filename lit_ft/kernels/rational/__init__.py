"""Safe Padé activation unit (PAU, Molina et al. 2020, ``ml-research/pau``): the learned activation of IAPT.

``R(x) = P(x) / (1 + |S(x)|)``, ``P(x) = sum_{j=0..m} a_j x^j``, ``S(x) = sum_{k=1..n} b_k x^k``, elementwise over
any shape. The public entry is :func:`rational`; it validates its arguments, resolves ``impl`` and calls the
``torch.library`` custom op ``lit_ft::rational`` whose backward is ``lit_ft::rational_backward`` (closed form:
elementwise ``dR/dx`` plus the coefficient gradients reduced over all elements). :func:`gelu_coefficients` gives
coefficients approximating GELU. Triton is imported only when the Triton path actually runs.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._common import resolve_impl, resolve_impl_traced, triton_runnable
from . import torch_impl
from .reference import rational_reference

__all__ = ["rational", "gelu_coefficients", "rational_reference", "resolve_impl", "triton_runnable",
           "GELU_NUMERATOR_5_4", "GELU_DENOMINATOR_5_4"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# GELU fit for (m, n) = (5, 4), fitted offline in float64: minimax (L^p with p up to 64, LBFGS) of
# |R(x) - gelu(x)| on a dense grid of [-8, 8], with the structure R(x) = x/2 + E(x) (E even), i.e. a_1 = 1/2,
# a_3 = b_2 / 2, a_5 = b_4 / 2, b_1 = b_3 = 0 -- the same identity gelu(x) - gelu(-x) = x that GELU satisfies.
# b_2, b_4 > 0, so S(x) >= 0 with its only zero at x = 0 (no kink of |S| anywhere else) and R(x) ~ x/2 + a_4/b_4
# (a_4/b_4 ~ 11) far outside the fitted range: no pole or sign flip, but no longer GELU-like beyond |x| ~ 8.
# Max |R - gelu| = 3.38e-3 on [-3, 3] and on [-8, 8] (fp64 and fp32).
GELU_NUMERATOR_5_4 = (-0.003376451366477564, 0.5, 0.4189380230655024, 0.12525819618516984, 0.01586271189129113,
                      0.0007204498057845268)
GELU_DENOMINATOR_5_4 = (0.0, 0.2505163923703397, 0.0, 0.0014408996115690537)


def gelu_coefficients(m: int = 5, n: int = 4) -> Tuple[Tensor, Tensor]:
    """Coefficients ``(numerator [m+1], denominator [n])`` (fresh fp32 CPU tensors) with ``R(x) ~= gelu(x)``.

    Only ``(m, n) = (5, 4)`` (the PAU default, used by IAPT) is tabulated: max ``|R(x) - gelu(x)|`` = 3.4e-3 on
    ``[-8, 8]``; other degrees raise ``NotImplementedError`` (fit them offline the way the constants' comment says).
    """
    if (m, n) != (5, 4):
        raise NotImplementedError(f"gelu_coefficients only has the (m, n) = (5, 4) fit, got (m, n) = ({m}, {n})")
    return (torch.tensor(GELU_NUMERATOR_5_4, dtype=torch.float32),
            torch.tensor(GELU_DENOMINATOR_5_4, dtype=torch.float32))


def _forward(impl: str, x, numerator, denominator):
    if impl == "triton":
        from . import triton_impl  # imports triton lazily

        return triton_impl.forward(x, numerator, denominator)
    return torch_impl.forward(x, numerator, denominator)


# ----------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("lit_ft::rational", mutates_args=())
def _rational(x: Tensor, numerator: Tensor, denominator: Tensor, impl: str) -> Tensor:
    # generic fallback (any device): the torch path
    return torch_impl.forward(x, numerator, denominator)


@_rational.register_kernel("cpu")
def _rational_cpu(x, numerator, denominator, impl):
    return torch_impl.forward(x, numerator, denominator)


@_rational.register_kernel("cuda")
def _rational_cuda(x, numerator, denominator, impl):
    return _forward(impl, x, numerator, denominator)


@_rational.register_fake
def _rational_fake(x, numerator, denominator, impl):
    return torch.empty_like(x)


@torch.library.custom_op("lit_ft::rational_backward", mutates_args=())
def _rational_backward(grad: Tensor, x: Tensor, numerator: Tensor, denominator: Tensor, impl: str, need_x: bool,
                       need_a: bool, need_b: bool) -> Tuple[Tensor, Tensor, Tensor]:
    if impl == "triton" and x.device.type == "cuda":
        from . import triton_impl

        gx, ga, gb = triton_impl.backward(grad, x, numerator, denominator, need_x, need_a, need_b)
    else:
        gx, ga, gb = torch_impl.backward(grad, x, numerator, denominator, need_x, need_a, need_b)
    # unrequested gradients come back as empty tensors (custom ops cannot return None)
    return (gx if gx is not None else x.new_empty((0,)),
            ga if ga is not None else numerator.new_empty((0,)),
            gb if gb is not None else denominator.new_empty((0,)))


@_rational_backward.register_fake
def _rational_backward_fake(grad, x, numerator, denominator, impl, need_x, need_a, need_b):
    return (torch.empty_like(x) if need_x else x.new_empty((0,)),
            numerator.new_empty(numerator.shape if need_a else (0,)),
            denominator.new_empty(denominator.shape if need_b else (0,)))


def _setup_context(ctx, inputs, output):
    x, numerator, denominator, impl = inputs
    ctx.save_for_backward(x, numerator, denominator)
    ctx.impl = impl


def _backward(ctx, grad):
    x, numerator, denominator = ctx.saved_tensors
    need_x, need_a, need_b = ctx.needs_input_grad[:3]
    if not (need_x or need_a or need_b):
        return None, None, None, None
    gx, ga, gb = _rational_backward(grad.contiguous(), x, numerator, denominator, ctx.impl, need_x, need_a, need_b)
    return gx if need_x else None, ga if need_a else None, gb if need_b else None, None


_rational.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public wrapper


def rational(x: Tensor, numerator: Tensor, denominator: Tensor, impl: str = "auto") -> Tensor:
    """Safe Padé activation ``R(x) = P(x) / (1 + |S(x)|)``, elementwise.

    Args:
        x: input of any shape (fp16/bf16/fp32/fp64).
        numerator: ``[m+1]`` coefficients ``a_0..a_m`` of ``P(x) = sum_j a_j x^j`` (low order first).
        denominator: ``[n]`` coefficients ``b_1..b_n`` of ``S(x) = sum_k b_k x^k`` (no constant term).
            Both coefficient tensors: fp32 or ``x.dtype``, the same dtype, on ``x``'s device.
        impl: ``"auto"`` (Triton on CUDA with compute capability >= 8.0, else torch; env ``LIT_FT_IMPL``
            overrides), ``"torch"`` or ``"triton"`` (raises when it cannot run).

    Returns:
        ``R(x)`` with ``x``'s shape and dtype, computed in fp32 (fp64 for fp64 inputs). Gradients flow into ``x``
        and both coefficient tensors (``d|S|/dS = sign(S)``, with ``sign(0) = 0`` at the kink). Start from
        :func:`gelu_coefficients` for a GELU-like activation.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be a floating tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    for name, c in (("numerator", numerator), ("denominator", denominator)):
        if not isinstance(c, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(c).__name__}")
        if c.dim() != 1 or c.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty 1-D coefficient tensor "
                             f"({'[m+1]' if name == 'numerator' else '[n]'}), got shape {tuple(c.shape)}")
        if c.dtype not in (torch.float32, x.dtype):
            raise TypeError(f"{name} must be float32 or x's dtype ({x.dtype}), got {c.dtype}")
        if c.device != x.device:
            raise ValueError(f"{name} is on {c.device} but x is on {x.device}")
    if numerator.dtype != denominator.dtype:
        raise TypeError(f"numerator and denominator must have the same dtype, got {numerator.dtype} and "
                        f"{denominator.dtype}")
    impl_name = resolve_impl_traced(impl, x.device)
    return _rational(x.contiguous(), numerator.contiguous(), denominator.contiguous(), impl_name)
