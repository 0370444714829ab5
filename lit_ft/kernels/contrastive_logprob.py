"""Contrastive log-probability of the target token over two models' heads, vocabulary-chunked (cDPO's scoring).

``log softmax((1 + β)·z_pos − β·z_neg)[y]`` per row, where ``z_pos = h_pos @ W_pos.T`` and ``z_neg = h_neg @ W_neg.T``
are the two models' logits. The ``[N, V]`` logits of neither model are ever built: rows are taken in blocks and the
vocabulary in chunks; per chunk the two partial logit blocks are combined, and a running maximum and sum of
exponentials (the online log-sum-exp) and the target's combined logit are kept per row. Peak extra memory is a few
``[row_chunk, vocab_chunk]`` fp32 blocks, whatever ``N`` and ``V``.

Forward only (scoring runs under ``no_grad``; nothing here is differentiated). When both heads are the *same* weight
tensor (LoRA models that only touch the MLP share the base's lm_head) and no bias or logit transform is involved,
``(1 + β)·h_pos W.T − β·h_neg W.T = ((1 + β)·h_pos − β·h_neg) W.T``: one GEMM per chunk instead of two.

The reference (the spec) is :func:`contrastive_logprob_reference`: the dense computation on full logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import FLOAT_DTYPES, check_tensor

__all__ = ["contrastive_logprob", "contrastive_logprob_reference", "IGNORE_INDEX"]

IGNORE_INDEX = -100
#: default block sizes: a [1024, 8192] fp32 block is 32 MiB
DEFAULT_ROW_CHUNK = 1024
DEFAULT_VOCAB_CHUNK = 8192


def _transform(z: Tensor, logit_scale: Optional[float], logit_softcap: Optional[float]) -> Tensor:
    if logit_scale is not None:
        z = z * logit_scale
    if logit_softcap is not None:
        z = logit_softcap * torch.tanh(z / logit_softcap)
    return z


def _check(hidden_pos: Tensor, weight_pos: Tensor, hidden_neg: Tensor, weight_neg: Tensor, targets: Tensor,
           bias_pos: Optional[Tensor], bias_neg: Optional[Tensor], beta: float) -> tuple[int, int]:
    for name, h, w in (("pos", hidden_pos, weight_pos), ("neg", hidden_neg, weight_neg)):
        check_tensor(f"hidden_{name}", h, ndim=2, dtypes=FLOAT_DTYPES, what="[N, D]; flatten batch and time first")
        check_tensor(f"weight_{name}", w, ndim=2, dtypes=FLOAT_DTYPES, what="[V, D]")
        if w.shape[1] != h.shape[1]:
            raise ValueError(f"weight_{name} must be [V, D] with D={h.shape[1]} (hidden_{name}'s last dim), got "
                             f"shape {tuple(w.shape)}")
        if w.dtype != h.dtype or w.device != h.device:
            raise TypeError(f"weight_{name} ({w.dtype}, {w.device}) must match hidden_{name}'s dtype and device "
                            f"({h.dtype}, {h.device})")
    n, v = hidden_pos.shape[0], weight_pos.shape[0]
    if hidden_neg.shape[0] != n:
        raise ValueError(f"hidden_neg must have N={n} rows (hidden_pos's), got shape {tuple(hidden_neg.shape)}")
    if weight_neg.shape[0] != v or v == 0:
        raise ValueError(f"weight_neg must have V={v} rows (weight_pos's vocabulary), got shape "
                         f"{tuple(weight_neg.shape)}")
    if hidden_neg.device != hidden_pos.device:
        raise ValueError(f"hidden_neg is on {hidden_neg.device} but hidden_pos is on {hidden_pos.device}")
    check_tensor("targets", targets, ndim=1, what="[N]")
    if targets.shape[0] != n or targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor [N]=[{n}], got {targets.dtype} {tuple(targets.shape)}")
    for name, b, h in (("bias_pos", bias_pos, hidden_pos), ("bias_neg", bias_neg, hidden_neg)):
        if b is not None and (b.dim() != 1 or b.shape[0] != v or b.dtype != h.dtype or b.device != h.device):
            raise ValueError(f"{name} must be [V]=[{v}] in its hidden's dtype/device, got {b.dtype} "
                             f"{tuple(b.shape)} on {b.device}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not beta >= 0 or beta == float("inf"):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    return n, v


@torch.no_grad()
def contrastive_logprob(hidden_pos: Tensor, weight_pos: Tensor, hidden_neg: Tensor, weight_neg: Tensor,
                        targets: Tensor, *, beta: float = 1.0, bias_pos: Optional[Tensor] = None,
                        bias_neg: Optional[Tensor] = None, logit_scale: Optional[float] = None,
                        logit_softcap: Optional[float] = None, row_chunk: Optional[int] = None,
                        vocab_chunk: Optional[int] = None) -> Tensor:
    """``log softmax((1 + β)·z_pos − β·z_neg)[targets]`` per row, without ``[N, V]`` logits (no gradient).

    Args:
        hidden_pos: ``[N, D_pos]`` final hidden states of the positive model (fp16/bf16/fp32/fp64).
        weight_pos: ``[V, D_pos]`` its lm_head (same dtype and device as ``hidden_pos``).
        hidden_neg: ``[N, D_neg]`` final hidden states of the negative model, row for row with ``hidden_pos``.
        weight_neg: ``[V, D_neg]`` its lm_head (may be the same tensor as ``weight_pos``).
        targets: integer ``[N]`` token ids; rows with ``-100`` are not scored (their result is 0).
        beta: β >= 0 of the contrast (cDPO: 1, i.e. ``2·z_pos − z_neg``; 0 gives the positive model alone).
        bias_pos / bias_neg: optional ``[V]`` lm_head biases.
        logit_scale / logit_softcap: each model's logit transforms (scale, then ``c·tanh(z/c)``), applied to each
            model's logits before they are combined; ``None`` = off.
        row_chunk: rows per block (default 1024).
        vocab_chunk: vocabulary columns per block (default 8192).

    Returns:
        ``[N]`` log-probabilities, float32 (fp64 for fp64 inputs); 0 on ignored rows.
    """
    n, v = _check(hidden_pos, weight_pos, hidden_neg, weight_neg, targets, bias_pos, bias_neg, beta)
    for name, value in (("row_chunk", row_chunk), ("vocab_chunk", vocab_chunk)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {value!r}")
    acc = torch.float64 if hidden_pos.dtype == torch.float64 else torch.float32
    device = hidden_pos.device
    out = torch.zeros(n, dtype=acc, device=device)
    targets = targets.to(device)
    scored = (targets != IGNORE_INDEX).nonzero().squeeze(1)  # host sync: the packed size sets the shapes
    if scored.numel() == 0:
        return out
    bad = targets[scored]
    if bool(((bad < 0) | (bad >= v)).any()):
        raise ValueError(f"targets must be token ids in [0, {v}) or -100 (ignored), got values in "
                         f"[{int(bad.min())}, {int(bad.max())}]")
    a, b = 1.0 + float(beta), float(beta)
    # one GEMM per chunk when the heads are one tensor and the logits are a linear function of the hidden states
    shared = (weight_pos is weight_neg or (weight_pos.data_ptr() == weight_neg.data_ptr()
                                           and weight_pos.shape == weight_neg.shape
                                           and weight_pos.stride() == weight_neg.stride())) \
        and bias_pos is None and bias_neg is None and logit_softcap is None and hidden_pos.dtype == hidden_neg.dtype
    rc = row_chunk or DEFAULT_ROW_CHUNK
    vc = min(vocab_chunk or DEFAULT_VOCAB_CHUNK, v)
    for r0 in range(0, scored.numel(), rc):
        rows = scored[r0:r0 + rc]
        y = targets[rows].long()
        hp = hidden_pos.index_select(0, rows)
        hn = hidden_neg.index_select(0, rows)
        if shared:
            # in the compute dtype, then back to the head's dtype for the GEMM (as the model's own head runs)
            hc = (a * hp.to(acc) - b * hn.to(acc)).to(weight_pos.dtype)
        run_max = torch.full((rows.numel(),), -torch.inf, dtype=acc, device=device)
        run_sum = torch.zeros(rows.numel(), dtype=acc, device=device)
        target_logit = torch.zeros(rows.numel(), dtype=acc, device=device)
        for c0 in range(0, v, vc):
            c1 = min(c0 + vc, v)
            if shared:
                z = _transform((hc @ weight_pos[c0:c1].T).to(acc), logit_scale, None)
            else:
                zp = hp @ weight_pos[c0:c1].T
                zn = hn @ weight_neg[c0:c1].T
                if bias_pos is not None:
                    zp = zp + bias_pos[c0:c1]
                if bias_neg is not None:
                    zn = zn + bias_neg[c0:c1]
                z = a * _transform(zp.to(acc), logit_scale, logit_softcap) \
                    - b * _transform(zn.to(acc), logit_scale, logit_softcap)
            new_max = torch.maximum(run_max, z.max(dim=1).values)
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(dim=1)
            run_max = new_max
            inside = (y >= c0) & (y < c1)
            local = (y - c0).clamp(0, c1 - c0 - 1)
            target_logit = torch.where(inside, z.gather(1, local[:, None]).squeeze(1), target_logit)
        out[rows] = target_logit - (run_max + torch.log(run_sum))
    return out


def contrastive_logprob_reference(hidden_pos: Tensor, weight_pos: Tensor, hidden_neg: Tensor, weight_neg: Tensor,
                                  targets: Tensor, *, beta: float = 1.0, bias_pos: Optional[Tensor] = None,
                                  bias_neg: Optional[Tensor] = None, logit_scale: Optional[float] = None,
                                  logit_softcap: Optional[float] = None,
                                  dtype: torch.dtype = torch.float64) -> Tensor:
    """The spec of :func:`contrastive_logprob`: full ``[N, V]`` logits of both models in ``dtype``, combined,
    ``log_softmax``, gathered at the targets (0 on ignored rows)."""
    zp = hidden_pos.to(dtype) @ weight_pos.to(dtype).T
    zn = hidden_neg.to(dtype) @ weight_neg.to(dtype).T
    if bias_pos is not None:
        zp = zp + bias_pos.to(dtype)
    if bias_neg is not None:
        zn = zn + bias_neg.to(dtype)
    z = (1.0 + beta) * _transform(zp, logit_scale, logit_softcap) - beta * _transform(zn, logit_scale, logit_softcap)
    logp = torch.log_softmax(z, dim=-1)
    ignored = targets == IGNORE_INDEX
    got = logp.gather(1, targets.clamp_min(0).long()[:, None]).squeeze(1)
    return torch.where(ignored, torch.zeros_like(got), got)
