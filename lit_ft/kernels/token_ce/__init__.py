"""Fused linear token cross-entropy: ``lm_head`` projection + per-token CE without ``[N, V]`` logits.

The public entry is :func:`fused_linear_token_ce`. It validates its arguments, resolves ``impl`` and calls the
``torch.library`` custom op ``lit_ft::token_ce`` (gradient computed in forward for ``mean``/``sum``) whose backward
is ``lit_ft::token_ce_backward`` for ``reduction='none'`` (chunked recompute with the per-token upstream gradient
folded into dlogits). Triton is imported only when the Triton path actually runs.
"""

from __future__ import annotations

import os
import sys

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._common import FLOAT_DTYPES, check_bias_and_keep, check_linear_inputs, check_logit_options, linear_grad_mask
from .._common import resolve_impl, resolve_impl_traced, triton_runnable  # noqa: F401  (re-exported)
from .._common import check_tensor as _check_tensor
from . import torch_impl
from .reference import kept_mask, label_range_message, out_of_range_labels, token_ce_reference
from .torch_impl import GRAD_BIAS, GRAD_HIDDEN, GRAD_WEIGHT

__all__ = ["fused_linear_token_ce", "TokenCEOutput", "token_ce_reference", "resolve_impl", "triton_runnable"]

REDUCTIONS = ("mean", "sum", "none")
ACCUMULATIONS = ("fp32", "input")
#: set to "1" to check the label range on every call on CUDA too (one host synchronisation per call; the CPU path
#: always checks, the CUDA cuBLAS route checks within the host read it makes anyway)
CHECK_LABELS_ENV = "LIT_FT_CHECK_LABELS"


def check_label_range(labels: Tensor, ignore_index: int, vocab: int) -> None:
    """Raise ``ValueError`` naming the vocabulary size when a label is neither ``ignore_index`` nor in ``[0, V)``
    (``F.cross_entropy`` and HF raise there; indexing would silently train class ``V - 1`` for a label of -1).
    Reads one boolean on the host: callers run it where that costs no GPU synchronisation (CPU tensors, or on
    request)."""
    bad = out_of_range_labels(labels, ignore_index, vocab)
    if bool(bad.any()):
        raise ValueError(label_range_message(labels, bad, ignore_index, vocab))


class TokenCEOutput(NamedTuple):
    """Returned when any ``return_*`` flag is set; unrequested extras are ``None``.

    ``nll``/``entropy``/``lse`` are detached ``[N]`` tensors (fp32, fp64 for fp64 inputs), 0 at not-kept positions.
    """

    loss: Tensor
    nll: Optional[Tensor]
    entropy: Optional[Tensor]
    lse: Optional[Tensor]


# ----------------------------------------------------------------------------------------------------------------
# dispatch


def _run(impl: str, *args, **kwargs):
    if impl == "triton":
        from . import triton_impl  # imports triton lazily

        return triton_impl.forward_backward(*args, **kwargs)
    return torch_impl.forward_backward(*args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------
# custom ops

_OUT = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]


def _token_ce_impl(impl_name, hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index, reduction,
                   softcap, scale, chunk_size, impl, grad_mask, accumulation):
    return _run(impl_name, hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index=ignore_index,
                reduction=reduction, softcap=softcap, scale=scale, chunk_size=chunk_size, grad_mask=grad_mask,
                accumulation=accumulation)


@torch.library.custom_op("lit_ft::token_ce", mutates_args=())
def _token_ce(
    hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor], token_weights: Optional[Tensor],
    keep: Optional[Tensor], normalizer: Optional[Tensor], ignore_index: int, reduction: str, softcap: float,
    scale: float, chunk_size: int, impl: str, grad_mask: int, accumulation: str,
) -> _OUT:
    # generic fallback (any device): the chunked torch path
    return _token_ce_impl("torch", hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index,
                          reduction, softcap, scale, chunk_size, impl, grad_mask, accumulation)


@_token_ce.register_kernel("cpu")
def _token_ce_cpu(hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index, reduction, softcap,
                  scale, chunk_size, impl, grad_mask, accumulation):
    return _token_ce_impl("torch", hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index,
                          reduction, softcap, scale, chunk_size, impl, grad_mask, accumulation)


@_token_ce.register_kernel("cuda")
def _token_ce_cuda(hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index, reduction, softcap,
                   scale, chunk_size, impl, grad_mask, accumulation):
    return _token_ce_impl(impl, hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index,
                          reduction, softcap, scale, chunk_size, impl, grad_mask, accumulation)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@_token_ce.register_fake
def _token_ce_fake(hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index, reduction, softcap,
                   scale, chunk_size, impl, grad_mask, accumulation):
    n = hidden.shape[0]
    acc = _acc(hidden.dtype)
    loss = hidden.new_empty((n,) if reduction == "none" else (), dtype=acc)
    extras = [hidden.new_empty((n,), dtype=acc) for _ in range(3)]
    gh = hidden.new_empty(hidden.shape) if grad_mask & GRAD_HIDDEN else hidden.new_empty((0,))
    gw = weight.new_empty(weight.shape) if grad_mask & GRAD_WEIGHT else weight.new_empty((0,))
    gb = bias.new_empty(bias.shape) if (grad_mask & GRAD_BIAS and bias is not None) else weight.new_empty((0,))
    return loss, *extras, gh, gw, gb


@torch.library.custom_op("lit_ft::token_ce_backward", mutates_args=())
def _token_ce_backward(
    grad_tokens: Tensor, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor],
    token_weights: Optional[Tensor], keep: Optional[Tensor], ignore_index: int, softcap: float, scale: float,
    chunk_size: int, impl: str, grad_mask: int, accumulation: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    out = _run(impl if hidden.device.type == "cuda" else "torch", hidden, weight, labels, bias, token_weights, keep,
               None, ignore_index=ignore_index, reduction="none", softcap=softcap, scale=scale,
               chunk_size=chunk_size, grad_mask=grad_mask, grad_tokens=grad_tokens, accumulation=accumulation)
    return out[4], out[5], out[6]


@_token_ce_backward.register_fake
def _token_ce_backward_fake(grad_tokens, hidden, weight, labels, bias, token_weights, keep, ignore_index, softcap,
                            scale, chunk_size, impl, grad_mask, accumulation):
    gh = hidden.new_empty(hidden.shape) if grad_mask & GRAD_HIDDEN else hidden.new_empty((0,))
    gw = weight.new_empty(weight.shape) if grad_mask & GRAD_WEIGHT else weight.new_empty((0,))
    gb = bias.new_empty(bias.shape) if (grad_mask & GRAD_BIAS and bias is not None) else weight.new_empty((0,))
    return gh, gw, gb


def _tracing(t: Tensor) -> bool:
    """Whether autograd is being traced (torch.compile, AOTAutograd, make_fx) rather than run eagerly: traced
    backwards must not mutate tensors stashed on ``ctx`` (they are not graph inputs)."""
    if torch.compiler.is_compiling() or type(t) is not torch.Tensor:  # fake / functional tensors while tracing
        return True
    try:
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
    except ImportError:  # older torch: the checks above cover torch.compile
        return False
    return get_proxy_mode() is not None


def _setup_context(ctx, inputs, output):
    (hidden, weight, labels, bias, token_weights, keep, normalizer, ignore_index, reduction, softcap, scale,
     chunk_size, impl, grad_mask, accumulation) = inputs
    # Only the loss output ever receives a gradient. With materialised grads autograd would pass zero tensors for
    # the six others, one of them [V, D]: a whole extra lm_head-sized allocation and fill per backward.
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.grad_mask = grad_mask
    ctx.has_bias = bias is not None
    ctx.args = (ignore_index, softcap, scale, chunk_size, impl)
    ctx.accumulation = accumulation
    ctx.handover = None
    if reduction == "none":  # backward recomputes with the per-token upstream gradient
        ctx.save_for_backward(hidden, weight, labels, bias, token_weights, keep)
    elif _tracing(output[5]):  # traced: the gradients computed in forward as plain saved tensors
        ctx.save_for_backward(output[4], output[5], output[6])
    else:
        # Eager: hand the gradients computed in forward over to the first backward, scaled in place. Saved tensors
        # stay referenced by the graph, so `grad * upstream` would be a second [V, D] tensor (and autograd copies a
        # returned saved tensor once more before making it `.grad`). The inputs are saved (no copies: the graph
        # holds them anyway) so that a later backward through a retained graph recomputes instead.
        ctx.save_for_backward(hidden, weight, labels, bias, token_weights, keep, normalizer)
        ctx.handover = [output[4].detach(), output[5].detach(), output[6].detach()]


def _recompute_gradients(ctx, grad_loss, mask):
    """Gradients by chunked recompute (reduction='none', or a repeated backward through a retained graph)."""
    saved = ctx.saved_tensors
    hidden, weight, labels, bias, token_weights, keep = saved[:6]
    grad_tokens = grad_loss
    if ctx.reduction != "none":  # d(loss)/d(nll_i) of the reduced loss, times the upstream scalar
        grad_tokens = grad_loss.reshape(1).expand(hidden.shape[0])
        if ctx.reduction == "mean":
            normalizer = saved[6]
            denom = normalizer if normalizer is not None else (
                kept_mask(labels, keep, ctx.args[0]).sum().clamp(min=1).to(grad_loss.dtype))
            grad_tokens = grad_tokens / denom
    return _token_ce_backward(grad_tokens.contiguous(), hidden, weight, labels, bias, token_weights, keep, *ctx.args,
                              mask, ctx.accumulation)


def _backward(ctx, grad_loss, *_unused):
    mask = ctx.grad_mask if grad_loss is not None else 0  # None: no gradient reached the loss output
    if mask == 0:
        gh = gw = gb = None
    elif ctx.reduction != "none" and ctx.handover is None:  # traced (torch.compile, AOTAutograd)
        gh, gw, gb = ctx.saved_tensors
        g = grad_loss
        gh = gh * g.to(gh.dtype) if mask & GRAD_HIDDEN else None
        gw = gw * g.to(gw.dtype) if mask & GRAD_WEIGHT else None
        gb = gb * g.to(gb.dtype) if (mask & GRAD_BIAS and ctx.has_bias) else None
    elif ctx.handover:  # first eager backward of 'mean'/'sum': scale in place (0-dim upstream: no host sync)
        gh, gw, gb = ctx.handover
        ctx.handover = []
        g = grad_loss
        gh = gh.mul_(g.to(gh.dtype)) if mask & GRAD_HIDDEN else None
        gw = gw.mul_(g.to(gw.dtype)) if mask & GRAD_WEIGHT else None
        gb = gb.mul_(g.to(gb.dtype)) if (mask & GRAD_BIAS and ctx.has_bias) else None
    else:
        gh, gw, gb = _recompute_gradients(ctx, grad_loss, mask)
    if not mask & GRAD_HIDDEN:
        gh = None
    if not mask & GRAD_WEIGHT:
        gw = None
    if not (mask & GRAD_BIAS and ctx.has_bias):
        gb = None
    return gh, gw, None, gb, None, None, None, None, None, None, None, None, None, None, None


_token_ce.register_autograd(_backward, setup_context=_setup_context)

# FLOP formulas (FlopCounterMode then counts the lm_head matmuls done inside the ops). torch.utils.flop_counter
# imports triton, which `import lit_ft.kernels` must not: register now only if it is already loaded (Lightning
# loads it), else lit_ft.kernels.token_ce.flops.register() does it on demand (lit_ft's modules call it).
if "torch.utils.flop_counter" in sys.modules:
    from . import flops as _flops  # noqa: E402

    _flops.register()


# ----------------------------------------------------------------------------------------------------------------
# public wrapper


def fused_linear_token_ce(
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
    return_nll: bool = False,
    return_entropy: bool = False,
    return_lse: bool = False,
    logit_softcap: Optional[float] = None,
    logit_scale: Optional[float] = None,
    chunk_size: Optional[int] = None,
    impl: str = "auto",
    weight_grad_accumulation: str = "fp32",
):
    """Per-token weighted cross-entropy of ``hidden @ weight.T (+ bias)`` without materialising ``[N, V]`` logits.

    Args:
        hidden: ``[N, D]`` final hidden states (fp16/bf16/fp32/fp64; flatten batch and time first).
        weight: ``[V, D]`` lm_head (or tied embedding) matrix, same dtype and device as ``hidden``.
        labels: ``[N]`` integer targets in ``[0, V)``; ``ignore_index`` marks ignored positions. Any other value
            raises ``ValueError`` naming ``V``: always on CPU, on CUDA within the cuBLAS route's one host read (and
            on every call with the env ``LIT_FT_CHECK_LABELS=1``; the no-sync Triton route does not check).
        bias: optional ``[V]`` lm_head bias.
        token_weights: optional float ``[N]`` per-token weights (no gradient flows into them).
        keep: optional bool ``[N]``; ``False`` drops a token (it is packed out before the matmuls).
        ignore_index: label value of ignored tokens.
        reduction: ``"mean"`` (Σ w·nll / normalizer, or / max(#kept, 1)), ``"sum"`` or ``"none"`` (``[N]``, 0 where
            not kept, exact gradients for any upstream per-token gradient).
        normalizer: optional 0-dim tensor dividing the sum for ``"mean"`` (e.g. a global token count).
        return_nll, return_entropy, return_lse: also return these ``[N]`` detached tensors (see TokenCEOutput).
        logit_softcap: ``c`` for ``z -> c * tanh(z / c)`` (applied after ``logit_scale``), ``None`` = off.
        logit_scale: multiply logits by this before softcap / softmax, ``None`` = off.
        chunk_size: tokens per chunk (default: chunks whose logits are about the size of ``hidden``).
        impl: ``"auto"`` (Triton on CUDA with compute capability >= 8.0, else torch; env ``LIT_FT_IMPL``
            overrides), ``"torch"`` or ``"triton"`` (raises when it cannot run).
        weight_grad_accumulation: how the ``weight`` gradient is summed over token chunks for bf16/fp16 inputs
            (the small bias gradient always uses fp32). ``"fp32"`` (default): an fp32 ``[V, D]`` accumulator, cast once at the end (exact up
            to the final rounding; costs 4 + 2 bytes per lm_head element). ``"input"``: accumulate straight into a
            gradient of the weight's dtype (2 bytes per element, no final copy; each chunk's contribution is
            rounded, as in Liger-Kernel's default). Identical results for fp32/fp64 inputs.

    Returns:
        The loss tensor (0-dim, or ``[N]`` for ``reduction="none"``; fp32, fp64 for fp64 inputs), or a
        :class:`TokenCEOutput` when any ``return_*`` flag is set.
    """
    n, d, v = check_linear_inputs(hidden, weight)
    _check_tensor("labels", labels, ndim=1, dtypes=(torch.int64, torch.int32), what="[N]")
    if labels.shape[0] != n:
        raise ValueError(f"labels must have shape [N]=[{n}] to match hidden, got {tuple(labels.shape)}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if token_weights is not None:
        _check_tensor("token_weights", token_weights, ndim=1, dtypes=FLOAT_DTYPES, what="[N]")
        if token_weights.shape[0] != n:
            raise ValueError(f"token_weights must have shape [N]=[{n}], got {tuple(token_weights.shape)}")
        token_weights = token_weights.to(hidden.device).detach()
    check_bias_and_keep(bias, keep, hidden, n, v)
    if keep is not None:
        keep = keep.to(hidden.device)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None:
        if not isinstance(normalizer, Tensor) or normalizer.numel() != 1:
            raise TypeError(f"normalizer must be a 0-dim tensor (e.g. a global token count), got {normalizer!r}")
        normalizer = normalizer.detach().reshape(()).to(device=hidden.device, dtype=_acc(hidden.dtype))
    check_logit_options(logit_softcap, logit_scale, chunk_size)
    if weight_grad_accumulation not in ACCUMULATIONS:
        raise ValueError(f"weight_grad_accumulation must be one of {ACCUMULATIONS}, got {weight_grad_accumulation!r}")
    impl_name = resolve_impl_traced(impl, hidden.device)
    if not _tracing(labels) and (labels.device.type == "cpu" or os.environ.get(CHECK_LABELS_ENV) == "1"):
        check_label_range(labels, int(ignore_index), v)

    grad_mask = linear_grad_mask(hidden, weight, bias)

    loss, nll, ent, lse, _, _, _ = _token_ce(
        hidden, weight, labels, bias, token_weights, keep, normalizer, int(ignore_index), reduction,
        float(logit_softcap or 0.0), float(logit_scale if logit_scale is not None else 1.0), int(chunk_size or 0),
        impl_name, grad_mask, weight_grad_accumulation,
    )
    if not (return_nll or return_entropy or return_lse):
        return loss
    return TokenCEOutput(
        loss,
        nll.detach() if return_nll else None,
        ent.detach() if return_entropy else None,
        lse.detach() if return_lse else None,
    )
