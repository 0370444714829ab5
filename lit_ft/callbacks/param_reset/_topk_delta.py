"""Top-K of ``|θ − θ₀|`` over many tensors without materialising them together (LT-SFT's selection)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Optional

import torch

__all__ = ["topk_abs_delta_masks"]

_CHUNK = 1 << 22  # elements per chunk of the threshold passes: extra memory ~ 5 * 4 MiB * 4 bytes, whatever the model
_INF_BITS = 0x7F800000


def _abs_delta_bits(p: torch.Tensor, base: torch.Tensor, chunk: int) -> Iterator[torch.Tensor]:
    """int64 bit patterns of |p − base| (float32) in flat row-major chunks (non-negative floats order as their bits)."""
    flat_p = p.detach().reshape(-1)
    flat_b = base.reshape(-1)
    for s in range(0, flat_p.numel(), chunk):
        d = (flat_p[s : s + chunk].float() - flat_b[s : s + chunk].to(flat_p.device).float()).abs_()
        yield d.view(torch.int32).to(torch.int64)


def _allowed_chunks(exclude: Optional[torch.Tensor], numel: int, chunk: int, device: torch.device) -> Iterator[Optional[torch.Tensor]]:
    """Per chunk: the entries that may be selected (``None``: all of them)."""
    flat = None if exclude is None else exclude.reshape(-1).to(device)
    for s in range(0, numel, chunk):
        yield None if flat is None else ~flat[s : s + chunk]


def topk_abs_delta_masks(
    params: Mapping[str, torch.Tensor],
    theta0: Mapping[str, torch.Tensor],
    k: int,
    chunk: int = _CHUNK,
    exclude: Optional[Mapping[str, torch.Tensor]] = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """Boolean masks of the ``k`` entries with the largest ``|θ − θ₀|`` over all tensors of ``params``.

    The k-th largest value is found exactly by a 4-pass radix select over the float32 bit patterns (a 256-bin
    ``bincount`` per byte, chunk by chunk), so the extra memory is O(``chunk``) however large the model, and no list
    of all values is ever built. Ties at the threshold are broken by model order then flat index, so exactly ``k``
    entries are kept and the result depends only on the values (identical on every DDP rank).

    Args:
        params: name -> tensor ``θ`` (model order is the mapping's order).
        theta0: name -> tensor ``θ₀`` of the same shape (any device / dtype; compared in float32).
        k: number of entries to keep, ``1 <= k <= total`` (total: the entries not excluded).
        chunk: elements per pass chunk.
        exclude: name -> bool mask of entries that may not be selected (LT-SFT's later iterations: the entries
            already unfrozen); a missing name excludes nothing.

    Returns:
        ``(masks, threshold)``: name -> ``torch.bool`` mask on the parameter's device (never true on an excluded
        entry), and the k-th largest ``|Δ|`` among the selectable entries.

    Raises:
        ValueError: ``k`` out of range, or a non-finite difference.
    """
    names = list(params)
    excl = {n: (exclude or {}).get(n) for n in names}
    total = sum(params[n].numel() - (0 if excl[n] is None else int(excl[n].sum())) for n in names)  # type: ignore[union-attr]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= total:
        what = "maskable" if exclude is None else "maskable entries not selected yet"
        raise ValueError(f"`k` must be an int in [1, {total}] (the number of {what}), got {k!r}.")

    def chunks() -> Iterator[torch.Tensor]:
        for n in names:
            p = params[n]
            allowed = _allowed_chunks(excl[n], p.numel(), chunk, p.device)
            for bits, ok in zip(_abs_delta_bits(p, theta0[n], chunk), allowed):
                yield bits if ok is None else bits[ok]

    prefix, prefix_mask, need = 0, 0, k
    for shift in (24, 16, 8, 0):
        hist = None
        for bits in chunks():
            if shift == 24 and bool((bits > _INF_BITS).any()):
                bad = next(n for n in names if not torch.isfinite(params[n].detach().float() - theta0[n].to(params[n].device).float()).all())
                raise ValueError(f"LotteryTicketSparseFT: |θ − θ₀| of {bad!r} is not finite (NaN); cannot rank entries.")
            sel = bits if prefix_mask == 0 else bits[(bits & prefix_mask) == prefix]
            h = torch.bincount((sel >> shift) & 0xFF, minlength=256)
            hist = h if hist is None else hist + h
        counts = hist.cpu().tolist()  # type: ignore[union-attr]
        above = 0
        for b in range(255, -1, -1):
            if above + counts[b] >= need:
                need -= above
                prefix |= b << shift
                prefix_mask |= 0xFF << shift
                break
            above += counts[b]
    threshold_bits, ties = prefix, need  # keep every entry above, and the first `ties` entries equal to it
    masks: dict[str, torch.Tensor] = {}
    for n in names:
        p = params[n]
        parts = []
        allowed = _allowed_chunks(excl[n], p.numel(), chunk, p.device)
        for bits, ok in zip(_abs_delta_bits(p, theta0[n], chunk), allowed):
            m = bits > threshold_bits
            eq = bits == threshold_bits
            if ok is not None:
                m &= ok
                eq &= ok
            if ties > 0:
                take = eq & (torch.cumsum(eq, 0) <= ties)
                ties -= int(take.sum())
                m |= take
            parts.append(m)
        masks[n] = torch.cat(parts).view(p.shape) if parts else torch.zeros(p.shape, dtype=torch.bool)
    threshold = float(torch.tensor([threshold_bits], dtype=torch.int32).view(torch.float32))
    return masks, threshold
