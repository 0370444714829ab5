"""Token selection helpers shared by scorers: batch- and rank-global top-k, per-response top-k and min-max."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist


def dist_ready() -> bool:
    """True inside an initialised torch.distributed group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_varlen(x: torch.Tensor, return_sizes: bool = False) -> Any:
    """All-gather 1-D tensors of different lengths from every rank, concatenated in rank order.

    With ``return_sizes`` also returns the list of per-rank lengths (e.g. to find this rank's offset)."""
    n = torch.tensor([x.numel()], device=x.device)
    sizes_t = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes_t, n)
    sizes = [int(s.item()) for s in sizes_t]
    padded = torch.zeros(max(sizes), dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x.reshape(-1)
    out = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    values = torch.cat([o[:s] for o, s in zip(out, sizes)])
    return (values, sizes) if return_sizes else values


def _ceil_count(ratio: float, n: int) -> int:
    """``ceil(ratio * n)`` with a 1e-9 tolerance: float error must not keep one token too many
    (``0.7 * 10 = 7.000000000000001``)."""
    return max(0, math.ceil(ratio * n - 1e-9))


def global_topk_mask(scores: torch.Tensor, valid: torch.Tensor, ratio: float, largest: bool = True) -> torch.Tensor:
    """Keep the ``ceil(ratio * n_valid)`` highest-scoring valid tokens, counted over the whole batch *and* all
    DDP ranks (so a rank whose batch is easy keeps fewer tokens, as one large batch would).

    Exactly k tokens are kept. Ties are broken by position: rank order, then row-major order within a rank — the
    order the tokens would have in the single large batch made by concatenating the ranks' batches — so 2 ranks x
    batch 4 select exactly what 1 process x batch 8 selects (ties are common: e.g. an excess loss against the
    initial weights is 0 everywhere at step 0).
    """
    if not isinstance(ratio, (int, float)) or not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    s = scores.detach().float()
    if not largest:
        s = -s
    flat_valid_idx = valid.reshape(-1).nonzero().squeeze(1)
    local = s.reshape(-1)[flat_valid_idx]
    keep = torch.zeros_like(valid)
    if not dist_ready():
        k = _ceil_count(ratio, local.numel())
        if k == 0:
            return keep
        order = torch.sort(local, descending=True, stable=True).indices[:k]
        keep.view(-1)[flat_valid_idx[order]] = True
        return keep
    pool = gather_varlen(local)
    k = _ceil_count(ratio, pool.numel())
    if k == 0:
        return keep
    threshold = torch.sort(pool, descending=True, stable=True).values[k - 1]
    ties_needed = k - int((pool > threshold).sum())
    local_ties = (local == threshold).nonzero().squeeze(1)
    tie_counts = [torch.zeros(1, dtype=torch.long, device=s.device) for _ in range(dist.get_world_size())]
    dist.all_gather(tie_counts, torch.tensor([local_ties.numel()], device=s.device))
    before = int(sum(int(c) for c in tie_counts[: dist.get_rank()]))
    take = max(0, min(local_ties.numel(), ties_needed - before))
    chosen = torch.cat([(local > threshold).nonzero().squeeze(1), local_ties[:take]])
    keep.view(-1)[flat_valid_idx[chosen]] = True
    return keep


def per_response_min_max(values: torch.Tensor, valid: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Min-max normalise each row of ``values`` over its ``valid`` entries: ``(v − min) / (max − min + eps)``
    (the release's formula; a constant row maps to 0). Invalid entries are 0."""
    v = values.float()
    inf = torch.tensor(float("inf"), device=v.device)
    lo = torch.where(valid, v, inf).amin(1, keepdim=True)
    hi = torch.where(valid, v, -inf).amax(1, keepdim=True)
    out = (v - lo) / (hi - lo + eps)
    return torch.where(valid, out, torch.zeros_like(out))


def per_response_topk_mask(scores: torch.Tensor, valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """Keep the ``⌈ratio·n_i⌉`` highest-scoring valid tokens of every row ``i`` (``n_i`` = its valid tokens).

    Ties are broken by position (earlier first). ``⌈·⌉`` is taken with a 1e-9 tolerance so that float error in
    ``ratio·n`` (e.g. ``0.7·10 = 7.000000000000001``) does not keep one token too many.
    """
    if not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
    B, T = scores.shape
    n = valid.sum(1)
    k = torch.ceil(n.double() * float(ratio) - 1e-9).long().clamp(min=0)
    k = torch.minimum(k, n)
    s = scores.detach().float().masked_fill(~valid, float("-inf"))
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T, device=s.device).expand(B, T).contiguous())
    return valid & (rank < k[:, None])
