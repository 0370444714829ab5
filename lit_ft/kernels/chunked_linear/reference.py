"""Reference semantics of the chunked fused-linear loss: the full ``[N, V]`` logits, one ``chunk_fn`` call.

This is the spec the chunked path is tested against; it builds the whole logits matrix, so it is for tests only.
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch
from torch import Tensor

from .._common import reference_logits

from ..token_ce.torch_impl import acc_dtype


def chunked_linear_loss_reference(
    hidden: Tensor,
    weight: Tensor,
    chunk_fn: Callable[..., Tensor],
    rows: Optional[Mapping[str, Tensor]] = None,
    *,
    bias: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
    logit_scale: Optional[float] = None,
    logit_softcap: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> Tensor:
    """``chunk_fn(logits[keep], **{k: r[keep]})`` with ``logits = cap(scale · (hidden @ weight.T + bias))``.

    The matmul runs in the input dtype (as an unfused model's lm_head does); the result is cast to
    ``compute_dtype`` (default: fp64 for fp64 inputs, else fp32), multiplied by ``logit_scale``, then soft-capped
    ``c · tanh(z / c)`` with ``c = logit_softcap``. Rows where ``keep`` is False are removed before ``chunk_fn``.
    With no kept row ``chunk_fn`` is not called and the result is a graph-connected zero. Differentiable with
    plain autograd (including w.r.t. ``bias``); returns a 0-dim tensor of ``compute_dtype``.
    """
    if compute_dtype is None:
        compute_dtype = acc_dtype(hidden.dtype)
    z = reference_logits(hidden, weight, bias, logit_scale, logit_softcap, compute_dtype)
    row_inputs = {name: r.detach() for name, r in (rows or {}).items()}
    if keep is not None:
        z = z[keep]
        row_inputs = {name: r[keep] for name, r in row_inputs.items()}
    if z.shape[0] == 0:
        return z.sum()  # an empty sum: zero, connected to every input's graph
    return chunk_fn(z, **row_inputs).reshape(()).to(compute_dtype)
