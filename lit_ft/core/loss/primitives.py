"""Token-loss primitives: target shifting, the trunk's final hidden states, per-token NLL / entropy / LSE through the
fused op, logits at chosen rows. Everything here is stateless; the pipeline and the integration levels build on it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX, check_token_tensor
from lit_ft.core.introspect import (
    CausalLMParts,
    UnsupportedLogitTransformError,
    causal_lm_parts,
    find_input_embeddings,
)

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


#: trunk-hook order of the hidden-state capture on an FSDP2 root: after every band of lit_ft.core.layer_hooks (the
#: prompt injector strips its positions at ORDER_REWRITE), so it sees what the lm_head would see
_ORDER_FSDP_CAPTURE = 10_000


def final_hidden_states(parts: CausalLMParts, batch: Mapping[str, Any]) -> torch.Tensor:
    """Run only the trunk (no lm_head) and return the final hidden states ``[B, T, D]``.

    On an FSDP2-sharded model (:func:`lit_ft.core.sharding.is_fsdp_root`) the embeddings are only unsharded inside
    the HF model's own forward, so that forward runs (``logits_to_keep=1``: one position's logits) and a trunk hook
    captures the hidden states.
    """
    from lit_ft.core.sharding import is_fsdp_root

    if is_fsdp_root(parts.hf_model):
        return _hidden_states_through_root(parts, batch)
    out = parts.base(**model_inputs(batch), use_cache=False)
    return out[0] if isinstance(out, tuple) else out.last_hidden_state


def _hidden_states_through_root(parts: CausalLMParts, batch: Mapping[str, Any]) -> torch.Tensor:
    from lit_ft.core.layer_hooks import register_trunk_hook

    captured: list[torch.Tensor] = []

    def capture(index, module, args, kwargs, output):  # noqa: ANN001
        if not captured:  # the outer trunk call only
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = register_trunk_hook(parts.base, capture, order=_ORDER_FSDP_CAPTURE)
    try:
        parts.hf_model(**model_inputs(batch), use_cache=False, logits_to_keep=1)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"lit_ft: the trunk of {type(parts.hf_model).__name__} did not run in its forward")
    return captured[0]


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
    verify_logit_transforms(parts)  # once per model: a reference / history model may be another architecture
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


_VERIFIED_ATTR = "_lit_ft_logit_transforms_verified"


@torch.no_grad()
def head_logits_error(parts: CausalLMParts, hidden_last: torch.Tensor,
                      theirs: torch.Tensor) -> tuple[torch.Tensor, float, bool]:
    """``(ours, max |ours − theirs|, within tolerance)`` where ``ours`` = the lm_head (+ the logit transforms the
    fused op applies) of ``hidden_last`` and ``theirs`` = the model's own logits at the same positions (fp32).
    Tolerance: 1e-4 (fp32/fp64 weights) or 3e-2 (low precision), relative to ``1 + max |theirs|``; a shape
    mismatch is never within it."""
    ours = apply_logit_transforms(F.linear(hidden_last, parts.weight, parts.bias).float(), parts)
    if ours.shape != theirs.shape:
        return ours, math.inf, False
    tol = 1e-4 if parts.weight.dtype in (torch.float32, torch.float64) else 3e-2
    err = (ours - theirs).abs().max().item()
    return ours, err, math.isfinite(err) and err <= tol * (1.0 + theirs.abs().max().item())


def verify_logit_transforms(parts: CausalLMParts, seq_len: int = 8) -> bool:
    """Check once per model that its own logits equal the lm_head of the trunk's hidden states with the transforms
    :func:`lit_ft.core.introspect.logit_transforms` found — a guard for a transform no config key names (a model
    whose forward rescales, masks or cuts its logits otherwise). Runs the model and its trunk on a short synthetic
    sequence in eval mode (dropout off; restored after), so it needs no batch and costs two tiny forwards.

    Args:
        parts: the model's parts (:func:`lit_ft.core.introspect.causal_lm_parts`).
        seq_len: length of the synthetic sequence.

    Returns:
        Whether the check ran (``False``: already verified, or the weights are sharded / not floating point, or the
        model cannot run on token ids alone — then a warning says so).

    Raises:
        UnsupportedLogitTransformError: the logits differ: lit_ft's loss would not be the model's.
    """
    hf = parts.hf_model
    key = (parts.logit_scale, parts.logit_softcap)
    if hf.__dict__.get(_VERIFIED_ATTR) == key:
        return False
    weight = parts.weight
    if type(weight.data) is not torch.Tensor or not weight.is_floating_point() or weight.device.type == "meta":
        return False  # sharded (DTensor), quantised or not materialised: F.linear below would not apply
    emb = find_input_embeddings(hf)
    n_ids = min(int(weight.shape[0]), int(getattr(emb, "num_embeddings", weight.shape[0])))
    ids = ((torch.arange(seq_len) * 7 + 3) % n_ids).to(weight.device)[None]
    was_training = hf.training
    hf.eval()
    try:
        try:
            out = hf(input_ids=ids, use_cache=False)
            hidden = final_hidden_states(parts, {"input_ids": ids})
        except Exception as err:  # noqa: BLE001 - e.g. a multimodal model that needs more than token ids
            warnings.warn(f"lit_ft: could not check {type(hf).__name__}'s logit transforms on token ids alone "
                          f"({type(err).__name__}: {err}); the loss assumes logit_scale={parts.logit_scale}, "
                          f"logit_softcap={parts.logit_softcap}", stacklevel=2)
            return False
    finally:
        hf.train(was_training)
    logits = out.logits if hasattr(out, "logits") else out[0]
    theirs = logits[:, -1].float()
    if hidden.shape[-1] != weight.shape[-1]:
        raise UnsupportedLogitTransformError(
            f"lit_ft: {type(hf).__name__}'s trunk returns {hidden.shape[-1]}-dim hidden states but its lm_head takes "
            f"{weight.shape[-1]}: a head layer sits between them (e.g. ELECTRA's generator_predictions), which "
            "lit_ft's token loss (the lm_head applied to the trunk's output) does not run"
        )
    ours, err, agree = head_logits_error(parts, hidden[:, -1], theirs)
    if theirs.shape != ours.shape:
        raise UnsupportedLogitTransformError(
            f"lit_ft: {type(hf).__name__}'s logits have {theirs.shape[-1]} classes but its lm_head has "
            f"{ours.shape[-1]} rows; lit_ft's token loss (from the lm_head) would not be the model's"
        )
    if not agree:
        raise UnsupportedLogitTransformError(
            f"lit_ft: {type(hf).__name__} transforms its logits after the lm_head in a way lit_ft does not know "
            f"(max |difference| {err:.3g} between its logits and lm_head(hidden) with logit_scale="
            f"{parts.logit_scale}, logit_softcap={parts.logit_softcap}): lit_ft's token loss would not be the "
            "model's. Train it with its own loss (return self.model(**batch).loss) without lit_ft's token techniques."
        )
    hf.__dict__[_VERIFIED_ATTR] = key
    return True
