"""Gumbel-max sampling of K tokens per row from ``softmax(z / temperature)`` over vocabulary chunks, with
counter-based noise: the Gumbel variable of (row, sample k, token v) is a hash of ``(seed, row_id, k, v)``.

Why a hash and not ``torch.rand``: the objective's chunk function runs once per chunk of rows (and again when a
retained graph is backpropagated twice, or in ``recompute`` mode), so its value must depend only on its inputs.
Hashing makes the samples a function of ``(seed, row id)`` alone: the same at level 2 (all rows at once) and level 3
(chunks of rows), for every row-chunk and vocabulary-chunk size, and on every replay. The vocabulary is walked in
chunks of ``vocab_chunk_size`` columns holding K running maxima, so no ``[rows, K, V]`` noise tensor exists.

The hash is Chris Wellons' ``lowbias32`` (an xorshift-multiply mixer), applied twice, computed in int64 with 32-bit
masking so that no product overflows. Uniforms have 24 random bits (``torch.rand``'s float32 resolution).
"""

from __future__ import annotations

import torch

from lit_ft.core.counter_hash import GOLDEN, M32, lowbias32

_M32 = M32
_GOLDEN = GOLDEN
#: elements of one [rows, K, vocab chunk] noise block when the vocabulary chunk is chosen automatically (~32 MB int64)
AUTO_BLOCK_ELEMENTS = 1 << 22


def mix32(x: torch.Tensor) -> torch.Tensor:
    """``lowbias32`` (:mod:`lit_ft.core.counter_hash`): the mixer of every key below."""
    return lowbias32(x)


def sample_keys(seed: int, row_ids: torch.Tensor, num_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two int64 ``[rows, K]`` keys per (row, sample): the noise stream of each."""
    row = mix32(mix32(row_ids.to(torch.int64) & _M32) ^ (int(seed) & _M32))
    k = torch.arange(1, num_samples + 1, device=row_ids.device, dtype=torch.int64)
    key = mix32((row[:, None] + k[None, :] * _GOLDEN) & _M32)
    return key, mix32(key ^ 0x5BD1E995)


def gumbel_noise(key: torch.Tensor, key2: torch.Tensor, v0: int, v1: int, dtype: torch.dtype) -> torch.Tensor:
    """Standard Gumbel noise ``[rows, K, v1 - v0]`` for the vocabulary columns ``v0 .. v1 - 1``."""
    v = torch.arange(v0, v1, device=key.device, dtype=torch.int64)
    bits = mix32(mix32(key[..., None] ^ v) ^ key2[..., None])
    u = ((bits >> 8).to(dtype) + 0.5) * (2.0 ** -24)  # in (0, 1): never log(0)
    return -torch.log(-torch.log(u))


def auto_vocab_chunk(rows: int, num_samples: int, vocab: int) -> int:
    """Columns per noise block so that one ``[rows, K, chunk]`` block holds about :data:`AUTO_BLOCK_ELEMENTS`."""
    return max(1, min(vocab, AUTO_BLOCK_ELEMENTS // max(1, rows * num_samples)))


@torch.no_grad()
def gumbel_max_sample(logits: torch.Tensor, num_samples: int, seed: int, row_ids: torch.Tensor,
                      temperature: float = 1.0, vocab_chunk_size: int | None = None) -> torch.Tensor:
    """``num_samples`` independent draws per row from ``softmax(logits / temperature)`` (with replacement).

    Args:
        logits: ``[rows, V]`` float logits (not differentiated).
        num_samples: draws per row (K >= 1).
        seed: the draw's seed (an int; reduced mod 2**32).
        row_ids: ``[rows]`` int ids of the rows (e.g. their flat positions in the batch): the noise of a row depends
            on ``(seed, row id)`` only, so equal ids get equal draws.
        temperature: sampling temperature (> 0).
        vocab_chunk_size: vocabulary columns per noise block (None: :func:`auto_vocab_chunk`).

    Returns:
        int64 ``[rows, K]`` token ids.
    """
    rows, vocab = logits.shape
    key, key2 = sample_keys(seed, row_ids, num_samples)
    chunk = vocab_chunk_size or auto_vocab_chunk(rows, num_samples, vocab)
    dtype = logits.dtype if logits.dtype in (torch.float32, torch.float64) else torch.float32
    scaled = logits.to(dtype) / temperature
    best = torch.full((rows, num_samples), float("-inf"), device=logits.device, dtype=dtype)
    best_id = torch.zeros((rows, num_samples), device=logits.device, dtype=torch.int64)
    for v0 in range(0, vocab, chunk):
        v1 = min(vocab, v0 + chunk)
        score = scaled[:, None, v0:v1] + gumbel_noise(key, key2, v0, v1, dtype)
        top, arg = score.max(dim=-1)
        better = top > best  # strict: a tie keeps the earlier column, as one argmax over the whole row would
        best = torch.where(better, top, best)
        best_id = torch.where(better, arg + v0, best_id)
    return best_id
