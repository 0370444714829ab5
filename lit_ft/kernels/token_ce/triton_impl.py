"""Triton path of the fused linear token cross-entropy (imported only when it runs: it imports triton).

Two GEMM routes (see :func:`gemm_route`): "cublas" (default; one host synchronisation per call for the kept
count, then cuBLAS GEMMs on the gathered kept rows chunk by chunk, with the row kernel below) and "triton" (no
host synchronisation; described here):

1. Kept tokens are moved to the front with a stable argsort of ``~kept``; their count stays on the device.
2. For each token chunk, a Triton GEMM writes the chunk's logits ``x_c @ W.T (+ b)`` into a reused ``[chunk, V]``
   buffer. Every kernel reads the device-side count and skips row blocks (or K blocks) past it, so lm_head FLOPs
   scale with the kept fraction although the host never learns the count.
3. A row kernel computes LSE (online over vocab blocks), NLL, entropy and, when gradients are wanted, overwrites the
   logits in place with ``dlogits = (softmax - onehot) * coef_i`` (chained through softcap and scale), where
   ``coef_i`` = upstream gradient × token weight (/ normaliser): per-token weights are folded in before projecting.
4. Two more count-aware Triton GEMMs give ``dX_c = dlogits @ W`` and ``dW += dlogits.T @ x_c`` (an fp32
   accumulator, or the weight's dtype with ``accumulation="input"``).

fp64 inputs are delegated to the torch path. Under ``TRITON_INTERPRET=1`` (CPU tests) low-precision operands are
upcast to fp32 before ``tl.dot`` (the interpreter gets bf16 dot wrong). Only long-standing Triton APIs are used
(tested with triton 3.6 and 3.9).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import torch_impl
from .reference import kept_mask, label_range_message, out_of_range_labels
from .torch_impl import GRAD_BIAS, GRAD_HIDDEN, GRAD_WEIGHT, reduce_loss, row_coefficients, weighted_per_token


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _mm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, count_ptr, bound_off,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    BOUND_M: tl.constexpr, BOUND_K: tl.constexpr, HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C[M, N] (+)= A[M, K] @ B[K, N] (+ bias[N]); rows (BOUND_M) or K (BOUND_K) limited to count - bound_off."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    m_lim = M
    k_lim = K
    if BOUND_M:
        m_lim = tl.minimum(tl.load(count_ptr) - bound_off, M)
    if BOUND_K:
        k_lim = tl.minimum(tl.load(count_ptr) - bound_off, K)
    if pid_m * BLOCK_M >= m_lim:
        return
    if k_lim <= 0:
        return  # only reachable with ACCUM (dW): nothing to add

    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    m_mask = rm < m_lim
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, k_lim, BLOCK_K):
        k_mask = (rk + k) < k_lim
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = m_mask[:, None] & n_mask[None, :]
    if ACCUM:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _tanh(x):
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _row_kernel(
    z_ptr, stride_z, y_ptr, coef_ptr, count_ptr, row_off,
    nll_ptr, ent_ptr, lse_ptr,
    V, softcap, scale,
    HAS_SOFTCAP: tl.constexpr, HAS_SCALE: tl.constexpr, WRITE_GRAD: tl.constexpr, ZERO_DROPPED: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One program per (packed) token row: LSE/NLL/entropy, then dlogits in place of the logits. Rows past the
    kept count are skipped, or zeroed with ZERO_DROPPED (the bias gradient sums whole buffer rows, and the reused
    buffer holds stale values there: 0 * NaN would poison it)."""
    r = tl.program_id(0)
    row = row_off + r
    z_row = z_ptr + r.to(tl.int64) * stride_z
    cols0 = tl.arange(0, BLOCK_V)
    count = tl.load(count_ptr)
    if ZERO_DROPPED and row >= count:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            tl.store(z_row + cols, tl.zeros([BLOCK_V], dtype=tl.float32).to(z_ptr.dtype.element_ty), mask=cols < V)
    if row >= count:
        return
    y = tl.load(y_ptr + row).to(tl.int32)

    m = float("-inf")
    s = 0.0
    t = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + cols0
        mask = cols < V
        z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SCALE:
            z = z * scale
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        z = tl.where(mask, z, 0.0)
        z_inf = tl.where(mask, z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z_inf, 0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(z_inf - m_new)  # 0 at masked lanes
        s = s * alpha + tl.sum(e, 0)
        t = t * alpha + tl.sum(e * z, 0)
        m = m_new
    lse = m + tl.log(s)
    zy = tl.load(z_row + y).to(tl.float32)
    if HAS_SCALE:
        zy = zy * scale
    if HAS_SOFTCAP:
        zy = softcap * _tanh(zy / softcap)
    tl.store(nll_ptr + row, lse - zy)
    tl.store(ent_ptr + row, lse - t / s)
    tl.store(lse_ptr + row, lse)

    if WRITE_GRAD:
        c = tl.load(coef_ptr + row).to(tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + cols0
            mask = cols < V
            z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SCALE:
                z = z * scale
            if HAS_SOFTCAP:
                th = _tanh(z / softcap)
                z = softcap * th
            g = tl.exp(z - lse)
            g = tl.where(cols == y, g - 1.0, g) * c
            if HAS_SOFTCAP:
                g = g * (1.0 - th * th)
            if HAS_SCALE:
                g = g * scale
            tl.store(z_row + cols, g.to(z_ptr.dtype.element_ty), mask=mask)


def _mm(a: Tensor, b: Tensor, c: Tensor, *, count: Tensor, bound_off: int, bound: str, bias: Optional[Tensor] = None,
        accumulate: bool = False) -> None:
    """c (+)= a @ b (+ bias), a/b/c any strides; bound in {'m', 'k'} limits rows or K to count - bound_off."""
    M, K = a.shape
    N = b.shape[1]
    interp = _interpreting()
    ieee = a.dtype == torch.float32
    if interp:
        bm, bn, bk, warps, stages = 32, 64, 32, 4, 1
    elif ieee:
        bm, bn, bk, warps, stages = 64, 64, 32, 4, 3
    else:
        # 128x256x64 / 8 warps / 3 stages measured 116 ms vs 134 ms for 128x128 (H100, D=4096, V=128256, N=16384)
        bm, bn, bk, warps, stages = 128, 256, 64, 8, 3
        cfg = os.environ.get("LIT_FT_MM_CFG")  # benchmarking knob: "BM,BN,BK,warps,stages"
        if cfg:
            bm, bn, bk, warps, stages = (int(x) for x in cfg.split(","))
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    _mm_kernel[grid](
        a, b, c, bias if bias is not None else c, count, bound_off,
        M, N, K,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        BOUND_M=bound == "m", BOUND_K=bound == "k", HAS_BIAS=bias is not None, ACCUM=accumulate,
        UPCAST=interp and a.dtype != torch.float32, IEEE=ieee,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )


def new_logits_buffer(shape, dtype: torch.dtype, device) -> Tensor:
    """The reused ``[chunk, V]`` logits buffer (uninitialised; the self-check swaps in a NaN-filled one to prove
    that stale rows past the kept count never leak into results)."""
    return torch.empty(shape, dtype=dtype, device=device)


def default_chunk_size(n: int, vocab: int, dim: int, itemsize: int = 2) -> int:
    """Liger's rule (logits chunk ~ hidden size), raised to a power of two between 1024 and 4096 rows whose logits
    buffer stays <= 512 MiB: bigger GEMMs and fewer read-modify-write passes over the fp32 dW accumulator
    (H100, D=4096, V=128256, N=16384: 1024 rows 116 ms, 4096 rows 98 ms)."""
    rows = max(1, (512 << 20) // max(vocab * itemsize, 1))
    rows = min(4096, max(1024, 1 << (rows.bit_length() - 1)))
    return min(max(n, 1), max(rows, torch_impl.default_chunk_size(n, vocab, dim)))


GEMM_ROUTES = ("cublas", "triton")


def gemm_route() -> str:
    """Which GEMMs the CUDA path uses (env ``LIT_FT_TOKEN_CE_GEMM``, default ``"cublas"``):

    * ``"cublas"``: the kept count is read on the host once per call (one synchronisation, as Liger-Kernel and
      Cut-Cross-Entropy do), the kept rows are gathered chunk by chunk and the three lm_head products run as
      cuBLAS GEMMs on exactly those rows (``torch.mm``/``addmm`` with ``out=``). Fastest, and the gradient of
      ``hidden`` is written in place (no packed copy of the hidden states or of their gradient).
    * ``"triton"``: no host synchronisation at all (the count stays on the device and every Triton GEMM skips the
      row blocks past it): for CUDA-graph capture (``torch.compile(mode="reduce-overhead")``), slower GEMMs.
    """
    route = os.environ.get("LIT_FT_TOKEN_CE_GEMM", "cublas")
    if route not in GEMM_ROUTES:
        raise ValueError(f"LIT_FT_TOKEN_CE_GEMM must be one of {GEMM_ROUTES}, got {route!r}")
    return route


def _row_kernel_config(vocab: int):
    interp = _interpreting()
    block_v = min(triton.next_power_of_2(vocab), 1024 if interp else 4096)
    warps = 1 if interp else (16 if block_v >= 4096 else 8)
    cfg = os.environ.get("LIT_FT_ROW_CFG")  # benchmarking knob: "BLOCK_V,warps"
    if cfg and not interp:
        block_v, warps = (int(x) for x in cfg.split(","))
        block_v = min(block_v, triton.next_power_of_2(vocab))
    return block_v, warps


def _addmm_out_dtype_supported(t: Tensor) -> bool:
    """torch >= 2.8 sums bf16/fp16 products into an fp32 ``out`` on CUDA (``addmm(..., out_dtype=float32)``)."""
    if t.device.type != "cuda":
        return False
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 8)


def _prologue(hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index, reduction, grad_mask,
              grad_tokens):
    """What both GEMM routes start from: contiguous operands, the kept mask, d(loss)/d(nll_i) per token and which
    gradients are wanted (none when the coefficients are deferred to a later backward)."""
    kept = kept_mask(labels, keep, ignore_index)
    coef = row_coefficients(kept, token_weights, normalizer, reduction, grad_tokens, torch.float32)
    if coef is None:
        grad_mask = 0
    return (hidden.contiguous(), weight.contiguous(), kept, coef, bool(grad_mask & GRAD_HIDDEN),
            bool(grad_mask & GRAD_WEIGHT), bool(grad_mask & GRAD_BIAS) and bias is not None)


def _forward_backward_host_count(hidden, weight, labels, bias, token_weights, keep, normalizer, *, ignore_index,
                                 reduction, softcap, scale, chunk_size, grad_mask, grad_tokens, accumulation):
    """The ``"cublas"`` route (see :func:`gemm_route`): same contract as :func:`forward_backward`."""
    n_tok, dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    hidden, weight, kept, coef, want_dx, want_dw, want_db = _prologue(
        hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index, reduction, grad_mask, grad_tokens)
    need_grad = want_dx or want_dw or want_db

    nll = torch.zeros(n_tok, dtype=f32, device=dev)
    ent = torch.zeros(n_tok, dtype=f32, device=dev)
    lse = torch.zeros(n_tok, dtype=f32, device=dev)
    gh = torch.zeros_like(hidden) if want_dx else None
    dw_dtype = f32 if accumulation == "fp32" else weight.dtype
    dw = torch.zeros((vocab, dim), dtype=dw_dtype, device=dev) if want_dw else None
    db = torch.zeros((vocab,), dtype=f32, device=dev) if want_db else None

    # the one host synchronisation of this route, which also reads whether a label is out of [0, V) (checked here
    # at no extra synchronisation: the row kernel would read logits out of bounds)
    bad = out_of_range_labels(labels, ignore_index, vocab)
    count, n_bad = (int(x) for x in torch.stack([kept.sum(), bad.sum()]).tolist())
    if n_bad:
        raise ValueError(label_range_message(labels, bad, ignore_index, vocab))
    if count:
        all_kept = count == n_tok
        idx = None if all_kept else kept.nonzero().squeeze(1)
        ys = labels if all_kept else labels.index_select(0, idx)
        cs = (coef if all_kept else coef.index_select(0, idx)).contiguous() if need_grad else None
        nll_p, ent_p, lse_p = (nll, ent, lse) if all_kept else (
            torch.empty(count, dtype=f32, device=dev) for _ in range(3))
        count_t = torch.full((1,), count, dtype=torch.int32, device=dev)
        chunk = chunk_size if chunk_size > 0 else default_chunk_size(count, vocab, dim, hidden.element_size())
        chunk = min(chunk, count)
        buf = new_logits_buffer((chunk, vocab), hidden.dtype, dev)
        dx_buf = torch.empty((chunk, dim), dtype=hidden.dtype, device=dev) if want_dx and not all_kept else None
        fp32_dw_by_cublas = want_dw and dw.dtype != hidden.dtype and _addmm_out_dtype_supported(hidden)
        block_v, row_warps = _row_kernel_config(vocab)
        w_t = weight.t()
        for c0 in range(0, count, chunk):
            m = min(chunk, count - c0)
            rows = None if all_kept else idx[c0:c0 + m]
            x = hidden[c0:c0 + m] if all_kept else hidden.index_select(0, rows)
            z = buf[:m]
            if bias is not None:
                torch.addmm(bias.to(z.dtype), x, w_t, out=z)
            else:
                torch.mm(x, w_t, out=z)
            _row_kernel[(m,)](
                z, z.stride(0), ys, cs if need_grad else count_t, count_t, c0, nll_p, ent_p, lse_p, vocab,
                float(softcap), float(scale),
                HAS_SOFTCAP=softcap != 0.0, HAS_SCALE=scale != 1.0, WRITE_GRAD=need_grad, ZERO_DROPPED=False,
                BLOCK_V=block_v, num_warps=row_warps,
            )
            if not need_grad:
                continue
            if want_dx:
                if all_kept:
                    torch.mm(z, weight, out=gh[c0:c0 + m])
                else:
                    torch.mm(z, weight, out=dx_buf[:m])
                    gh.index_copy_(0, rows, dx_buf[:m])
            if want_dw:
                if dw.dtype == z.dtype:  # "input" accumulation, or fp32 inputs
                    torch.addmm(dw, z.t(), x, out=dw)
                elif fp32_dw_by_cublas:
                    torch.addmm(dw, z.t(), x, out_dtype=f32, out=dw)
                else:  # fp32 sum of low-precision products where cuBLAS cannot (CPU interpreter, older torch)
                    _mm(z.t(), x, dw, count=count_t, bound_off=c0, bound="k", accumulate=True)
            if want_db:
                db += z.sum(0, dtype=f32)
        del buf, dx_buf
        z = x = None  # noqa: F841  (views that would keep the logits buffer alive through the final casts)
        if not all_kept:
            nll.index_copy_(0, idx, nll_p)
            ent.index_copy_(0, idx, ent_p)
            lse.index_copy_(0, idx, lse_p)
    per_token = weighted_per_token(nll, token_weights, kept)
    loss = reduce_loss(per_token, kept, normalizer, reduction)
    gh = gh if want_dx else hidden.new_empty((0,))
    gw = (dw if dw.dtype == weight.dtype else dw.to(weight.dtype)) if want_dw else weight.new_empty((0,))
    gb = db.to(bias.dtype) if want_db else weight.new_empty((0,))
    return loss, nll, ent, lse, gh, gw, gb


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
):
    """Same contract as :func:`torch_impl.forward_backward` (returns loss, nll, entropy, lse, gh, gw, gb)."""
    if hidden.dtype == torch.float64:
        return torch_impl.forward_backward(
            hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index=ignore_index,
            reduction=reduction, softcap=softcap, scale=scale, chunk_size=chunk_size, grad_mask=grad_mask,
            grad_tokens=grad_tokens, accumulation=accumulation)
    if gemm_route() == "cublas":
        return _forward_backward_host_count(
            hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index=ignore_index,
            reduction=reduction, softcap=softcap, scale=scale, chunk_size=chunk_size, grad_mask=grad_mask,
            grad_tokens=grad_tokens, accumulation=accumulation)
    n_tok, dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    f32 = torch.float32
    hidden, weight, kept, coef, want_dx, want_dw, want_db = _prologue(
        hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index, reduction, grad_mask, grad_tokens)
    need_grad = want_dx or want_dw or want_db

    # kept rows first (stable), count on the device: no host sync anywhere below
    order = torch.argsort((~kept).to(torch.int8), stable=True)
    count = kept.sum().to(torch.int32).reshape(1)
    xs = hidden.index_select(0, order)
    ys = labels.index_select(0, order)
    cs = coef.index_select(0, order).contiguous() if need_grad else count  # dummy pointer when unused

    nll_s = torch.zeros(n_tok, dtype=f32, device=dev)
    ent_s = torch.zeros(n_tok, dtype=f32, device=dev)
    lse_s = torch.zeros(n_tok, dtype=f32, device=dev)
    dx_s = torch.zeros((n_tok, dim), dtype=hidden.dtype, device=dev) if want_dx else None
    # "input": accumulate straight into a gradient of the weight's dtype (the GEMM kernel loads, adds in fp32 and
    # stores in that dtype): no fp32 [V, D] accumulator and no final copy
    dw_dtype = f32 if accumulation == "fp32" else weight.dtype
    dw = torch.zeros((vocab, dim), dtype=dw_dtype, device=dev) if want_dw else None
    db = torch.zeros((vocab,), dtype=f32, device=dev) if want_db else None

    chunk = chunk_size if chunk_size > 0 else default_chunk_size(n_tok, vocab, dim, hidden.element_size())
    chunk = min(chunk, max(n_tok, 1))
    buf = new_logits_buffer((chunk, vocab), hidden.dtype, dev)
    w_t = weight.t()
    block_v, row_warps = _row_kernel_config(vocab)
    for c0 in range(0, n_tok, chunk):
        m = min(chunk, n_tok - c0)
        z = buf[:m]
        x = xs[c0:c0 + m]
        _mm(x, w_t, z, count=count, bound_off=c0, bound="m", bias=bias)
        _row_kernel[(m,)](
            z, z.stride(0), ys, cs, count, c0, nll_s, ent_s, lse_s, vocab, float(softcap), float(scale),
            HAS_SOFTCAP=softcap != 0.0, HAS_SCALE=scale != 1.0, WRITE_GRAD=need_grad, ZERO_DROPPED=want_db,
            BLOCK_V=block_v,
            num_warps=row_warps,
        )
        if not need_grad:
            continue
        if want_dx:
            _mm(z, weight, dx_s[c0:c0 + m], count=count, bound_off=c0, bound="m")
        if want_dw:
            _mm(z.t(), x, dw, count=count, bound_off=c0, bound="k", accumulate=True)
        if want_db:  # rows past the count were zeroed by the row kernel
            db += z.sum(0, dtype=f32)

    del buf, xs  # freed before the gradient casts below: they set this call's peak memory
    z = x = None  # noqa: F841  (views that would keep the buffer alive)
    nll = torch.zeros(n_tok, dtype=f32, device=dev).index_copy_(0, order, nll_s)
    ent = torch.zeros(n_tok, dtype=f32, device=dev).index_copy_(0, order, ent_s)
    lse = torch.zeros(n_tok, dtype=f32, device=dev).index_copy_(0, order, lse_s)
    per_token = weighted_per_token(nll, token_weights, kept)
    loss = reduce_loss(per_token, kept, normalizer, reduction)
    gh = torch.empty_like(hidden).index_copy_(0, order, dx_s) if want_dx else hidden.new_empty((0,))
    gw = dw.to(weight.dtype) if want_dw else weight.new_empty((0,))
    gb = db.to(bias.dtype) if want_db else weight.new_empty((0,))
    return loss, nll, ent, lse, gh, gw, gb
