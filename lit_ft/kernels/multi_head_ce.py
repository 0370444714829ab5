"""Multi-head shared-unembedding cross-entropy: ``K`` heads' hidden states, one lm_head, one fused pass.

CAFT's auxiliary heads (``lit_ft.callbacks.objectives.MultiTokenHeads``) each produce hidden states ``[N, D]`` that
the *shared* lm_head turns into logits over the vocabulary; head ``k`` is scored against its own targets. The
authors' code stacks every head's logits into one ``[K, B, T, V]`` tensor. Here the ``K`` heads' rows are laid end
to end (``[K·N, D]``, a copy of ``K·N·D`` elements) and go through the fused linear cross-entropy op
(:func:`lit_ft.kernels.fused_linear_token_ce`, the ``lit_ft::token_ce`` custom op) in **one** call: it walks row
chunks of ``[c, V]`` logits across all heads, computes every head's loss and the gradients of the hidden states
and of the lm_head in the same pass, and never builds ``[N, V]`` or ``[K, N, V]`` logits. Each head's
coefficient rides in the per-row weights, so the returned total is already ``Σ_k scale_k · Σ_t w_kt · ℓ_kt``;
the per-head sums (detached) come from the op's per-row NLL. On CUDA the op runs its Triton path; everywhere else
its chunked torch path. Measured memory: ``docs/techniques/multi_token_heads.md``.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["MultiHeadCE", "multi_head_ce", "multi_head_ce_reference"]


class MultiHeadCE(NamedTuple):
    """``loss``: 0-dim ``Σ_k scale_k · Σ_t w_kt · ℓ_kt`` (differentiable). ``per_head``: ``[K]`` detached
    ``Σ_t w_kt · ℓ_kt`` of each head (no ``scale_k``), float32 (fp64 for fp64 inputs)."""

    loss: Tensor
    per_head: Tensor


def _stack(head_hidden: Union[Tensor, Sequence[Tensor]]) -> Tensor:
    if isinstance(head_hidden, Tensor):
        if head_hidden.dim() != 3:
            raise ValueError(f"head_hidden must be [K, N, D], got shape {tuple(head_hidden.shape)}")
        return head_hidden
    if not head_hidden:
        raise ValueError("head_hidden must hold at least one head's [N, D] hidden states")
    return torch.stack(list(head_hidden))


def _checked(head_hidden: Tensor, targets: Tensor, token_weights: Optional[Tensor], keep: Optional[Tensor],
             head_scale: Union[Tensor, Sequence[float]]) -> Tensor:
    k, n, _ = head_hidden.shape
    if targets.shape != (k, n):
        raise ValueError(f"targets must be [K, N]=[{k}, {n}] like head_hidden's first two dims, got "
                         f"{tuple(targets.shape)}")
    for name, t in (("token_weights", token_weights), ("keep", keep)):
        if t is not None and t.shape != (k, n):
            raise ValueError(f"{name} must be [K, N]=[{k}, {n}], got {tuple(t.shape)}")
    if not isinstance(head_scale, Tensor):  # numbers: checked here (a tensor is trusted, no host read)
        values = [float(x) for x in head_scale]
        if not all(math.isfinite(x) for x in values):
            raise ValueError(f"head_scale must be finite numbers, got {values}")
        head_scale = torch.tensor(values, dtype=torch.float64)
    scale = head_scale.detach().reshape(-1)
    if scale.shape[0] != k:
        raise ValueError(f"head_scale must hold K={k} numbers (one per head), got {scale.shape[0]}")
    return scale


def multi_head_ce(
    head_hidden: Union[Tensor, Sequence[Tensor]],
    weight: Tensor,
    targets: Tensor,
    head_scale: Union[Tensor, Sequence[float]],
    *,
    token_weights: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
) -> MultiHeadCE:
    """``Σ_k scale_k · Σ_t w_kt · CE(head_hidden[k, t] @ weight.T, targets[k, t])`` in one fused pass.

    Args:
        head_hidden: ``[K, N, D]`` (or a list of ``K`` ``[N, D]``) hidden states of the heads; may require grad.
        weight: ``[V, D]`` shared lm_head matrix (same dtype/device); gets a gradient when it requires one.
        targets: ``[K, N]`` int64 targets of each head, ``ignore_index`` where no loss is taken.
        head_scale: ``K`` numbers (list or tensor, no gradient): head ``k``'s coefficient in the total.
        token_weights: optional float ``[K, N]`` per-token weights (no gradient).
        keep: optional bool ``[K, N]``: ``False`` rows are packed out before the matmuls.
        bias, ignore_index, logit_softcap, logit_scale, chunk_size, impl: as in
            :func:`lit_ft.kernels.fused_linear_token_ce` (``chunk_size`` counts rows across all heads).

    Returns:
        :class:`MultiHeadCE` ``(loss, per_head)``.
    """
    from lit_ft.kernels import fused_linear_token_ce

    h = _stack(head_hidden)
    scale = _checked(h, targets, token_weights, keep, head_scale)
    k, n, d = h.shape
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    w = scale.to(device=h.device, dtype=acc)[:, None].expand(k, n)
    if token_weights is not None:
        w = w * token_weights.to(device=h.device, dtype=acc)
    out = fused_linear_token_ce(
        h.reshape(k * n, d), weight, targets.reshape(k * n).to(h.device), bias=bias, token_weights=w.reshape(k * n),
        keep=None if keep is None else keep.reshape(k * n), ignore_index=ignore_index, reduction="sum",
        return_nll=True, logit_softcap=logit_softcap, logit_scale=logit_scale, chunk_size=chunk_size, impl=impl,
    )
    nll = out.nll.reshape(k, n).to(acc)
    counted = targets.to(h.device) != ignore_index
    if keep is not None:
        counted = counted & keep.to(h.device)
    per_tok = nll if token_weights is None else nll * token_weights.to(device=h.device, dtype=acc)
    per_head = torch.where(counted, per_tok, torch.zeros((), dtype=acc, device=h.device)).sum(1)
    return MultiHeadCE(out.loss, per_head.detach())


def multi_head_ce_reference(
    head_hidden: Union[Tensor, Sequence[Tensor]],
    weight: Tensor,
    targets: Tensor,
    head_scale: Union[Tensor, Sequence[float]],
    *,
    token_weights: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    compute_dtype: Optional[torch.dtype] = None,
) -> MultiHeadCE:
    """The authors' formulation, for tests and the memory benchmark: the stacked ``[K, N, V]`` logits, one
    cross-entropy per head, summed with the head scales. Plain autograd; builds every head's full logits."""
    h = _stack(head_hidden)
    scale = _checked(h, targets, token_weights, keep, head_scale)
    acc = compute_dtype or (torch.float64 if h.dtype == torch.float64 else torch.float32)
    logits = F.linear(h, weight, bias).to(acc)  # [K, N, V]
    k, n, v = logits.shape
    t = targets.to(h.device)
    ce = F.cross_entropy(logits.reshape(k * n, v), t.reshape(k * n).clamp_min(0), reduction="none").reshape(k, n)
    counted = t != ignore_index
    if keep is not None:
        counted = counted & keep.to(h.device)
    if token_weights is not None:
        ce = ce * token_weights.to(device=h.device, dtype=acc)
    per_head = torch.where(counted, ce, torch.zeros((), dtype=acc, device=h.device)).sum(1)
    loss = (per_head * scale.to(device=h.device, dtype=acc)).sum()
    return MultiHeadCE(loss, per_head.detach())
