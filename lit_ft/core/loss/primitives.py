"""Token-loss primitives: target shifting, the trunk's final hidden states, per-token NLL / entropy / LSE through the
fused op, logits at chosen rows. Everything here is stateless; the pipeline and the integration levels build on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX, check_token_tensor
from lit_ft.core.introspect import CausalLMParts, causal_lm_parts

#: per-token quantities a scorer may ask for
TOKEN_QUANTITIES = frozenset({"nll", "entropy", "lse"})

#: keys forwarded to the HF trunk; everything else in the batch (sample_idx, token_weights, ...) stays out
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "position_ids", "inputs_embeds")


def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets aligned with the hidden state that predicts them: ``targets[:, t] = labels[:, t + 1]``.

    Same shape as ``labels`` (the last position gets ``ignore_index``), exactly as HF's ``ForCausalLMLoss`` shifts.
    """
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def supervised_count(batch: Mapping[str, Any], ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """How many tokens of ``batch`` carry a loss (shifted labels ≠ ``ignore_index``): HF's ``num_items_in_batch``."""
    labels = batch.get("labels") if isinstance(batch, Mapping) else None
    if labels is None:
        return torch.zeros((), dtype=torch.float32)
    return (shift_targets(labels, ignore_index) != ignore_index).sum().to(torch.float32)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch and batch[k] is not None}


def final_hidden_states(parts: CausalLMParts, batch: Mapping[str, Any]) -> torch.Tensor:
    """Run only the trunk (no lm_head) and return the final hidden states ``[B, T, D]``."""
    out = parts.base(**model_inputs(batch), use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def batch_token_weights(batch: Mapping[str, Any]) -> torch.Tensor:
    """``batch["token_weights"]`` (aligned with unshifted labels) moved to target space, float32."""
    w = check_token_tensor(batch, "token_weights", "labels", "token_weights", "float")
    return shift_targets(w.float(), ignore_index=0)


@dataclass
class TokenStats:
    """Per-token quantities in target space ``[B, T]`` (float32, detached, 0 where not computed)."""

    nll: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    lse: torch.Tensor | None = None


def token_stats(
    parts: CausalLMParts,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    needs: frozenset[str] | set[str] = frozenset({"nll"}),
    impl: str = "auto",
) -> TokenStats:
    """No-grad per-token NLL / entropy / LSE of ``hidden`` under ``parts``' lm_head, via the fused op."""
    from lit_ft.kernels import fused_linear_token_ce

    B, T, D = hidden.shape
    with torch.no_grad():
        out = fused_linear_token_ce(
            hidden.detach().reshape(B * T, D),
            parts.weight.detach(),
            targets.reshape(B * T),
            bias=None if parts.bias is None else parts.bias.detach(),
            reduction="sum",
            return_nll="nll" in needs,
            return_entropy="entropy" in needs,
            return_lse="lse" in needs,
            logit_softcap=parts.logit_softcap,
            logit_scale=parts.logit_scale,
            impl=impl,
        )
    shape = (B, T)
    return TokenStats(
        nll=None if out.nll is None else out.nll.view(shape),
        entropy=None if out.entropy is None else out.entropy.view(shape),
        lse=None if out.lse is None else out.lse.view(shape),
    )


def stats_from_logits(logits: torch.Tensor, targets: torch.Tensor, needs: frozenset[str] | set[str],
                      ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, TokenStats]:
    """From materialised logits ``[B, T, V]`` (level 2): the per-token NLL **with** gradient (0 where not valid) and
    the detached quantities ``needs`` asks for."""
    logits = logits.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lse = torch.logsumexp(logits, dim=-1)
    nll = lse - logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    nll = torch.where(valid, nll, torch.zeros_like(nll))
    entropy = None
    if "entropy" in needs:
        with torch.no_grad():
            p = torch.softmax(logits, dim=-1)
            entropy = torch.where(valid, lse - (p * logits).sum(-1), torch.zeros_like(lse))
    stats = TokenStats(nll=nll.detach(), entropy=entropy, lse=lse.detach() if "lse" in needs else None)
    return nll, stats


@torch.no_grad()
def causal_lm_token_nll(hf_model: nn.Module, batch: Mapping[str, Any], impl: str = "auto") -> torch.Tensor:
    """Per-token NLL ``[B, T]`` (target space) of any HF causal LM on ``batch``, without materialising logits.

    Used for reference / history models (Rho-1's reference, ssToken's history model) and teachers.
    """
    parts = causal_lm_parts(hf_model)
    hidden = final_hidden_states(parts, batch)
    targets = shift_targets(batch["labels"])
    stats = token_stats(parts, hidden, targets, {"nll"}, impl)
    if stats.nll is None:  # pragma: no cover - the op always returns what it was asked for
        raise RuntimeError("fused_linear_token_ce returned no per-token NLL")
    return stats.nll


def apply_logit_transforms(z: torch.Tensor, parts: CausalLMParts) -> torch.Tensor:
    """The model's logit scale, then its soft-cap (as the fused op applies them)."""
    if parts.logit_scale is not None:
        z = z * parts.logit_scale
    if parts.logit_softcap is not None:
        z = parts.logit_softcap * torch.tanh(z / parts.logit_softcap)
    return z


def logits_at(parts: CausalLMParts, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Logits ``[mask.sum(), V]`` (float32, differentiable) of the positions of a bool ``[B, T]`` mask: the lm_head
    applied to those hidden states only, then the model's logit scale and soft-cap."""
    if mask.shape != hidden.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"logits_at: mask must be bool {tuple(hidden.shape[:2])}, got {mask.dtype} "
                         f"{tuple(mask.shape)}")
    z = F.linear(hidden[mask], parts.weight, parts.bias).float()
    return apply_logit_transforms(z, parts)
