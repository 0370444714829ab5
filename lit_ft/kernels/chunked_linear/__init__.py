"""Chunked fused-linear base: any per-row objective over ``lm_head`` logits without building ``[N, V]``.

Objectives that need vocabulary-wide work (distillation, multi-token heads, token-level DPO, rollout sampling) hand
:func:`chunked_linear_loss` a per-chunk function of ``[c, V]`` logits; the base does the projection, the chunking,
the keep-packing and the linear backward. See ``docs/kernels/chunked_linear.md``.

No Triton path: the per-chunk function is arbitrary Python (see ``torch_impl``). No ``torch.library`` custom op
either (a Python callable cannot be an op argument): the op is a plain ``torch.autograd.Function`` that runs
eagerly; it is untested under ``torch.compile``.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from .._common import check_bias_and_keep, check_linear_inputs, check_logit_options, linear_grad_mask
from ..token_ce.torch_impl import GRAD_BIAS, GRAD_HIDDEN, GRAD_WEIGHT
from .reference import chunked_linear_loss_reference
from .torch_impl import MODES, ChunkedLinearLossFunction, ChunkSpec, default_chunk_rows, run_chunks

__all__ = ["chunked_linear_loss", "chunked_linear_loss_reference", "default_chunk_rows", "MODES"]


def _checked_rows(rows: Optional[Mapping[str, Tensor]], n: int, device: torch.device) -> dict:
    if rows is None:
        return {}
    if not isinstance(rows, Mapping):
        raise TypeError(f"rows must be None or a mapping of name -> tensor [N, ...], got {type(rows).__name__}")
    checked = {}
    for name, r in rows.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"rows keys must be identifiers (they become chunk_fn keyword arguments), got {name!r}")
        if not isinstance(r, Tensor):
            raise TypeError(f"rows[{name!r}] must be a torch.Tensor, got {type(r).__name__}")
        if r.dim() == 0 or r.shape[0] != n:
            raise ValueError(f"rows[{name!r}] must have shape [N, ...] with N={n} (hidden's rows), "
                             f"got {tuple(r.shape)}")
        checked[name] = r.detach().to(device)
    return checked


def chunked_linear_loss(
    hidden: Tensor,
    weight: Tensor,
    chunk_fn: Callable[..., Tensor],
    rows: Optional[Mapping[str, Tensor]] = None,
    *,
    bias: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
    logit_scale: Optional[float] = None,
    logit_softcap: Optional[float] = None,
    chunk_size: Optional[int] = None,
    mode: str = "forward_grad",
) -> Tensor:
    """``Σ_chunks chunk_fn(logits_c, **rows_c)`` over the kept rows, never materialising ``[N, V]`` logits.

    ``logits_c`` is a float32 (fp64 for fp64 inputs) ``[c, V]`` block ``cap(scale · (hidden_c @ weight.T + bias))``
    with ``cap(z) = softcap · tanh(z / softcap)``; in a call that needs gradients it is a leaf with
    ``requires_grad=True``, and the base takes ``d chunk_fn / d logits`` with ``torch.autograd.grad`` and does the
    linear backward itself (``dh = g @ W``, ``dW += g.T @ h``, ``db += g.sum(0)``; ``dW`` summed in fp32 for
    bf16/fp16 inputs). The result equals :func:`chunked_linear_loss_reference` (one call on the full logits).

    Args:
        hidden: ``[N, D]`` rows (fp16/bf16/fp32/fp64; flatten batch and time first); may or may not require grad.
        weight: ``[V, D]`` lm_head (or tied embedding) matrix, same dtype and device as ``hidden``.
        chunk_fn: ``chunk_fn(logits, **rows) -> Tensor``: the loss **sum** over the chunk's rows, a scalar float
            tensor. It sees only kept rows, at most ``chunk_size`` of them, never an empty chunk. It may return a
            graph-connected zero (an empty selection) or a constant; its value must depend only on its arguments
            (the base calls it again in backward for ``mode="recompute"`` and for a retained graph's repeated
            backward; randomness would differ). ``logits`` may be a reused buffer: copy what you keep after the
            call. Tensors the function closes over get no gradient: only ``logits`` is differentiated.
        rows: optional per-row inputs ``{name: [N, ...]}`` passed to ``chunk_fn`` as keyword arguments, packed and
            sliced like ``hidden`` (e.g. ``labels``, ``teacher_logits``, per-row weights). Detached: never
            differentiated. Moved to ``hidden``'s device.
        bias: optional ``[V]`` lm_head bias (same dtype/device as ``hidden``); gets a gradient if it requires one.
        keep: optional bool ``[N]``; ``False`` rows are packed out before the matmuls (zero gradient, never seen by
            ``chunk_fn``). Packing reads the number of kept rows on the host (``keep.nonzero()``): the op's only
            host sync, absent without ``keep``.
        logit_scale: multiply the logits by this (after the bias, before the softcap); ``None`` = off.
        logit_softcap: ``c`` for ``z -> c · tanh(z / c)``; ``None`` = off.
        chunk_size: rows per chunk; default :func:`default_chunk_rows` (Liger's rule, ``[c, V]`` about the size
            of ``[N, D]``, with a floor of ~32 MB of fp32 logits, at most 1024 rows).
        mode: ``"forward_grad"`` (default): the gradients are computed during forward and held until backward,
            which scales them by the upstream gradient (one pass over the chunks; holds ``[N, D]`` + ``[V, D]``
            gradients between forward and backward). ``"recompute"``: forward computes only the loss, backward
            runs the chunks again (two passes, nothing held).

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 inputs); differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` when
        grad mode is on and any of them requires grad. With no kept row: a graph-connected zero whose gradients
        are zeros. Double backward is not supported.
    """
    n, d, v = check_linear_inputs(hidden, weight)
    if not callable(chunk_fn):
        raise TypeError(f"chunk_fn must be callable (logits, **rows) -> scalar tensor, got {type(chunk_fn).__name__}")
    row_inputs = _checked_rows(rows, n, hidden.device)
    check_bias_and_keep(bias, keep, hidden, n, v)
    check_logit_options(logit_softcap, logit_scale, chunk_size)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")

    kept_index = None
    if keep is not None:
        kept_index = keep.to(hidden.device).nonzero().squeeze(1)  # host sync: the packed size sets the shapes
        if kept_index.shape[0] == n:
            kept_index = None  # every row kept: no gather / scatter copies
        else:
            row_inputs = {name: r.index_select(0, kept_index) for name, r in row_inputs.items()}

    grad_mask = linear_grad_mask(hidden, weight, bias)
    spec = ChunkSpec(chunk_fn=chunk_fn, rows=row_inputs, kept_index=kept_index,
                     scale=float(logit_scale if logit_scale is not None else 1.0),
                     softcap=float(logit_softcap or 0.0), chunk_size=int(chunk_size or 0), mode=mode,
                     grad_mask=grad_mask)
    if grad_mask == 0:  # nothing to differentiate: one pass, no autograd anywhere
        with torch.no_grad():
            return run_chunks(hidden, weight, bias, spec, 0)[0]
    return ChunkedLinearLossFunction.apply(hidden, weight, bias, spec)
