"""Fused prompt embedding: frozen-table gather + position-indexed low-rank update (DePT / EPT input embeddings).

``out[b, t] = weight[input_ids[b, t]] + scale * (lora_a[position_ids[b, t]] @ lora_b)`` for positions in
``[0, S)``; other positions get no update. The public entry is :func:`prompt_embed`. It validates its arguments,
resolves ``impl`` and calls the ``torch.library`` custom op ``lit_ft::prompt_embed``, whose backward is
``lit_ft::prompt_embed_backward`` (per-position reduction of the upstream gradient first, then two small GEMMs).
Only the position ids and the two LoRA factors are saved for backward: never a ``[B, T, D]`` or ``[B, S, D]``
tensor. Triton is imported only when the Triton path actually runs.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .._common import resolve_impl, resolve_impl_traced, triton_runnable
from . import torch_impl
from .reference import prompt_embed_reference, prompt_embed_repeat_reference

__all__ = ["prompt_embed", "prompt_embed_reference", "prompt_embed_repeat_reference", "resolve_impl",
           "triton_runnable"]

INDEX_DTYPES = (torch.int64, torch.int32)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _forward(impl: str, input_ids, weight, position_ids, lora_a, lora_b, scale):
    if impl == "triton":
        from . import triton_impl  # imports triton lazily

        return triton_impl.forward(input_ids, weight, position_ids, lora_a, lora_b, scale)
    return torch_impl.forward(input_ids, weight, position_ids, lora_a, lora_b, scale)


def _backward_impl(impl: str, grad_out, position_ids, lora_a, lora_b, scale, need_a, need_b):
    if impl == "triton":
        from . import triton_impl

        return triton_impl.backward(grad_out, position_ids, lora_a, lora_b, scale, need_a, need_b)
    return torch_impl.backward(grad_out, position_ids, lora_a, lora_b, scale, need_a, need_b)


# ----------------------------------------------------------------------------------------------------------------
# custom ops


@torch.library.custom_op("lit_ft::prompt_embed", mutates_args=())
def _prompt_embed(input_ids: Tensor, weight: Tensor, position_ids: Tensor, lora_a: Tensor, lora_b: Tensor,
                  scale: float, impl: str) -> Tensor:
    # generic fallback (any device): the torch path
    return torch_impl.forward(input_ids, weight, position_ids, lora_a, lora_b, scale)


@_prompt_embed.register_kernel("cpu")
def _prompt_embed_cpu(input_ids, weight, position_ids, lora_a, lora_b, scale, impl):
    return torch_impl.forward(input_ids, weight, position_ids, lora_a, lora_b, scale)


@_prompt_embed.register_kernel("cuda")
def _prompt_embed_cuda(input_ids, weight, position_ids, lora_a, lora_b, scale, impl):
    return _forward(impl, input_ids, weight, position_ids, lora_a, lora_b, scale)


@_prompt_embed.register_fake
def _prompt_embed_fake(input_ids, weight, position_ids, lora_a, lora_b, scale, impl):
    return weight.new_empty((*input_ids.shape, weight.shape[1]))


@torch.library.custom_op("lit_ft::prompt_embed_backward", mutates_args=())
def _prompt_embed_backward(grad_out: Tensor, position_ids: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                           impl: str, need_a: bool, need_b: bool) -> Tuple[Tensor, Tensor]:
    ga, gb = _backward_impl(impl if grad_out.device.type == "cuda" else "torch", grad_out, position_ids, lora_a,
                            lora_b, scale, need_a, need_b)
    # unrequested gradients come back as empty tensors (custom ops cannot return None)
    return (ga if ga is not None else lora_a.new_empty((0,)), gb if gb is not None else lora_b.new_empty((0,)))


@_prompt_embed_backward.register_fake
def _prompt_embed_backward_fake(grad_out, position_ids, lora_a, lora_b, scale, impl, need_a, need_b):
    return (lora_a.new_empty(lora_a.shape if need_a else (0,)), lora_b.new_empty(lora_b.shape if need_b else (0,)))


def _setup_context(ctx, inputs, output):
    input_ids, weight, position_ids, lora_a, lora_b, scale, impl = inputs
    ctx.save_for_backward(position_ids, lora_a, lora_b)  # ids, positions and the LoRA factors only
    ctx.args = (scale, impl)


def _backward(ctx, grad_out):
    position_ids, lora_a, lora_b = ctx.saved_tensors
    need_a, need_b = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    ga = gb = None
    if need_a or need_b:
        scale, impl = ctx.args
        ga, gb = _prompt_embed_backward(grad_out.contiguous(), position_ids, lora_a, lora_b, scale, impl, need_a,
                                        need_b)
    return None, None, None, ga if need_a else None, gb if need_b else None, None, None


_prompt_embed.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# public wrapper


def _check(name, t, *, ndim, dtypes, what):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({allowed}), got {t.dtype}")


def prompt_embed(input_ids: Tensor, weight: Tensor, position_ids: Tensor, lora_a: Tensor, lora_b: Tensor,
                 scale: float, impl: str = "auto") -> Tensor:
    """Frozen embedding gather plus a position-indexed low-rank update, without any batch repeat.

    ``out[b, t] = weight[input_ids[b, t]] + scale * (lora_a[position_ids[b, t]] @ lora_b)`` when
    ``0 <= position_ids[b, t] < S``; tokens at other positions (negative, or ``>= S`` = beyond DePT's
    ``max_length``) get the plain embedding row. The low-rank term is computed in fp32 (fp64 if any input is fp64)
    and the sum is cast to ``weight.dtype``. Gradients flow into ``lora_a`` / ``lora_b`` only (the table is frozen);
    backward reduces the upstream gradient over tokens sharing a position first (``G: [S, D]``), then
    ``dA = scale * G @ lora_b^T`` and ``dB = scale * lora_a^T @ G``.

    Args:
        input_ids: ``[B, T]`` int64 (or int32) token ids in ``[0, V)``.
        weight: ``[V, D]`` frozen embedding table (fp16/bf16/fp32/fp64). Must not require grad while grad mode is
            on: the op never produces ``dweight`` (DePT freezes the table) and raises instead of silently dropping it.
        position_ids: ``[B, T]`` (or ``[1, T]``, broadcast over the batch) int64/int32 positions indexing ``lora_a``.
        lora_a: ``[S, r]`` per-position low-rank factor (float, same dtype as ``lora_b``, same device as ``weight``).
        lora_b: ``[r, D]``.
        scale: the LoRA scale (DePT: ``lora_alpha / sqrt(r)``).
        impl: ``"auto"`` (Triton on CUDA with compute capability >= 8.0, else torch; env ``LIT_FT_IMPL``
            overrides), ``"torch"`` or ``"triton"`` (raises when it cannot run).

    Returns:
        ``[B, T, D]`` in ``weight.dtype``.

    Ids outside ``[0, V)`` raise a ``ValueError`` in eager mode (this check reads one flag from the device; it is
    skipped under ``torch.compile``, where the torch path raises an indexing error and the Triton path writes NaN
    rows for such ids).
    """
    _check("input_ids", input_ids, ndim=2, dtypes=INDEX_DTYPES, what="[B, T]")
    _check("weight", weight, ndim=2, dtypes=FLOAT_DTYPES, what="[V, D] (the embedding table)")
    _check("position_ids", position_ids, ndim=2, dtypes=INDEX_DTYPES, what="[B, T] or [1, T]")
    _check("lora_a", lora_a, ndim=2, dtypes=FLOAT_DTYPES, what="[S, r]")
    _check("lora_b", lora_b, ndim=2, dtypes=FLOAT_DTYPES, what="[r, D]")
    b, t = input_ids.shape
    v, d = weight.shape
    s, r = lora_a.shape
    if v == 0 or d == 0:
        raise ValueError(f"weight must be a non-empty [V, D] table, got shape {tuple(weight.shape)}")
    if s == 0 or r == 0:
        raise ValueError(f"lora_a must be [S, r] with S >= 1 and r >= 1, got shape {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (r, d):
        raise ValueError(f"lora_b must be [r, D] = [{r}, {d}] (r from lora_a, D from weight), got shape "
                         f"{tuple(lora_b.shape)}")
    if lora_a.dtype != lora_b.dtype:
        raise TypeError(f"lora_a and lora_b must have the same dtype, got {lora_a.dtype} and {lora_b.dtype}")
    if position_ids.shape[1] != t or position_ids.shape[0] not in (1, b):
        raise ValueError(f"position_ids must be [B, T] = [{b}, {t}] or [1, {t}] to match input_ids, got shape "
                         f"{tuple(position_ids.shape)}")
    for name, x in (("input_ids", input_ids), ("position_ids", position_ids), ("lora_a", lora_a),
                    ("lora_b", lora_b)):
        if x.device != weight.device:
            raise ValueError(f"{name} is on {x.device} but weight is on {weight.device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("prompt_embed treats the embedding table as frozen (it never computes a gradient for "
                         "weight), but weight.requires_grad is True: pass weight.detach() or freeze the table")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float, got {type(scale).__name__}")
    impl_name = resolve_impl_traced(impl, weight.device)
    # on CPU the check is free; on an accelerator it would be a host sync per call (lit-ft's kernels never synchronise with the host inside an op), so
    # there an out-of-range id gives an indexing error (torch) or NaN rows (Triton) instead; not while tracing
    if not torch.compiler.is_compiling() and weight.device.type == "cpu" and input_ids.numel():
        if bool(((input_ids < 0) | (input_ids >= v)).any()):
            bad = input_ids[(input_ids < 0) | (input_ids >= v)][0].item()
            raise ValueError(f"input_ids must be in [0, V) = [0, {v}) (the embedding table's rows), got {bad}")
    if position_ids.shape[0] != b:
        position_ids = position_ids.expand(b, t)
    return _prompt_embed(input_ids.contiguous(), weight, position_ids.contiguous(), lora_a, lora_b, float(scale),
                         impl_name)
