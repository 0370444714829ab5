"""Plain-torch ground truth for the fused linear token cross-entropy (the spec).

It materialises the full ``[N, V]`` logits, so use it only on small shapes (tests) or as documentation of the
semantics. Every other implementation (``torch_impl``, ``triton_impl``) must agree with it; pass fp64 inputs to get
a ground truth for accuracy checks.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._common import reference_logits


class ReferenceOutput(NamedTuple):
    loss: Tensor  # reduced loss (0-dim) or per-token weighted loss [N]
    nll: Tensor  # [N], 0 at not-kept positions
    entropy: Tensor  # [N], 0 at not-kept positions
    lse: Tensor  # [N], 0 at not-kept positions


def kept_mask(labels: Tensor, keep: Optional[Tensor], ignore_index: int) -> Tensor:
    """Tokens that contribute to the loss: ``(labels != ignore_index) & keep``."""
    kept = labels != ignore_index
    if keep is not None:
        kept = kept & keep
    return kept


def out_of_range_labels(labels: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """Bool mask of labels that are neither ``ignore_index`` nor a class in ``[0, vocab)``: a negative label other
    than ``ignore_index`` (which indexing would wrap around to class ``V - 1``) or one ``>= vocab``."""
    return (labels != ignore_index) & ((labels < 0) | (labels >= vocab))


def label_range_message(labels: Tensor, bad: Tensor, ignore_index: int, vocab: int, who: str = "labels") -> str:
    """The error for out-of-range labels (``bad`` from :func:`out_of_range_labels`): names the vocabulary size,
    ``ignore_index``, how many labels are off and the smallest / largest of them (one host read: an error path)."""
    values = labels[bad]
    lo, hi = int(values.min()), int(values.max())
    return (f"{who} must be in [0, V) with V={vocab} (the lm_head's vocabulary size) or equal ignore_index="
            f"{ignore_index}; got {values.numel()} label(s) outside, from {lo} to {hi}. A negative label other than "
            "ignore_index is not ignored (it would index class V - 1); a label >= V means the tokenizer is larger "
            "than the model (resize the model's token embeddings to the tokenizer)")


def token_ce_reference(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Optional[Tensor] = None,
    token_weights: Optional[Tensor] = None,
    keep: Optional[Tensor] = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    normalizer: Optional[Tensor] = None,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    compute_dtype: Optional[torch.dtype] = None,
) -> ReferenceOutput:
    """Reference semantics.

    ``z = hidden @ weight.T (+ bias)``, then ``z *= logit_scale``, then ``z = c * tanh(z / c)`` with
    ``c = logit_softcap``; ``nll_i = logsumexp(z_i) - z_i[y_i]``; loss over kept tokens weighted by ``token_weights``:
    ``sum`` = Σ w_i nll_i, ``mean`` = that sum / ``normalizer`` (or / max(#kept, 1)), ``none`` = w_i nll_i per token.

    ``compute_dtype``: dtype of the softmax math after the matmul (default: fp64 for fp64 inputs, else fp32). Pass
    the input dtype to get "native-dtype plain torch" (what an unfused bf16 model computes).
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    z = reference_logits(hidden, weight, bias, logit_scale, logit_softcap, compute_dtype)
    kept = kept_mask(labels, keep, ignore_index)
    safe = torch.where(kept, labels, torch.zeros_like(labels)).long()
    lse = torch.logsumexp(z, dim=-1)
    nll = lse - z.gather(1, safe[:, None]).squeeze(1)
    p = torch.softmax(z, dim=-1)
    entropy = lse - (p * z).sum(-1)
    zero = torch.zeros((), dtype=compute_dtype, device=z.device)
    nll = torch.where(kept, nll, zero)
    w = token_weights.to(compute_dtype) if token_weights is not None else torch.ones_like(nll)
    per_token = torch.where(kept, w * nll, zero)
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    elif reduction == "mean":
        if normalizer is not None:
            denom = normalizer.to(compute_dtype)
        else:
            denom = kept.sum().clamp(min=1).to(compute_dtype)
        loss = per_token.sum() / denom
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return ReferenceOutput(
        loss,
        nll.detach(),
        torch.where(kept, entropy, zero).detach(),
        torch.where(kept, lse, zero).detach(),
    )
