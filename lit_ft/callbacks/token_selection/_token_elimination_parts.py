"""The pieces of layer-wise token elimination (LeMo) that do not depend on Lightning.

- :func:`segment_topk`: segment-based, permutation-free selection — the top ``ceil(r·len)`` tokens of every fixed
  segment, returned as ascending positions, so the kept rows keep their order (no permutation of the sequence, and
  every row of a batch keeps the same count: a rectangular ``[B, k]`` index).
- :class:`ScorePredictors`: one small MLP per eliminating layer that predicts the informativeness score from the
  layer's input (LeMo's context-aware pattern prediction), trained online against the exact scores.
- :func:`standardised_log_score`: the regression target of the predictors.
- :func:`topk_agreement`: the share of the exact selection the predicted selection recovers.
- :func:`gather_layer_inputs`: the per-token inputs of a decoder layer besides the hidden states (rotary ``cos``/``sin``,
  ``position_ids``, a 4-D attention mask) gathered at the kept positions, so RoPE and masking stay right.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["segment_counts", "segment_topk", "standardised_log_score", "topk_agreement", "ScorePredictors",
           "gather_layer_inputs"]


def segment_counts(seq_len: int, keep_ratio: float, segment_size: int) -> list[tuple[int, int, int]]:
    """``(start, length, kept)`` per segment: ``kept = ceil(keep_ratio · length)``, at least 1."""
    out = []
    for start in range(0, seq_len, segment_size):
        length = min(segment_size, seq_len - start)
        out.append((start, length, max(1, min(length, math.ceil(keep_ratio * length - 1e-9)))))
    return out


def segment_topk(scores: torch.Tensor, keep_ratio: float, segment_size: int) -> torch.Tensor:
    """Ascending kept positions ``[B, k]`` (int64) of the top ``ceil(keep_ratio · len)`` scores of every segment.

    ``scores``: ``[B, T]`` (higher = more informative; ``-inf`` at positions that must go first, e.g. padding).
    Every row keeps the same number of tokens, ``k = Σ_segments kept``; ties break by position (torch.topk on CPU
    is deterministic; the result is sorted afterwards either way).
    """
    B, T = scores.shape
    scores = scores.float()
    parts = []
    n_full = T // segment_size
    if n_full:  # every full segment in one topk (one kernel, not one per segment)
        kept = segment_counts(segment_size, keep_ratio, segment_size)[0][2]
        top = scores[:, : n_full * segment_size].view(B, n_full, segment_size).topk(kept, dim=2, sorted=False).indices
        offsets = torch.arange(n_full, device=scores.device).view(1, n_full, 1) * segment_size
        parts.append((top + offsets).view(B, n_full * kept))
    if T % segment_size:
        start = n_full * segment_size
        _, length, kept = segment_counts(T - start, keep_ratio, segment_size)[0]
        parts.append(scores[:, start:].topk(kept, dim=1, sorted=False).indices + start)
    idx = torch.cat(parts, dim=1) if parts else scores.new_zeros((B, 0), dtype=torch.long)
    return idx.sort(dim=1).values.to(torch.long)


def standardised_log_score(scores: torch.Tensor, valid: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``log(score + eps)`` standardised per row over the valid positions (0 elsewhere): a target whose ranking is
    the score's and whose scale does not depend on the sequence length (attention mass shrinks like 1/T)."""
    x = torch.log(scores.float().clamp_min(0) + eps)
    v = valid.float()
    n = v.sum(1, keepdim=True).clamp_min(1)
    mean = (x * v).sum(1, keepdim=True) / n
    var = (((x - mean) ** 2) * v).sum(1, keepdim=True) / n
    return ((x - mean) / var.clamp_min(1e-12).sqrt()) * v


def topk_agreement(predicted: torch.Tensor, exact: torch.Tensor, seq_len: int) -> float:
    """``|predicted ∩ exact| / |exact|`` of two kept-position sets ``[B, k]`` (positions in ``[0, seq_len)``)."""
    if exact.numel() == 0:
        return 1.0
    B = exact.shape[0]
    a = torch.zeros(B, seq_len, dtype=torch.bool, device=exact.device)
    b = torch.zeros_like(a)
    a.scatter_(1, predicted, True)
    b.scatter_(1, exact, True)
    return float((a & b).sum()) / float(b.sum())


class ScorePredictors(nn.Module):
    """One two-layer MLP per eliminating decoder layer: ``RMS-normalised input [.., D] → hidden → 1``.

    The input is the layer's hidden state, detached (the predictors never send gradients into the model), scaled
    to unit RMS without a learned weight so one predictor works whatever the residual stream's scale. Initialised
    from ``seed`` so every DDP rank starts from the same predictor (and their gradients are averaged).
    """

    def __init__(self, layers: list[int], dim: int, hidden: int, seed: int) -> None:
        super().__init__()
        self.layers = list(layers)
        g = torch.Generator().manual_seed(int(seed))
        self.mlps = nn.ModuleDict()
        for i in self.layers:
            mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
            with torch.no_grad():
                for p in mlp.parameters():
                    bound = 1.0 / math.sqrt(p.shape[-1])
                    p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=g))
            self.mlps[str(i)] = mlp

    def forward(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Predicted standardised log score ``[B, T]`` (float32) for ``hidden [B, T, D]``."""
        x = hidden.detach().float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.mlps[str(layer)](x).squeeze(-1)


def _batch_gather(t: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` indexed along ``dim`` with the per-row ``idx [B, k]`` (``t``'s dim 0 is the batch, size B or 1)."""
    B, k = idx.shape
    t = t.expand(B, *t.shape[1:])
    shape = [B] + [1] * (t.dim() - 1)
    shape[dim] = k
    index = idx.view(shape).expand(*[k if d == dim else s for d, s in enumerate(t.shape)])
    return t.gather(dim, index)


def gather_layer_inputs(kwargs: dict, idx: torch.Tensor, seq_len: int) -> dict:
    """A decoder layer's keyword inputs restricted to the kept positions ``idx [B, k]`` (new dict).

    ``position_embeddings`` ``(cos, sin)`` ``[B or 1, T, d]`` and ``position_ids`` ``[B or 1, T]`` are gathered along
    time (each kept token keeps its own rotary phase); a 4-D ``attention_mask`` ``[B or 1, H or 1, T, T]`` along both
    query and key dims (order-preserving indices keep it causal). ``None`` masks stay ``None``: SDPA's ``is_causal``
    over the compacted sequence is the causal mask of the kept tokens, since their order is preserved.
    """
    out = dict(kwargs)
    pe = kwargs.get("position_embeddings")
    if pe is not None:
        out["position_embeddings"] = tuple(_batch_gather(t, idx, 1) for t in pe)
    pid = kwargs.get("position_ids")
    if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[-1] == seq_len:
        out["position_ids"] = _batch_gather(pid, idx, 1)
    am = kwargs.get("attention_mask")
    if isinstance(am, torch.Tensor):
        if am.dim() != 4 or am.shape[-1] != seq_len or am.shape[-2] != seq_len:
            raise ValueError(
                f"TokenElimination: the decoder layer got an attention mask of shape {tuple(am.shape)}; only a 4-D "
                f"[B, 1, {seq_len}, {seq_len}] mask (eager / sdpa attention) or None can be restricted to the kept tokens"
            )
        out["attention_mask"] = _batch_gather(_batch_gather(am, idx, 2), idx, 3)
    return out
