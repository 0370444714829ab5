"""The chunk loop and the autograd Function of the chunked fused-linear loss (every device; no Triton path).

For each chunk of kept rows: ``logits = cap(scale · (x_c @ W.T + b))`` (fp32; fp64 for fp64 inputs) into a
``[c, V]`` block, ``loss_c = chunk_fn(logits, **rows_c)``, ``g = d loss_c / d logits`` by ``torch.autograd.grad``
on the chunk's own small graph, chained through softcap and scale by hand, then the linear backward done here
(``dh = g @ W``, ``dW += g.T @ x``, ``db += g.sum(0)``). Only ``[c, V]`` blocks ever exist, and the chunk's graph
is freed before the next chunk starts. The weight gradient is summed over chunks in an fp32 accumulator for
bf16/fp16 inputs (fp64 for fp64), as ``token_ce`` does with ``weight_grad_accumulation="fp32"``.

There is no Triton path on purpose: the per-chunk function is arbitrary Python, so the chunk's softmax-like math
cannot be fused into a kernel written in advance; the two GEMMs per chunk are what costs, and they already run in
cuBLAS / the CPU BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from typing_extensions import override

from ..token_ce.torch_impl import GRAD_BIAS, GRAD_HIDDEN, GRAD_WEIGHT, acc_dtype, default_chunk_size

MODES = ("forward_grad", "recompute")

# Bytes of one fp32 [c, V] logits block that the default chunk size allows at least (the floor below Liger's
# rule). token_ce's CPU floor allows 128 MB, but a chunk_fn's own autograd graph keeps several [c, V]
# temporaries (log-softmax, softmax, products with a teacher), so this base takes a quarter of that.
CHUNK_LOGITS_BYTES = 32 << 20
MAX_FLOOR_ROWS = 1024


def default_chunk_rows(n: int, vocab: int, dim: int) -> int:
    """Rows per chunk when the caller gives none: Liger's rule (the ``[c, V]`` block about as large as the
    ``[N, D]`` hidden states, a power of two), raised to a floor of rows whose fp32 logits take ~32 MB (at most
    1024 rows, at least 1) so that small-``D`` models do not run tiny, memory-bound GEMMs; never more than ``n``."""
    floor = max(1, min(MAX_FLOOR_ROWS, CHUNK_LOGITS_BYTES // (vocab * 4)))
    return max(1, min(n, max(default_chunk_size(n, vocab, dim), floor)))


@dataclass(frozen=True)
class ChunkSpec:
    """Everything about one call except the three differentiable tensors (hidden, weight, bias).

    ``rows`` are already packed (only kept rows, detached); ``kept_index`` is the ``[n]`` index of the kept rows
    of ``hidden`` (``None``: every row is kept). ``scale`` 1.0 and ``softcap`` 0.0 mean off; ``chunk_size`` 0
    means :func:`default_chunk_rows`. ``grad_mask`` holds the ``GRAD_*`` bits of the gradients wanted.
    """

    chunk_fn: Callable[..., Tensor]
    rows: Dict[str, Tensor]
    kept_index: Optional[Tensor]
    scale: float
    softcap: float
    chunk_size: int
    mode: str
    grad_mask: int


def _checked_chunk_loss(value: object) -> Tensor:
    if not isinstance(value, Tensor) or value.numel() != 1 or not value.is_floating_point():
        what = f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}" if isinstance(value, Tensor) else (
            type(value).__name__)
        raise ValueError(f"chunk_fn must return a scalar float tensor (the loss sum of the chunk's rows), got {what}")
    return value.reshape(())


def _chunk_logits(x: Tensor, weight_t: Tensor, bias: Optional[Tensor], out: Tensor, acc: torch.dtype, scale: float,
                  softcap: float) -> Tuple[Tensor, Optional[Tensor]]:
    """``cap(scale · (x @ W.T + b))`` in ``acc`` precision; returns ``(logits, tanh(z / c) or None)``.

    The matmul writes into ``out`` (a reused input-dtype buffer); for fp32/fp64 inputs the logits alias it."""
    if bias is not None:
        torch.addmm(bias, x, weight_t, out=out)
    else:
        torch.mm(x, weight_t, out=out)
    z = out.to(acc)
    if scale != 1.0:
        z.mul_(scale)
    if softcap == 0.0:
        return z, None
    t = z.div_(softcap).tanh_()  # kept for the chain rule
    return t * softcap, t


def _loss_and_logits_grad(chunk_fn: Callable[..., Tensor], logits: Tensor, rows: Dict[str, Tensor],
                          acc: torch.dtype) -> Tuple[Tensor, Optional[Tensor]]:
    """The chunk's loss and ``d loss / d logits`` (``None`` when the loss does not depend on the logits, e.g. a
    constant zero for an empty selection)."""
    leaf = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = _checked_chunk_loss(chunk_fn(leaf, **rows))
        if not loss.requires_grad:
            return loss.detach().to(acc), None
        (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return loss.detach().to(acc), grad


def run_chunks(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], spec: ChunkSpec,
               grad_mask: int) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Returns ``(loss, grad_hidden, grad_weight, grad_bias)`` for an upstream gradient of 1.

    ``grad_mask`` selects the gradients computed (an unselected one is ``None``; with 0 the chunk function runs
    without autograd). ``loss`` is the sum of the chunk losses in fp32 (fp64 for fp64 inputs); with no kept row
    it is 0 and the gradients are zeros.
    """
    n_tok, dim = hidden.shape
    vocab = weight.shape[0]
    dev = hidden.device
    acc = acc_dtype(hidden.dtype)
    idx = spec.kept_index
    x_all = hidden if idx is None else hidden.index_select(0, idx)  # packing: dropped rows skip the matmuls
    n = x_all.shape[0]

    want_dx = bool(grad_mask & GRAD_HIDDEN)
    want_dw = bool(grad_mask & GRAD_WEIGHT)
    want_db = bool(grad_mask & GRAD_BIAS) and bias is not None
    need_grad = want_dx or want_dw or want_db
    dx_p = torch.empty((n, dim), dtype=hidden.dtype, device=dev) if want_dx else None
    dw = torch.zeros((vocab, dim), dtype=acc, device=dev) if want_dw else None  # fp32 across chunks
    db = torch.zeros((vocab,), dtype=acc, device=dev) if want_db else None
    total = torch.zeros((), dtype=acc, device=dev)

    chunk = spec.chunk_size if spec.chunk_size > 0 else default_chunk_rows(n, vocab, dim)
    chunk = max(1, min(chunk, n))
    buf = torch.empty((chunk, vocab), dtype=hidden.dtype, device=dev) if n else None
    weight_t = weight.t()
    dw_part = None
    for start in range(0, n, chunk):
        end = min(start + chunk, n)
        x = x_all[start:end]
        out = buf[: end - start]
        logits, t = _chunk_logits(x, weight_t, bias, out, acc, spec.scale, spec.softcap)
        rows = {name: r[start:end] for name, r in spec.rows.items()}
        if not need_grad:
            with torch.no_grad():
                total += _checked_chunk_loss(spec.chunk_fn(logits, **rows)).to(acc)
            continue
        loss, g = _loss_and_logits_grad(spec.chunk_fn, logits, rows, acc)
        total += loss
        if g is None:  # the chunk's loss is a constant: no gradient from these rows
            if want_dx:
                dx_p[start:end].zero_()
            continue
        # chain rule through softcap and scale; out of place, since autograd may hand back an expanded tensor
        if t is not None:
            factor = t.mul_(t).neg_().add_(1.0)
            g = g * (factor.mul_(spec.scale) if spec.scale != 1.0 else factor)
        elif spec.scale != 1.0:
            g = g * spec.scale
        g_in = g if g.dtype == hidden.dtype else out.copy_(g)  # the GEMMs run in the input dtype, as token_ce's
        if want_db:
            db += g_in.sum(0, dtype=acc)
        if want_dx:
            torch.mm(g_in, weight, out=dx_p[start:end])
        if want_dw:
            if hidden.dtype == acc:
                dw.addmm_(g_in.t(), x)
            else:  # the chunk's product in a reused input-dtype buffer; add_ upcasts on the fly
                if dw_part is None:
                    dw_part = torch.empty((vocab, dim), dtype=hidden.dtype, device=dev)
                dw.add_(torch.mm(g_in.t(), x, out=dw_part))
    del buf, dw_part

    gh = None
    if want_dx:
        gh = dx_p if idx is None else hidden.new_zeros((n_tok, dim)).index_copy_(0, idx, dx_p)
    gw = dw.to(weight.dtype) if want_dw else None
    gb = db.to(bias.dtype) if want_db else None
    return total, gh, gw, gb


def _scaled(grad: Optional[Tensor], upstream: Tensor) -> Optional[Tensor]:
    # a 0-dim device tensor: no host sync
    return None if grad is None else grad.mul_(upstream.to(grad.dtype))


class ChunkedLinearLossFunction(torch.autograd.Function):
    """``apply(hidden, weight, bias, spec) -> 0-dim loss``. Only hidden/weight/bias get gradients.

    ``spec.mode == "forward_grad"``: the gradients are computed in forward and the first backward scales them by
    the upstream gradient in place (Liger's preference base). ``"recompute"``: forward only computes the loss and
    backward re-runs the chunks. In both modes a further backward through a retained graph recomputes. Double
    backward is not supported (``once_differentiable``).
    """

    @staticmethod
    @override
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], spec: ChunkSpec) -> Tensor:
        in_forward = spec.grad_mask if spec.mode == "forward_grad" else 0
        loss, gh, gw, gb = run_chunks(hidden, weight, bias, spec, in_forward)
        ctx.spec = spec
        # the graph holds these inputs anyway: saving them costs no copy and lets any backward recompute
        ctx.save_for_backward(hidden, weight, bias)
        ctx.handover = (gh, gw, gb) if in_forward else None
        return loss

    @staticmethod
    @override
    @once_differentiable
    def backward(ctx, grad_loss: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], None]:
        if ctx.handover is not None:
            gh, gw, gb = ctx.handover
            ctx.handover = None  # handed over (and scaled in place) once; a retained graph's next backward recomputes
        else:
            hidden, weight, bias = ctx.saved_tensors
            _, gh, gw, gb = run_chunks(hidden, weight, bias, ctx.spec, ctx.spec.grad_mask)
        upstream = grad_loss.reshape(())
        return _scaled(gh, upstream), _scaled(gw, upstream), _scaled(gb, upstream), None
