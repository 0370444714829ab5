"""SSToken's keep mask with its protections: always-kept tokens (EOS / end of turn), a minimum per response and an
exploration share; and where the end-of-turn ids come from (model config, generation config, tokenizer)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

#: chat end-of-turn tokens of common templates (ChatML/SmolLM2/Qwen, Llama 3, Phi-3, Gemma, GPT-style). Only those
#: the tokenizer has as special / added tokens are used (a plain-text token with this spelling is never protected).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>")


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, Iterable):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def end_of_turn_ids(hf_model: torch.nn.Module | None, tokenizer: Any = None) -> frozenset[int]:
    """Token ids that end a response: the model config's and generation config's ``eos_token_id`` (an int or a
    list: Llama 3 lists ``<|eot_id|>`` there), the tokenizer's ``eos_token_id`` and the tokenizer's special tokens
    named in :data:`END_OF_TURN_TOKENS`. Ids outside the model's vocabulary are dropped."""
    ids: set[int] = set()
    vocab = None
    for cfg in (getattr(hf_model, "config", None), getattr(hf_model, "generation_config", None)):
        ids.update(_ids(getattr(cfg, "eos_token_id", None)))
        vocab = vocab or getattr(cfg, "vocab_size", None)
    if tokenizer is not None:
        ids.update(_ids(getattr(tokenizer, "eos_token_id", None)))
        specials = set(getattr(tokenizer, "all_special_tokens", None) or ())
        specials |= set(getattr(tokenizer, "added_tokens_encoder", None) or ())
        for tok in END_OF_TURN_TOKENS:
            if tok in specials:
                ids.update(_ids(tokenizer.convert_tokens_to_ids(tok)))
    return frozenset(i for i in ids if i >= 0 and (vocab is None or i < int(vocab)))


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry in its row, highest first, ties by position (stable)."""
    B, T = scores.shape
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(T, device=scores.device).expand(B, T).contiguous())
    return rank


def keep_counts(valid: torch.Tensor, ratio: float, min_keep: int = 0, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens kept per row: ``min(n_i, max(⌈ratio·n_i⌉, min_keep, forced_i))`` (``⌈·⌉`` with a 1e-9 tolerance, as
    :func:`lit_ft.core.loss.per_response_topk_mask`)."""
    n = valid.sum(1)
    k = torch.ceil(n.double() * float(ratio) - 1e-9).long().clamp(min=0)
    k = torch.clamp(k, min=int(min_keep))
    if forced is not None:
        k = torch.maximum(k, (forced & valid).sum(1))
    return torch.minimum(k, n)


def protected_topk_mask(
    scores: torch.Tensor,
    valid: torch.Tensor,
    ratio: float,
    *,
    forced: torch.Tensor | None = None,
    min_keep: int = 0,
    explore_ratio: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-row top-k keep mask with protections; without them it equals ``per_response_topk_mask``.

    Row ``i`` keeps :func:`keep_counts` tokens: first every ``forced`` valid token (EOS / end of turn), then the
    highest scores, except that a share ``explore_ratio`` of the non-forced slots (stochastically rounded, so the
    expected share is exact for short rows too) goes to uniformly random tokens among those not picked by score.
    The random draws come from ``generator`` (CPU) so a seeded run selects the same tokens.
    """
    valid = valid.bool()
    forced = torch.zeros_like(valid) if forced is None else forced.bool() & valid
    k = keep_counts(valid, ratio, min_keep, forced)
    s = scores.detach().float().masked_fill(~valid, float("-inf"))
    s = s.masked_fill(forced, float("inf"))  # forced first (ties among them by position)
    if explore_ratio > 0.0:
        B, T = valid.shape
        u = torch.rand(B, generator=generator).to(valid.device)
        free = (k - forced.sum(1)).clamp(min=0)
        explore = torch.floor(free.double() * float(explore_ratio) + u.double()).long()
        explore = torch.minimum(explore, free)
    else:
        explore = torch.zeros_like(k)
    keep = valid & (_ranks(s) < (k - explore)[:, None])
    if bool((explore > 0).any()):
        r = torch.rand(valid.shape, generator=generator).to(valid.device)
        r = r.masked_fill(~valid | keep, float("-inf"))
        keep = keep | (valid & ~keep & (_ranks(r) < explore[:, None]))
    return keep


__all__ = ["END_OF_TURN_TOKENS", "end_of_turn_ids", "keep_counts", "protected_topk_mask"]
