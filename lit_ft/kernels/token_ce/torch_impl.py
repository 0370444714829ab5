"""Chunked PyTorch implementation of the fused linear token cross-entropy (the CPU path).

Never materialises the full ``[N, V]`` logits: kept tokens are packed first (so the lm_head matmuls only see
them), then processed in token chunks whose logits are about the size of ``hidden`` (Liger's rule, with a floor
that keeps the CPU GEMMs efficient) unless ``chunk_size`` says otherwise. One logits buffer and one set of scratch
buffers serve every chunk (a fresh ``[chunk, V]`` tensor per chunk is a page-faulting allocation each time). In the same pass it computes loss, NLL, entropy, LSE and, when asked, the gradients
(Liger-style "gradient in forward"): the per-row coefficient (upstream gradient × token weight) is folded into
``dlogits`` before the projections, so per-token weights are exact.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._common import GRAD_BIAS, GRAD_HIDDEN, GRAD_WEIGHT  # noqa: F401  (re-exported: the bits live in _common)
from .reference import kept_mask

# Elements of one softmax row block: ~1 MB of fp32 logits (plus as much of exponentials) stays in a core's L2.
# Measured on the 2-core Sapphire Rapids CI machine at V=49152: 4-5 rows per block beat 10 rows by ~25%.
SOFTMAX_BLOCK_ELEMENTS = 256 * 1024


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_size(n: int, vocab: int, dim: int, minimum: int = 1) -> int:
    """Liger's rule: token chunks whose logits are about as large as the hidden states (a power of two)."""
    inc = max(1, -(-vocab // max(dim, 1)))
    chunk = max(1, -(-n // inc))
    chunk = 1 << (chunk - 1).bit_length()
    return max(minimum, chunk)


def cpu_chunk_floor(vocab: int, dim: int, itemsize: int = 4) -> int:
    """At least this many token rows per chunk on the torch path: 256-2048 rows whose logits (in the input dtype,
    ``itemsize`` bytes) take ~128 MB, or up to half the size of the ``[V, D]`` weight gradient the op holds anyway
    (``dim / 2`` rows) when that is larger. Every chunk streams ``W`` twice and read-modify-writes ``dW``, so few
    rows per chunk leave the GEMMs memory-bound: at D=2048, V=128256, N=2048 on 2 CPU cores 261 rows took 11.0 s,
    1024 rows 9.3 s (+0.4 GB); at D=576, V=49152, N=8192 in bf16 682 rows took 1.81 s, 1365 rows ~1.55 s."""
    rows = max((128 << 20) // (vocab * itemsize), dim // 2)
    return max(256, min(2048, rows))


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
        # a weight at a position that is not kept (ignored label, dropped token) must not reach anything: an inf or
        # NaN there would make 0 * inf = NaN, so mask instead of multiplying
        coef = torch.where(kept, coef * token_weights.to(dtype), torch.zeros((), dtype=dtype, device=kept.device))
    return coef


def weighted_per_token(nll: Tensor, token_weights: Optional[Tensor], kept: Tensor) -> Tensor:
    """``w_i · nll_i`` at kept positions, 0 elsewhere (a fresh tensor: the op's outputs may not alias). ``nll`` is 0
    at not-kept positions already; the weight there is masked out rather than multiplied, so an inf/NaN weight at an
    ignored or dropped position cannot turn the loss into NaN."""
    if token_weights is None:
        return nll.clone()
    return torch.where(kept, nll * token_weights.to(nll.dtype), torch.zeros((), dtype=nll.dtype, device=nll.device))


def reduce_loss(per_token: Tensor, kept: Tensor, normalizer: Optional[Tensor], reduction: str) -> Tensor:
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    if normalizer is not None:
        return total / normalizer.to(device=total.device, dtype=total.dtype).reshape(())
    return total / kept.sum().clamp(min=1).to(total.dtype)


class _ChunkScratch:
    """Buffers reused by every chunk of one call, so the loop allocates nothing per chunk or per block."""

    def __init__(self, chunk: int, sub: int, vocab: int, dtype: torch.dtype, acc: torch.dtype, device) -> None:
        self.exp = torch.empty((sub, vocab), dtype=acc, device=device)
        self.upcast = torch.empty((sub, vocab), dtype=acc, device=device) if dtype != acc else None
        self.row_max = torch.empty((chunk,), dtype=acc, device=device)
        self.row_sum = torch.empty((chunk,), dtype=acc, device=device)
        self.row_dot = torch.empty((chunk,), dtype=acc, device=device)
        self.row_coef = torch.empty((chunk,), dtype=acc, device=device)
        self.rows = torch.arange(chunk, device=device)


def _scale_and_cap(z: Tensor, softcap: float, scale: float) -> Tuple[Tensor, Optional[Tensor]]:
    """Applies ``logit_scale`` then the softcap to ``z`` (in place); returns ``(logits, tanh(z / c) or None)``."""
    if scale != 1.0:
        z.mul_(scale)
    if softcap == 0.0:
        return z, None
    t = z.div_(softcap).tanh_()  # in place; kept for the chain rule
    return t * softcap, t  # softcap heads are rare: one allocation per block is fine


def _softmax_chunk(z, y, coef, acc, softcap, scale, need_grad, nll_out, ent_out, lse_out, sub, scratch):
    """LSE/NLL/entropy of a chunk of logits ``z`` ``[rows, V]``; if ``need_grad``, overwrite ``z`` with
    ``dlogits = (softmax - onehot) * coef`` chained through softcap and scale.

    The vocabulary-wide passes (max, exp, sum, Σ e·z, scaling) run on blocks of ``sub`` rows that stay in the core's
    cache, with few torch calls per block (per-call overhead dominates at a few rows); the per-row finishing (logs,
    NLL, entropy and, on the fast path, the one-hot term) runs once per chunk.
    """
    rows_n = z.shape[0]
    fast = z.dtype == acc and softcap == 0.0  # fp32/fp64 without softcap: dlogits written straight into z
    # (bf16/fp16 keep the separate upcast copy and the write-back copy: on CPU a mixed-dtype subtract or multiply
    # with a cast on output measured 1.4-1.8x slower than a plain copy plus the same-dtype op)
    m, ssum, dot = scratch.row_max[:rows_n], scratch.row_sum[:rows_n], scratch.row_dot[:rows_n]
    rows = scratch.rows[:rows_n]
    z_y, _ = _scale_and_cap(z[rows, y].to(acc), softcap, scale)  # target logits, gathered before z is overwritten
    g = None
    if need_grad:
        g = coef * scale if scale != 1.0 else coef
    for s0 in range(0, rows_n, sub):
        s1 = min(s0 + sub, rows_n)
        zb = z[s0:s1]
        zf = zb if z.dtype == acc else scratch.upcast[: s1 - s0].copy_(zb)
        zf, t = _scale_and_cap(zf, softcap, scale)
        mb = m[s0:s1]
        torch.amax(zf, dim=1, out=mb)
        zf.sub_(mb[:, None])  # shifted logits (the quantities below are shift-invariant)
        e = torch.exp(zf, out=scratch.exp[: s1 - s0])
        torch.sum(e, dim=1, out=ssum[s0:s1])
        torch.linalg.vecdot(e, zf, out=dot[s0:s1])
        if not need_grad:
            continue
        g_over_s = torch.div(g[s0:s1], ssum[s0:s1], out=scratch.row_coef[s0:s1])
        if fast:
            torch.mul(e, g_over_s[:, None], out=zb)
            continue
        # low precision or softcap: finish dlogits in acc precision, then write back
        e.mul_(g_over_s[:, None])
        e[rows[: s1 - s0], y[s0:s1]] -= g[s0:s1]
        if t is not None:
            e.mul_(t.mul_(t).neg_().add_(1.0))
        zb.copy_(e)
    log_s = torch.log(ssum)
    nll_out.copy_(log_s - (z_y - m))
    ent_out.copy_(log_s - dot / ssum)
    lse_out.copy_(m + log_s)
    if need_grad and fast:
        z[rows, y] -= g  # the one-hot term of softmax - onehot


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
    accumulation: str = "fp32",
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(loss, nll, entropy, lse, grad_hidden, grad_weight, grad_bias)``.

    ``grad_mask`` bits (GRAD_HIDDEN | GRAD_WEIGHT | GRAD_BIAS) select the gradients computed here; an unselected
    gradient is returned as an empty tensor. Gradients are those of the returned (reduced) loss, or, when
    ``grad_tokens`` [N] is given, of ``Σ_i grad_tokens_i · w_i · nll_i`` (the backward of ``reduction='none'``).
    ``softcap``/``scale`` of 0.0/1.0 mean off. ``chunk_size`` 0 means the default rule. ``accumulation``
    ``"fp32"`` sums the weight gradient over chunks in fp32 (fp64 for fp64 inputs); ``"input"`` in the weight's
    own dtype (no accumulator copy; identical for fp32/fp64 inputs). The small bias gradient always uses fp32.
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
    all_kept = n == n_tok  # then idx is arange(n_tok): no gather/scatter copies
    x_all = hidden.contiguous() if all_kept else hidden.index_select(0, idx)
    y_all = labels.long() if all_kept else labels.index_select(0, idx).long()
    coef_all = None if coef is None else (coef if all_kept else coef.index_select(0, idx))

    nll_p = torch.zeros(n, dtype=acc, device=dev)
    ent_p = torch.zeros(n, dtype=acc, device=dev)
    lse_p = torch.zeros(n, dtype=acc, device=dev)
    want_dx = bool(grad_mask & GRAD_HIDDEN)
    want_dw = bool(grad_mask & GRAD_WEIGHT)
    want_db = bool(grad_mask & GRAD_BIAS) and bias is not None
    dx_p = torch.empty((n, dim), dtype=hidden.dtype, device=dev) if want_dx else None
    grad_acc = acc if accumulation == "fp32" else hidden.dtype
    dw = torch.zeros((vocab, dim), dtype=grad_acc, device=dev) if want_dw else None
    db = torch.zeros((vocab,), dtype=acc, device=dev) if want_db else None  # [V]: always accumulated in acc
    need_grad = want_dx or want_dw or want_db

    if chunk_size > 0:
        chunk = chunk_size
    else:
        chunk = max(default_chunk_size(n, vocab, dim), cpu_chunk_floor(vocab, dim, hidden.element_size()))
    chunk = max(1, min(chunk, n))
    sub = max(1, min(chunk, SOFTMAX_BLOCK_ELEMENTS // vocab))
    z_buf = torch.empty((chunk, vocab), dtype=hidden.dtype, device=dev) if n else None
    scratch = _ChunkScratch(chunk, sub, vocab, hidden.dtype, acc, dev)
    w_t = weight.t()
    dw_part = slab = None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x = x_all[start:end]
        z = z_buf[: end - start]
        if bias is not None:
            torch.addmm(bias, x, w_t, out=z)
        else:
            torch.mm(x, w_t, out=z)
        _softmax_chunk(z, y_all[start:end], None if coef_all is None else coef_all[start:end], acc, softcap, scale,
                       need_grad, nll_p[start:end], ent_p[start:end], lse_p[start:end], sub, scratch)
        if not need_grad:
            continue
        # z now holds dlogits (input dtype)
        if want_db:
            db += z.sum(0, dtype=acc)
        if want_dx:
            torch.mm(z, weight, out=dx_p[start:end])
        if want_dw:
            if grad_acc == hidden.dtype:
                dw.addmm_(z.t(), x)  # the GEMM accumulates in fp32 internally, the sum across chunks in dw's dtype
            else:  # low precision inputs: fp32 accumulation across chunks, one vocabulary slice at a time: the
                # slice's product lands in a small low-precision slab, is upcast into a small fp32 slab and added
                # (no [V, D] low-precision temporary; a mixed-dtype add_ of the whole [V, D] took 3x longer on CPU)
                if dw_part is None:
                    rows = max(1, min(vocab, (8 << 20) // (dim * 4)))
                    dw_part = torch.empty((rows, dim), dtype=hidden.dtype, device=dev)
                    slab = torch.empty((rows, dim), dtype=acc, device=dev)
                for r0 in range(0, vocab, slab.shape[0]):
                    r1 = min(r0 + slab.shape[0], vocab)
                    part = torch.mm(z[:, r0:r1].t(), x, out=dw_part[: r1 - r0])
                    dw[r0:r1].add_(slab[: r1 - r0].copy_(part))
    # free the logits buffer before the final casts set the peak: `z` and `x` are views that would keep it alive
    del z_buf, scratch, dw_part, slab
    z = x = None  # noqa: F841

    if all_kept:
        nll, ent, lse = nll_p, ent_p, lse_p
    else:
        nll = torch.zeros(n_tok, dtype=acc, device=dev).index_copy_(0, idx, nll_p)
        ent = torch.zeros(n_tok, dtype=acc, device=dev).index_copy_(0, idx, ent_p)
        lse = torch.zeros(n_tok, dtype=acc, device=dev).index_copy_(0, idx, lse_p)
    per_token = weighted_per_token(nll, token_weights, kept)
    loss = reduce_loss(per_token, kept, normalizer, reduction)

    empty = hidden.new_empty((0,))
    if not want_dx:
        gh = empty
    elif all_kept:
        gh = dx_p
    else:
        gh = hidden.new_zeros((n_tok, dim)).index_copy_(0, idx, dx_p)
    gw = dw.to(weight.dtype) if want_dw else weight.new_empty((0,))
    gb = db.to(bias.dtype) if want_db else weight.new_empty((0,))
    return loss, nll, ent, lse, gh, gw, gb
