"""Counter-based hashing on tensors: 32-bit mixers over uint32 values held in int64 tensors (exact on every device,
no overflow). Techniques whose randomness must be a function of identities — a sample, a position, a step — rather
than of a generator's state use them (MaskedThought's masks, OneTokenRollout's Gumbel noise): the draws then do not
depend on how a batch is sharded over ranks or split into micro-batches, nor on replays."""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9

__all__ = ["GOLDEN", "M32", "fmix32", "lowbias32", "mul32"]


def mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for ``0 <= x < 2**32`` in int64: the constant split in 16-bit halves (no overflow)."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & M32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser (a bijection with full avalanche)."""
    h = h ^ (h >> 16)
    h = mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def lowbias32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' ``lowbias32``: a bijective 32-bit xorshift-multiply mixer."""
    x = x ^ (x >> 16)
    x = mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = mul32(x, 0x846CA68B)
    return x ^ (x >> 16)
