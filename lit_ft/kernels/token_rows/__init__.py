"""Token-row ops for layer-wise token elimination (LeMo): gather the kept tokens' rows before a layer, merge the
layer's output rows back into the full residual stream after it.

* :func:`gather_rows` ``(x [B, T, D], index [B, k]) -> [B, k, D]``: ``out[b, j] = x[b, index[b, j]]`` (rows in
  ``index`` order: pass a sorted index to keep sequence order).
* :func:`merge_rows` ``(base [B, T, D], rows [B, k, D], index [B, k]) -> [B, T, D]``: ``base`` with row
  ``index[b, j]`` replaced by ``rows[b, j]``; eliminated tokens pass through unchanged.

Both call ``torch.library`` custom ops (``lit_ft::gather_rows``, ``lit_ft::merge_rows``; backward ops
``lit_ft::scatter_rows`` and ``lit_ft::zero_rows``) whose autograd saves **only the index**: never a
``[B, T, D]`` or ``[B, k, D]`` tensor. Every op is differentiable (double backward works), passes
``torch.library.opcheck`` and traces under ``torch.compile(fullgraph=True)``. Triton is imported only when the
Triton path runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._common import FLOAT_DTYPES, check_tensor, resolve_impl, resolve_impl_traced, triton_runnable
from . import torch_impl
from .reference import gather_rows_reference, merge_rows_reference

__all__ = ["gather_rows", "merge_rows", "gather_rows_reference", "merge_rows_reference", "resolve_impl",
           "triton_runnable"]

INDEX_DTYPES = (torch.int64, torch.int32)


def _path(impl: str, device: torch.device):
    """The module that implements the ops for ``impl`` on ``device`` (Triton imported only here)."""
    if impl == "triton" and device.type == "cuda":
        from . import triton_impl

        return triton_impl
    return torch_impl


# ----------------------------------------------------------------------------------------------------------------
# custom ops: forward ops and the two backward-only ops; each one's gradient is another of these ops, so autograd
# never saves more than the index


@torch.library.custom_op("lit_ft::gather_rows", mutates_args=())
def _gather_rows(x: Tensor, index: Tensor, impl: str) -> Tensor:
    return _path(impl, x.device).gather_rows(x, index)


@_gather_rows.register_fake
def _gather_rows_fake(x, index, impl):
    return x.new_empty((x.shape[0], index.shape[1], x.shape[2]))


@torch.library.custom_op("lit_ft::scatter_rows", mutates_args=())
def _scatter_rows(rows: Tensor, index: Tensor, t: int, impl: str) -> Tensor:
    return _path(impl, rows.device).scatter_rows(rows, index, t)


@_scatter_rows.register_fake
def _scatter_rows_fake(rows, index, t, impl):
    return rows.new_empty((rows.shape[0], t, rows.shape[2]))


@torch.library.custom_op("lit_ft::merge_rows", mutates_args=())
def _merge_rows(base: Tensor, rows: Tensor, index: Tensor, impl: str) -> Tensor:
    return _path(impl, base.device).merge_rows(base, rows, index)


@_merge_rows.register_fake
def _merge_rows_fake(base, rows, index, impl):
    return base.new_empty(base.shape)


@torch.library.custom_op("lit_ft::zero_rows", mutates_args=())
def _zero_rows(grad: Tensor, index: Tensor, impl: str) -> Tensor:
    return _path(impl, grad.device).zero_rows(grad, index)


@_zero_rows.register_fake
def _zero_rows_fake(grad, index, impl):
    return grad.new_empty(grad.shape)


def _saves_index(position: int):
    """A ``setup_context`` that keeps the op's index input (at ``position``) and its ``impl`` (the last input)."""

    def setup(ctx, inputs, output):
        ctx.save_for_backward(inputs[position])  # the only tensor kept for backward
        ctx.impl = inputs[-1]
        ctx.t = inputs[0].shape[1]  # T of a [B, T, D] input (used by gather's backward)

    return setup


def _gather_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _scatter_rows(grad, index, ctx.t, ctx.impl), None, None


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _gather_rows(grad, index, ctx.impl), None, None, None


def _merge_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    need_base, need_rows = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    g_base = _zero_rows(grad, index, ctx.impl) if need_base else None
    g_rows = _gather_rows(grad, index, ctx.impl) if need_rows else None
    return g_base, g_rows, None, None


def _zero_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return _zero_rows(grad, index, ctx.impl), None, None


_gather_rows.register_autograd(_gather_backward, setup_context=_saves_index(1))
_scatter_rows.register_autograd(_scatter_backward, setup_context=_saves_index(1))
_merge_rows.register_autograd(_merge_backward, setup_context=_saves_index(2))
_zero_rows.register_autograd(_zero_backward, setup_context=_saves_index(1))


# ----------------------------------------------------------------------------------------------------------------
# public wrappers


def _check_index(index: Tensor, x: Tensor, x_name: str) -> None:
    """``index`` ``[B, k]`` int64/int32 on ``x``'s device; on CPU in eager mode also its values: in ``[0, T)`` and
    distinct within each batch row."""
    check_tensor("index", index, ndim=2, dtypes=INDEX_DTYPES, what="[B, k]")
    b, t = x.shape[0], x.shape[1]
    if index.shape[0] != b:
        raise ValueError(f"index must be [B, k] with B={b} ({x_name}'s batch size), got shape {tuple(index.shape)}")
    if index.device != x.device:
        raise ValueError(f"index is on {index.device} but {x_name} is on {x.device}")
    # on CPU the value checks are cheap; on an accelerator they would be a host sync per call (lit-ft's kernels
    # never synchronise inside an op), and they cannot be traced: skipped there (Triton then writes NaN rows for an
    # out-of-range gather and skips an out-of-range write; the torch path raises an indexing error)
    if torch.compiler.is_compiling() or index.device.type != "cpu" or index.numel() == 0:
        return
    bad = (index < 0) | (index >= t)
    if bool(bad.any()):
        raise ValueError(f"index must be in [0, T) = [0, {t}) (the token rows of {x_name}), got "
                         f"{index[bad][0].item()}")
    srt = index.sort(dim=1).values
    dup = srt[:, 1:] == srt[:, :-1]
    if bool(dup.any()):
        row, col = (int(i) for i in dup.nonzero()[0])
        raise ValueError(f"index must hold distinct token positions within each batch row (gradients would need "
                         f"atomics otherwise), got {srt[row, col].item()} twice in batch row {row}")


def gather_rows(x: Tensor, index: Tensor, impl: str = "auto") -> Tensor:
    """The kept tokens' rows: ``out[b, j] = x[b, index[b, j]]``.

    Args:
        x: ``[B, T, D]`` hidden states (fp16/bf16/fp32/fp64, any strides).
        index: ``[B, k]`` int64/int32 token positions in ``[0, T)``, **distinct within each batch row**, on ``x``'s
            device. The output keeps ``index``'s order: sort it to keep sequence order.
        impl: ``"auto"`` (Triton on CUDA with compute capability >= 8.0, else torch; env ``LIT_FT_IMPL``
            overrides), ``"torch"`` or ``"triton"`` (raises when it cannot run).

    Returns:
        ``[B, k, D]`` in ``x.dtype`` (a new contiguous tensor). Backward: ``grad_x`` = zeros with rows ``index``
        set from the upstream gradient; only ``index`` is saved.

    Values of ``index`` are checked (range, no duplicates) on CPU in eager mode only: on CUDA it would be a host
    sync per call, and under ``torch.compile`` it cannot be traced.
    """
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES, what="[B, T, D]")
    _check_index(index, x, "x")
    impl_name = resolve_impl_traced(impl, x.device)
    return _gather_rows(x, index.contiguous(), impl_name)


def merge_rows(base: Tensor, rows: Tensor, index: Tensor, impl: str = "auto") -> Tensor:
    """The full residual stream after a layer that ran on the kept tokens only: ``base`` with row ``index[b, j]``
    replaced by ``rows[b, j]``; every other row (an eliminated token) is ``base``'s.

    Args:
        base: ``[B, T, D]`` the stream before the layer (fp16/bf16/fp32/fp64).
        rows: ``[B, k, D]`` the layer's output for the kept tokens; same dtype and device as ``base``.
        index: ``[B, k]`` int64/int32 positions in ``[0, T)``, distinct within each batch row (as for
            :func:`gather_rows`).
        impl: as for :func:`gather_rows`.

    Returns:
        A new ``[B, T, D]`` in ``base.dtype``. Backward: ``grad_base`` = the upstream gradient with rows ``index``
        zeroed, ``grad_rows`` = its rows at ``index``; only ``index`` is saved.
    """
    check_tensor("base", base, ndim=3, dtypes=FLOAT_DTYPES, what="[B, T, D]")
    check_tensor("rows", rows, ndim=3, what="[B, k, D]")
    _check_index(index, base, "base")
    b, _, d = base.shape
    k = index.shape[1]
    if tuple(rows.shape) != (b, k, d):
        raise ValueError(f"rows must be [B, k, D] = [{b}, {k}, {d}] (B, D from base, k from index), got shape "
                         f"{tuple(rows.shape)}")
    if rows.dtype != base.dtype:
        raise TypeError(f"rows dtype {rows.dtype} must equal base dtype {base.dtype}")
    if rows.device != base.device:
        raise ValueError(f"rows is on {rows.device} but base is on {base.device}")
    impl_name = resolve_impl_traced(impl, base.device)
    return _merge_rows(base, rows, index.contiguous(), impl_name)
