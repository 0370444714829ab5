"""Element masks as data: the check every mask goes through, and 1-bit packing for checkpoints.

A mask is a ``torch.bool`` tensor of its parameter's shape, ``True`` = this element may change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

__all__ = ["pack_mask", "unpack_mask"]

_PACK_FORMAT = "packbits"


def check_mask(mask: Any, argname: str, shape: Optional[torch.Size] = None) -> torch.Tensor:
    """``mask`` detached, after checking it is a ``torch.bool`` tensor (of ``shape`` if given)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"`{argname}` must be a torch.bool tensor, got {type(mask).__name__}.")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"`{argname}` must have dtype torch.bool (True = element may change), got {mask.dtype}; "
            f"convert with `mask.bool()` or `mask != 0`."
        )
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"`{argname}` has shape {tuple(mask.shape)} but the parameter has shape {tuple(shape)}.")
    return mask.detach()



_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits bitorder="big"


def pack_mask(mask: torch.Tensor) -> dict[str, Any]:
    """Pack a ``torch.bool`` tensor into 1 bit per element (same bytes as ``numpy.packbits(bitorder="big")`` over
    the row-major flattening; padding bits are 0).

    Returns:
        ``{"format": "packbits", "shape": list[int], "bits": uint8 CPU tensor of ceil(numel / 8) bytes}``.
    """
    mask = check_mask(mask, "mask")
    flat = mask.reshape(-1)
    n = flat.numel()
    pad = (-n) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    bits = (flat.view(-1, 8).to(torch.uint8) * weights).sum(dim=1, dtype=torch.uint8)
    return {"format": _PACK_FORMAT, "shape": [int(s) for s in mask.shape], "bits": bits.cpu()}


def unpack_mask(packed: Mapping[str, Any], device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Inverse of :func:`pack_mask`.

    Args:
        packed: the dict returned by :func:`pack_mask`.
        device: device of the returned mask (default CPU).

    Raises:
        ValueError: ``packed`` is malformed (missing keys, wrong dtype, or a byte count that does not fit ``shape``).
    """
    if not isinstance(packed, Mapping) or packed.get("format") != _PACK_FORMAT or "shape" not in packed:
        raise ValueError(
            f"`packed` must be a dict made by pack_mask (keys 'format'={_PACK_FORMAT!r}, 'shape', 'bits'), "
            f"got {packed if not isinstance(packed, Mapping) else sorted(packed)!r}."
        )
    shape = packed["shape"]
    if not isinstance(shape, (list, tuple)) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"`packed['shape']` must be a list of non-negative ints, got {shape!r}.")
    bits = packed.get("bits")
    if not isinstance(bits, torch.Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1:
        raise ValueError(
            f"`packed['bits']` must be a 1-D torch.uint8 tensor, got "
            f"{type(bits).__name__ if not isinstance(bits, torch.Tensor) else (bits.dtype, tuple(bits.shape))}."
        )
    n = math.prod(shape)
    if bits.numel() != (n + 7) // 8:
        raise ValueError(
            f"`packed['bits']` has {bits.numel()} bytes but shape {list(shape)} needs {(n + 7) // 8}."
        )
    bits = bits.to(device) if device is not None else bits
    shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8, device=bits.device)
    flat = ((bits.unsqueeze(1) >> shifts) & 1).reshape(-1)[:n].bool()
    return flat.reshape(shape)
