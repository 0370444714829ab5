"""Key-token weighting: TL-Training's prioritized key-token loss (default preset), or any marked spans."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from lit_ft.callbacks._token_scorer import TokenScorerCallback
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_choice, check_number
from lit_ft.core.batch import IGNORE_INDEX, check_token_tensor, require_keys
from lit_ft.core.loss import TokenDecision, TokenScores, shift_targets

KEY = "key_token_mask"
BOUNDARY = "key_boundary_mask"
_PROVIDER = (
    "lit_ft.data.SFTDataModule(key_spans='tl_training' | 'tool_call' | 'tool_name', or key_span_patterns=[regex, "
    "...]), or a collate_fn that adds a bool [B, T] 'key_token_mask' aligned with 'labels'"
)
_BOUNDARY_PROVIDER = (
    "lit_ft.data.SFTDataModule(key_spans='tl_training'), or a collate_fn that adds a bool [B, T] 'key_boundary_mask' "
    "(TL-Training's parameter-boundary tokens; all False if you have none); or use preset='whole_spans'"
)
#: preset -> the normalisation it uses when ``normalize`` is not given
PRESETS = {"tl_training": "weights", "whole_spans": "tokens"}
NORMALIZE = ("weights", "tokens")


def key_token_weights(
    key_mask: torch.Tensor, valid: torch.Tensor, w_max: float = 9.0, boundary: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample key-token weights in target space.

    For every sample ``i``: ``N_key,i`` = its valid key targets, ``N_other,i`` = its other valid targets that are
    not parameter boundaries (``boundary``; TL-Training's "para" class, weight 1 but outside ``N_other``). When
    ``0 < N_key,i < N_other,i`` its key targets get ``w_i = min(N_other,i / N_key,i, w_max)``; every other target
    (and every target of a sample without key tokens or with ``N_key,i >= N_other,i``) gets 1.

    Args:
        key_mask: bool ``[B, T]`` in target space (position ``t`` = label ``t + 1``).
        valid: bool ``[B, T]``, the targets that carry a loss.
        w_max: the cap of ``w_i``.
        boundary: bool ``[B, T]`` in target space, or ``None`` (no boundary class). A key target is never a
            boundary.

    Returns:
        ``(weights float32 [B, T], w float32 [B])`` — ``w`` is the per-sample key weight (1 where not applied).
    """
    key = key_mask & valid
    other = valid & ~key
    if boundary is not None:
        other &= ~boundary
    n_key = key.sum(1)
    n_other = other.sum(1)
    ratio = n_other.float() / n_key.clamp_min(1).float()
    apply = (n_key > 0) & (n_key < n_other)
    w = torch.where(apply, ratio.clamp(max=w_max), torch.ones_like(ratio))
    weights = torch.where(key, w[:, None], torch.ones_like(key, dtype=torch.float32))
    return weights, w


def _to_targets(mask: torch.Tensor) -> torch.Tensor:
    """A bool ``[B, T]`` mask aligned with the labels, moved to target space (target ``t`` predicts label ``t + 1``)."""
    out = torch.zeros_like(mask, dtype=torch.bool)
    out[:, :-1] = mask[:, 1:].bool()
    return out


@technique(name="key_token_weighting", family="token_selection",
           paper="TL-Training: A Task-Feature-Based Framework for Training Large Language Models in Tool Use",
           arxiv="2412.15495")
class KeyTokenWeighting(TokenScorerCallback):
    """Up-weight the loss of *key tokens* that the DataModule marks, as in TL-Training's prioritized key-token loss
    (PKT; Ye et al., "TL-Training: A Task-Feature-Based Framework for Training Large Language Models in Tool Use",
    EMNLP 2025 Findings; code ``Junjie-Ye/TL-Training``, ``code/pkt/utils.py``).

    Algorithm, every training step, per sample ``i`` of the batch (the paper's code runs batch size 1; per sample
    is its generalisation, independent of batch composition and DDP layout):

    1. key targets = ``batch["key_token_mask"]`` shifted to target space (the weight of position ``t`` concerns
       label ``t + 1``) and restricted to valid (labelled) targets; with ``preset="tl_training"`` also the
       parameter-boundary targets from ``batch["key_boundary_mask"]``;
    2. ``N_key,i`` = the sample's key targets, ``N_other,i`` = its other valid targets, boundaries excluded
       (``"tl_training"``: TL-Training's "para" class keeps weight 1 but does not count in ``N_other``);
    3. if ``0 < N_key,i < N_other,i``: key targets weigh ``w_i = min(N_other,i / N_key,i, w_max)``; all other
       targets weigh 1;
    4. ``normalize="weights"`` (TL-Training): loss = ``Σ_t w_t ℓ_t / Σ_t w_t``, both sums over the accumulation
       window and all ranks (the scorer declares ``Σ w`` as the token-loss normaliser, counted ahead with the
       window: :meth:`token_normaliser`); ``"tokens"``: ``Σ_t w_t ℓ_t / (valid targets of the window)``,
       lit-ft's token-count normalisation, where ``w_t`` stays an absolute multiplier.

    Presets:

    - ``"tl_training"`` (default, the paper): ``normalize="weights"``, boundaries as their own class. Pair it with
      ``SFTDataModule(key_spans="tl_training")``, which marks the paper's key tokens — the first token of the
      called tool's name and the tokens where it parts from another candidate tool name — and the parameter
      boundaries (the last token of every argument value). Needs ``key_boundary_mask`` in the batch (refused
      without it, so data marked for the other preset is not silently weighted as the paper's).
    - ``"whole_spans"`` (lit-ft's earlier behaviour): every marked token is a key token (e.g. whole tool names and
      argument keys with ``key_spans="tool_call"``), no boundary class, ``normalize="tokens"``.

    The weights need nothing from the current model (``token_needs`` is empty): at level ``mixin`` / ``hook``
    they are applied inside the loss; at level ``batch`` they are written to ``batch["token_weights"]`` before the
    forward, which only a :class:`lit_ft.modules.TokenLossMixin` module consumes (a plain module raises); the
    batch level cannot carry the ``Σ w`` normaliser, so it needs ``normalize="tokens"``. Evaluation losses are
    not weighted.

    Args:
        preset: ``"tl_training"`` or ``"whole_spans"`` (above).
        w_max: cap of the key-token weight, >= 1 (TL-Training: 9). 1 = plain SFT (a control).
        normalize: ``"weights"`` (``Σ w``) or ``"tokens"`` (the valid-token count); ``None`` = the preset's.
        integration: ``"auto"`` (best available), ``"mixin"``, ``"hook"`` (HF ``loss_function`` of a plain
            module) or ``"batch"`` (``token_weights`` in the batch; needs a ``TokenLossMixin`` module and
            ``normalize="tokens"``).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    token_needs = frozenset()
    scorer_name = "key_token_weighting"
    required_batch_keys = ("input_ids", "labels", KEY)

    def __init__(self, preset: str = "tl_training", w_max: float = 9.0, normalize: Optional[str] = None,
                 integration: str = "auto", picture_every_n_steps: int = 0) -> None:
        super().__init__(integration=integration, picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        self.preset = check_choice(owner, "preset", preset, tuple(PRESETS))
        self.w_max = check_number(owner, "w_max", w_max, low=1)
        self.normalize = PRESETS[preset] if normalize is None else check_choice(owner, "normalize", normalize,
                                                                                NORMALIZE)
        if self.normalize == "weights" and integration == "batch":
            raise ValueError(
                f"{owner}: `normalize`='weights' (the preset {preset!r} default) divides the loss by Σ w, which "
                "integration='batch' cannot pass to the loss (only token weights travel in the batch); use "
                "integration='auto' / 'mixin' / 'hook', or normalize='tokens'"
            )
        if self.preset == "tl_training":
            self.required_batch_keys = (*type(self).required_batch_keys, BOUNDARY)

    @property
    def state_key(self) -> str:
        # stateless, but several instances (different arguments) must still be told apart (contract suite)
        return self._generate_state_key(preset=self.preset, w_max=self.w_max, normalize=self.normalize)

    def _check(self, batch: Any) -> None:
        if not self._checked_batch:
            providers = {KEY: _PROVIDER, BOUNDARY: _BOUNDARY_PROVIDER}
            require_keys(batch, self.required_batch_keys, who=type(self).__name__, providers=providers)
            check_token_tensor(batch, KEY, "labels", type(self).__name__, "bool")
            if self.preset == "tl_training":
                check_token_tensor(batch, BOUNDARY, "labels", type(self).__name__, "bool")
        super()._check(batch)

    def _masks(self, batch: Mapping[str, Any], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The key and (``"tl_training"``) boundary targets of ``batch``, checked against ``valid``'s shape."""
        out = []
        for name in (KEY, BOUNDARY) if self.preset == "tl_training" else (KEY,):
            if name not in batch:
                require_keys(batch, (name,), who=type(self).__name__,
                             providers={KEY: _PROVIDER, BOUNDARY: _BOUNDARY_PROVIDER})
            mask = batch[name]
            if mask.shape != valid.shape:
                raise ValueError(
                    f"KeyTokenWeighting: batch['{name}'] has shape {tuple(mask.shape)} but the loss sees targets of "
                    f"shape {tuple(valid.shape)}; the mask must be aligned with the labels token for token"
                )
            out.append(_to_targets(mask.to(valid.device)))
        return out[0], (out[1] if len(out) > 1 else None)

    def _weights(self, batch: Mapping[str, Any], valid: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key, boundary = self._masks(batch, valid)
        weights, w = key_token_weights(key, valid, self.w_max, boundary)
        return weights, w, key & valid

    def token_normaliser(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """``Σ_t w_t`` over the valid targets of a raw training batch with ``normalize="weights"`` (TL-Training's
        denominator; the engine sums it over the accumulation window and the ranks before the window's first
        forward), else ``None`` (the valid-token count)."""
        if self.normalize != "weights" or not isinstance(batch, Mapping) or batch.get("labels") is None:
            return None
        valid = shift_targets(batch["labels"]) != IGNORE_INDEX
        weights = self._weights(batch, valid)[0]
        return (weights * valid).sum().float()

    def score_tokens(self, scores: TokenScores) -> TokenDecision:
        if not scores.training:
            return TokenDecision()
        weights, w, key = self._weights(scores.batch, scores.valid)
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
