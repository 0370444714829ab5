"""Chunked PyTorch implementation of the fused linear token cross-entropy (the CPU path).

Never materialises the full ``[N, V]`` logits: kept tokens are packed first (so the lm_head matmuls only see
them), then processed in token chunks whose logits are about the size of ``hidden`` (Liger's rule) unless
``chunk_size`` says otherwise. In the same pass it computes loss, NLL, entropy, LSE and, when asked, the gradients
(Liger-style "gradient in forward"): the per-row coefficient (upstream gradient × token weight) is folded into
``dlogits`` before the projections, so per-token weights are exact.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .reference import kept_mask

GRAD_HIDDEN, GRAD_WEIGHT, GRAD_BIAS = 1, 2, 4


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(n: int, vocab: int, dim: int, minimum: int = 1) -> int:
    """Liger's rule: token chunks whose logits are about as large as the hidden states (a power of two)."""
    inc = max(1, -(-vocab // max(dim, 1)))
    chunk = max(1, -(-n // inc))
    chunk = 1 << (chunk - 1).bit_length()
    return max(minimum, chunk)


def row_coefficients(
    kept: Tensor,
    token_weights: Optional[Tensor],
    normalizer: Optional[Tensor],
    reduction: str,
    grad_tokens: Optional[Tensor],
    dtype: torch.dtype,
) -> Optional[Tensor]:
    """d(loss)/d(nll_i) for every token (0 where not kept); None when no gradient is wanted (deferred 'none')."""
    if grad_tokens is not None:
        coef = grad_tokens.to(dtype)
    elif reduction == "mean":
        if normalizer is not None:
            denom = normalizer.to(device=kept.device, dtype=dtype).reshape(())
        else:
            denom = kept.sum().clamp(min=1).to(dtype)
        coef = torch.ones(kept.shape, dtype=dtype, device=kept.device) / denom
    elif reduction == "sum":
        coef = torch.ones(kept.shape, dtype=dtype, device=kept.device)
    else:
        return None
    if token_weights is not None:
        coef = coef * token_weights.to(dtype)
    return coef


def reduce_loss(per_token: Tensor, kept: Tensor, normalizer: Optional[Tensor], reduction: str) -> Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / normalizer.to(device=total.device, dtype=total.dtype).reshape(())
    return total / kept.sum().clamp(min=1).to(total.dtype)


def _softmax_block(z, y, coef, acc, softcap, scale, need_grad, nll_out, ent_out, lse_out):
    """LSE/NLL/entropy of one cache-sized row block of logits ``z``; if ``need_grad``, overwrite ``z`` with
    ``dlogits = (softmax - onehot) * coef`` chained through softcap and scale."""
    zf = z if z.dtype == acc else z.to(acc)  # zf is z itself for fp32/fp64 inputs
    if scale != 1.0:
        zf.mul_(scale)
    t = None
    if softcap != 0.0:
        t = zf.div_(softcap).tanh_()  # zf now holds tanh(z / c)
        zf = t * softcap
    rows = torch.arange(zf.shape[0], device=zf.device)
    m = zf.amax(dim=1, keepdim=True)
    zf.sub_(m)  # shifted logits (shift-invariant quantities below)
    e = torch.exp(zf)
    s = e.sum(dim=1)
    log_s = torch.log(s)
    nll_out.copy_(log_s - zf[rows, y])
    ent_out.copy_(log_s - torch.linalg.vecdot(e, zf) / s)
    lse_out.copy_(m.view(-1) + log_s)
    if not need_grad:
        return
    g = coef * scale if scale != 1.0 else coef
    e.mul_((g / s)[:, None])
    e[rows, y] -= g
    if t is not None:
        e.mul_(t.mul_(t).neg_().add_(1.0))
    z.copy_(e)


def forward_backward(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor],
    token_weights: Optional[Tensor],
    keep: Optional[Tensor],
    normalizer: Optional[Tensor],
    *,
    ignore_index: int,
    reduction: str,
    softcap: float,
    scale: float,
    chunk_size: int,
    grad_mask: int,
    grad_tokens: Optional[Tensor] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, nll, entropy, lse, grad_hidden, grad_weight, grad_bias)``.

    ``grad_mask`` bits (GRAD_HIDDEN | GRAD_WEIGHT | GRAD_BIAS) select the gradients computed here; an unselected
    gradient is returned as an empty tensor. Gradients are those of the returned (reduced) loss, or, when
    ``grad_tokens`` [N] is given, of ``Σ_i grad_tokens_i · w_i · nll_i`` (the backward of ``reduction='none'``).
    ``softcap``/``scale`` of 0.0/1.0 mean off. ``chunk_size`` 0 means the default rule.
    """
    n_tok, dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    acc = acc_dtype(hidden.dtype)
    kept = kept_mask(labels, keep, ignore_index)
    coef = row_coefficients(kept, token_weights, normalizer, reduction, grad_tokens, acc)
    if coef is None:
        grad_mask = 0

    idx = kept.nonzero().squeeze(1)  # packing: only kept tokens reach the matmuls
    n = idx.numel()
    x_all = hidden.index_select(0, idx)
    y_all = labels.index_select(0, idx).long()
    coef_all = coef.index_select(0, idx) if coef is not None else None

    nll_p = torch.zeros(n, dtype=acc, device=dev)
    ent_p = torch.zeros(n, dtype=acc, device=dev)
    lse_p = torch.zeros(n, dtype=acc, device=dev)
    want_dx = bool(grad_mask & GRAD_HIDDEN)
    want_dw = bool(grad_mask & GRAD_WEIGHT)
    want_db = bool(grad_mask & GRAD_BIAS) and bias is not None
    dx_p = torch.empty((n, dim), dtype=hidden.dtype, device=dev) if want_dx else None
    dw = torch.zeros((vocab, dim), dtype=acc, device=dev) if want_dw else None
    db = torch.zeros((vocab,), dtype=acc, device=dev) if want_db else None
    need_grad = want_dx or want_dw or want_db

    if chunk_size > 0:
        chunk = chunk_size
    else:
        # Liger's rule, but at least enough rows for an efficient CPU GEMM (logits chunk capped at ~128 MB)
        rows_cap = max(256, min(1024, (128 << 20) // (vocab * 4)))
        chunk = max(default_chunk_size(n, vocab, dim), rows_cap)
    # the softmax math runs on sub-blocks of rows that stay in cache (~2 MB of fp32 logits)
    sub = max(1, min(chunk, (512 * 1024) // vocab))
    w_t = weight.t()
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x = x_all[start:end]
        z = torch.addmm(bias, x, w_t) if bias is not None else x @ w_t
        for s0 in range(0, end - start, sub):
            s1 = min(s0 + sub, end - start)
            r0, r1 = start + s0, start + s1
            _softmax_block(z[s0:s1], y_all[r0:r1], None if coef_all is None else coef_all[r0:r1], acc, softcap,
                           scale, need_grad, nll_p[r0:r1], ent_p[r0:r1], lse_p[r0:r1])
        if not need_grad:
            continue
        # z now holds dlogits (input dtype)
        if want_db:
            db += z.sum(0, dtype=acc)
        if want_dx:
            torch.mm(z, weight, out=dx_p[start:end])
        if want_dw:
            if acc == hidden.dtype:
                dw.addmm_(z.t(), x)
            else:  # low precision inputs: fp32 accumulation across chunks
                dw += (z.t() @ x).to(acc)
        del z

    nll = torch.zeros(n_tok, dtype=acc, device=dev).index_copy_(0, idx, nll_p)
    ent = torch.zeros(n_tok, dtype=acc, device=dev).index_copy_(0, idx, ent_p)
    lse = torch.zeros(n_tok, dtype=acc, device=dev).index_copy_(0, idx, lse_p)
    per_token = nll.clone() if token_weights is None else nll * token_weights.to(acc)  # outputs may not alias
    loss = reduce_loss(per_token, kept, normalizer, reduction)

    empty = hidden.new_empty((0,))
    gh = hidden.new_zeros((n_tok, dim)).index_copy_(0, idx, dx_p) if want_dx else empty
    gw = dw.to(weight.dtype) if want_dw else weight.new_empty((0,))
    gb = db.to(bias.dtype) if want_db else weight.new_empty((0,))
    return loss, nll, ent, lse, gh, gw, gb
