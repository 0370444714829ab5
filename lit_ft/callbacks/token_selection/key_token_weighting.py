"""Key-token weighting (TL-Training's prioritized key-token loss, generalised to any marked spans)."""

from __future__ import annotations

from typing import Any

import torch

from lit_ft.callbacks._token_scorer import TokenScorerCallback
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_number
from lit_ft.core.batch import check_token_tensor, require_keys
from lit_ft.core.loss import TokenDecision, TokenScores

KEY = "key_token_mask"
_PROVIDER = (
    "lit_ft.data.SFTDataModule(key_spans='tool_call' | 'tool_name', or key_span_patterns=[regex, ...]), or a "
    "collate_fn that adds a bool [B, T] 'key_token_mask' aligned with 'labels'"
)


def key_token_weights(
    key_mask: torch.Tensor, valid: torch.Tensor, w_max: float = 9.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample key-token weights in target space.

    For every sample ``i``: ``N_key,i`` = its valid key targets, ``N_other,i`` = its other valid targets. When
    ``0 < N_key,i < N_other,i`` its key targets get ``w_i = min(N_other,i / N_key,i, w_max)``; every other target
    (and every target of a sample without key tokens or with ``N_key,i >= N_other,i``) gets 1.

    Args:
        key_mask: bool ``[B, T]`` in target space (position ``t`` = label ``t + 1``).
        valid: bool ``[B, T]``, the targets that carry a loss.
        w_max: the cap of ``w_i``.

    Returns:
        ``(weights float32 [B, T], w float32 [B])`` — ``w`` is the per-sample key weight (1 where not applied).
    """
    key = key_mask & valid
    n_key = key.sum(1)
    n_other = (valid & ~key).sum(1)
    ratio = n_other.float() / n_key.clamp_min(1).float()
    apply = (n_key > 0) & (n_key < n_other)
    w = torch.where(apply, ratio.clamp(max=w_max), torch.ones_like(ratio))
    weights = torch.where(key, w[:, None], torch.ones_like(key, dtype=torch.float32))
    return weights, w


@technique(name="key_token_weighting", family="token_selection",
           paper="TL-Training: A Task-Feature-Based Framework for Training Large Language Models in Tool Use",
           arxiv="2412.15495")
class KeyTokenWeighting(TokenScorerCallback):
    """Up-weight the loss of *key tokens* that the DataModule marks — tool names and argument keys of tool calls,
    or any spans your regexes find — as in TL-Training's prioritized key-token loss (PKT; Ye et al., "TL-Training:
    A Task-Feature-Based Framework for Training Large Language Models in Tool Use", EMNLP 2025 Findings).

    Algorithm, every training step, per sample ``i`` of the batch (the paper's code runs batch size 1; per sample
    is its generalisation, independent of batch composition and DDP layout):

    1. key targets = ``batch["key_token_mask"]`` shifted to target space (the weight of position ``t`` concerns
       label ``t + 1``) and restricted to valid (labelled) targets;
    2. ``N_key,i`` / ``N_other,i`` = the sample's key / other valid targets;
    3. if ``0 < N_key,i < N_other,i``: key targets weigh ``w_i = min(N_other,i / N_key,i, w_max)``; all other
       targets weigh 1;
    4. loss = Σ_t w_t ℓ_t / (number of valid targets in the accumulation window, all ranks) — lit-ft's global
       token-count normalisation. TL-Training divides by Σ_t w_t instead; normalising by a sum of weights makes a
       token's effective weight depend on the other tokens of the batch (a batch with many key tokens shrinks
       every token's gradient), so lit-ft keeps the count. Up-weighting therefore also raises the loss value.

    The weights need nothing from the current model (``token_needs`` is empty): at level ``mixin`` / ``hook``
    they are applied inside the loss; at level ``batch`` they are written to ``batch["token_weights"]`` before the
    forward, which only a :class:`lit_ft.modules.TokenLossMixin` module consumes (a plain module raises).
    Evaluation losses are not weighted.

    Needs the batch key ``key_token_mask`` (bool, aligned with ``labels``): set ``key_spans`` /
    ``key_span_patterns`` on :class:`lit_ft.data.SFTDataModule`, or add it in your collate_fn.

    Args:
        w_max: cap of the key-token weight, >= 1 (TL-Training: 9). 1 = plain SFT (a control).
        integration: ``"auto"`` (best available), ``"mixin"``, ``"hook"`` (HF ``loss_function`` of a plain
            module) or ``"batch"`` (``token_weights`` in the batch; needs a ``TokenLossMixin`` module).
    """

    token_needs = frozenset()
    scorer_name = "key_token_weighting"
    required_batch_keys = ("input_ids", "labels", KEY)

    def __init__(self, w_max: float = 9.0, integration: str = "auto") -> None:
        super().__init__(integration=integration)
        self.w_max = check_number(type(self).__name__, "w_max", w_max, low=1)

    @property
    def state_key(self) -> str:
        # stateless, but several instances (different w_max) must still be told apart (contract suite)
        return self._generate_state_key(w_max=self.w_max)

    def _check(self, batch: Any) -> None:
        if not self._checked_batch:
            require_keys(batch, self.required_batch_keys, who=type(self).__name__, providers={KEY: _PROVIDER})
            check_token_tensor(batch, KEY, "labels", type(self).__name__, "bool")
        super()._check(batch)

    def score_tokens(self, scores: TokenScores) -> TokenDecision:
        if not scores.training:
            return TokenDecision()
        batch = scores.batch
        if KEY not in batch:
            require_keys(batch, (KEY,), who=type(self).__name__, providers={KEY: _PROVIDER})
        mask = batch[KEY]
        if mask.shape != scores.valid.shape:
            raise ValueError(
                f"KeyTokenWeighting: batch['{KEY}'] has shape {tuple(mask.shape)} but the loss sees targets of shape "
                f"{tuple(scores.valid.shape)}; the mask must be aligned with the labels token for token"
            )
        mask = mask.to(scores.valid.device).bool()
        key = torch.zeros_like(scores.valid)
        key[:, :-1] = mask[:, 1:]  # target t predicts label t + 1
        weights, w = key_token_weights(key, scores.valid, self.w_max)
        key &= scores.valid
        n_valid = scores.valid.sum().clamp_min(1)
        has_key = key.any(1)
        n_has = has_key.sum()
        key_weight = (w * has_key).sum() / n_has.clamp_min(1)
        metrics = {
            "key_fraction": (key.sum() / n_valid).float(),
            "weight_mean": (weights * scores.valid).sum() / n_valid,
            # mean w_i over the samples that have key tokens (1 when none has)
            "key_weight": torch.where(n_has > 0, key_weight, torch.ones_like(key_weight)),
            "samples_with_keys": has_key.float().mean(),
        }
        return TokenDecision(weights=weights, metrics=metrics)
