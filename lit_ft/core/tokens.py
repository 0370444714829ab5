"""Per-token weights: scorers, their composition, global top-k, and grad-accumulation-safe normalisation.

Token-level techniques (Rho-1 excess loss, ssToken, Q-Tuning token pruning, key-token weighting...) are
:class:`TokenScorer` s. Every training step, a :class:`TokenPipeline` hands them the per-token quantities of the
current forward (:class:`TokenScores`: shifted targets, NLL, entropy, LSE) and composes their answers
(:class:`TokenDecision`): weights multiply, keep-masks AND together.

Normalisation is by a *global* token count — over the whole gradient-accumulation window and all DDP ranks — so a
run with ``accumulate_grad_batches=4`` and batch 2 produces the same gradients as batch 8. The count of the whole
window is not known when the first micro-batch runs, so normalisation is *deferred*: each micro-batch
back-propagates the *sum* of its weighted token losses, and :meth:`TokenPipeline.finalize_gradients` divides the
accumulated gradients by the all-reduced token count in ``on_before_optimizer_step`` (after AMP unscaling, before
clipping). The loss *value* a micro-batch returns is still its own mean, so logs read as usual.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from lit_ft.core.batch import IGNORE_INDEX

TOKEN_QUANTITIES = frozenset({"nll", "entropy", "lse"})


def shift_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets aligned with the hidden state that predicts them: ``targets[:, t] = labels[:, t + 1]``.

    Same shape as ``labels`` (the last position gets ``ignore_index``), exactly as HF's ``ForCausalLMLoss`` shifts.
    """
    return F.pad(labels, (0, 1), value=ignore_index)[..., 1:]


@dataclass
class TokenScores:
    """What scorers see for the current micro-batch. All tensors are ``[B, T]`` in *target* space
    (position ``t`` is the prediction of token ``t + 1``) and detached.

    Attributes:
        targets: shifted labels, ``ignore_index`` where no loss is taken.
        valid: ``targets != ignore_index``.
        nll / entropy / lse: float32 per-token quantities of the current model (0 where not valid); present when
            some registered scorer asked for them in ``token_needs``.
        batch: the batch dict as the training step received it (input_ids, labels, sample_idx, ...).
        training: whether this is a training forward (scorers may skip work in evaluation).
    """

    targets: torch.Tensor
    valid: torch.Tensor
    batch: Mapping[str, Any]
    nll: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    training: bool = True


@dataclass
class TokenDecision:
    """A scorer's answer. ``weights`` (float ``[B, T]``, ≥ 0) multiply token losses; ``keep`` (bool ``[B, T]``)
    removes tokens from the loss entirely (the fused op then skips their lm_head FLOPs). ``metrics`` are logged
    under ``lit_ft/<scorer name>/<metric>``."""

    weights: torch.Tensor | None = None
    keep: torch.Tensor | None = None
    metrics: dict[str, float | torch.Tensor] = field(default_factory=dict)


class TokenScorer:
    """Mixin for callbacks that weight or select tokens inside the loss.

    Subclasses set ``token_needs`` (a subset of ``{"nll", "entropy", "lse"}``) and implement :meth:`score_tokens`.
    ``scorer_name`` names the log prefix.
    """

    token_needs: frozenset[str] = frozenset()
    scorer_name: str = "token_scorer"

    def score_tokens(self, scores: TokenScores) -> TokenDecision:  # pragma: no cover - interface
        raise NotImplementedError


def compose_decisions(
    decisions: Iterable[TokenDecision], valid: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Combine decisions: weights by product, keep-masks by AND (both restricted to ``valid``).

    Returns ``(weights or None, keep)``; ``keep`` is always a bool tensor (``valid`` when nobody selects).
    """
    weights: torch.Tensor | None = None
    keep = valid.clone()
    for d in decisions:
        if d.weights is not None:
            if d.weights.shape != valid.shape:
                raise ValueError(f"token weights have shape {tuple(d.weights.shape)}, expected {tuple(valid.shape)}")
            w = d.weights.detach().float()
            weights = w if weights is None else weights * w
        if d.keep is not None:
            if d.keep.shape != valid.shape or d.keep.dtype != torch.bool:
                raise ValueError(
                    f"token keep-mask must be bool {tuple(valid.shape)}, got {d.keep.dtype} {tuple(d.keep.shape)}"
                )
            keep &= d.keep
    return weights, keep


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


@dataclass
class AuxLossInputs:
    """What an :class:`AuxiliaryLoss` sees in one forward of :class:`lit_ft.modules.TokenLossMixin` (level 3).

    Tensors are ``[B, T]`` in target space, like :class:`TokenScores`. ``keep``: the tokens whose loss is taken
    (after the scorers); ``n_tokens``: ``keep.sum()`` (this micro-batch, this rank). ``logits_at(mask)``: the
    model's logits ``[mask.sum(), V]`` (float32, **with** gradient) at the positions of a bool ``[B, T]`` mask,
    computed from the trunk's hidden states and the lm_head (with the model's logit scale / soft-cap) only where
    asked — level 3 never materialises the full logits.
    """

    targets: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor
    n_tokens: torch.Tensor
    batch: Mapping[str, Any]
    training: bool
    logits_at: Callable[[torch.Tensor], torch.Tensor]


class AuxiliaryLoss:
    """Mixin for callbacks that add a term to the token loss of a :class:`lit_ft.modules.TokenLossMixin` module
    (e.g. PANDA's distillation term). Register with :meth:`TokenPipeline.register_aux`.

    :meth:`aux_loss` returns ``None`` (nothing this forward) or a scalar that is added to the **sum** of the kept
    tokens' losses before normalisation: in training it is divided, like them, by the global kept-token count of
    the accumulation window (deferred normalisation, see :class:`TokenPipeline`); in evaluation by this batch's
    count. A per-token mean ``m`` therefore contributes ``m * inputs.n_tokens``.
    """

    aux_name: str = "aux"

    def aux_loss(self, inputs: AuxLossInputs) -> torch.Tensor | None:  # pragma: no cover - interface
        raise NotImplementedError


class TokenPipeline:
    """The per-module registry of token scorers plus the deferred global normalisation.

    One pipeline lives on each LightningModule that has token scorers (see :func:`token_pipeline_for`), shared by
    the HF loss hook (level 2) and :class:`lit_ft.modules.TokenLossMixin` (level 3). Auxiliary loss terms
    (:class:`AuxiliaryLoss`, level 3 only) are registered here too.
    """

    def __init__(self) -> None:
        self.scorers: list[TokenScorer] = []
        self.aux_losses: list[AuxiliaryLoss] = []
        self._count: torch.Tensor | None = None  # kept tokens since the last optimizer step (local rank)
        self.last_metrics: dict[str, float | torch.Tensor] = {}
        #: the batch of the forward in progress, bound by the callbacks at batch start (the HF loss hook sees
        #: only logits and labels, so scorers that need other keys read them from here)
        self.current_batch: Mapping[str, Any] | None = None

    # -- registry ---------------------------------------------------------------------------------------------
    def register(self, scorer: TokenScorer) -> None:
        bad = set(scorer.token_needs) - TOKEN_QUANTITIES
        if bad:
            raise ValueError(f"{type(scorer).__name__}.token_needs has unknown quantities {sorted(bad)}; "
                             f"allowed: {sorted(TOKEN_QUANTITIES)}")
        if scorer not in self.scorers:
            self.scorers.append(scorer)

    def unregister(self, scorer: TokenScorer) -> None:
        if scorer in self.scorers:
            self.scorers.remove(scorer)

    def register_aux(self, provider: AuxiliaryLoss) -> None:
        """Add an auxiliary loss term (see :class:`AuxiliaryLoss`); idempotent."""
        if not callable(getattr(provider, "aux_loss", None)):
            raise TypeError(f"{type(provider).__name__} has no aux_loss(inputs) method")
        if provider not in self.aux_losses:
            self.aux_losses.append(provider)

    def unregister_aux(self, provider: AuxiliaryLoss) -> None:
        if provider in self.aux_losses:
            self.aux_losses.remove(provider)

    def aux_sum(self, inputs: AuxLossInputs) -> torch.Tensor | None:
        """Sum of the registered auxiliary terms for this forward (``None`` when none contributes)."""
        total: torch.Tensor | None = None
        for provider in self.aux_losses:
            term = provider.aux_loss(inputs)
            if term is None:
                continue
            if term.dim() != 0:
                raise ValueError(f"{type(provider).__name__}.aux_loss must return a scalar, got shape {tuple(term.shape)}")
            total = term if total is None else total + term
        return total

    @property
    def needs(self) -> frozenset[str]:
        out: set[str] = set()
        for s in self.scorers:
            out |= set(s.token_needs)
        return frozenset(out)

    def decide(self, scores: TokenScores) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Ask every scorer and compose (weights by product, keep by AND). Metrics go to ``last_metrics``."""
        decisions = []
        metrics: dict[str, float | torch.Tensor] = {}
        for s in self.scorers:
            d = s.score_tokens(scores)
            decisions.append(d)
            for k, v in d.metrics.items():
                metrics[f"lit_ft/{s.scorer_name}/{k}"] = v
        weights, keep = compose_decisions(decisions, scores.valid)
        n_valid = scores.valid.sum().clamp_min(1)
        metrics["lit_ft/tokens/kept_fraction"] = (keep.sum() / n_valid).float()
        self.last_metrics = metrics
        return weights, keep

    # -- normalisation ----------------------------------------------------------------------------------------
    def training_loss(self, loss_sum: torch.Tensor, n_tokens: torch.Tensor, accumulate_grad_batches: int = 1) -> torch.Tensor:
        """The tensor to return from ``training_step``: its *value* is this micro-batch's mean token loss, its
        *gradient* is ``accumulate_grad_batches * d(loss_sum)`` (cancelling Lightning's division by the
        accumulation factor). :meth:`finalize_gradients` then divides by the global token count."""
        n = n_tokens.detach().to(torch.float32)
        self._count = n if self._count is None else self._count + n.to(self._count.device)
        scaled = loss_sum * float(accumulate_grad_batches)
        mean = loss_sum.detach() / n.clamp_min(1.0)
        return scaled + (mean - scaled.detach())

    @property
    def pending(self) -> bool:
        return self._count is not None

    def finalize_gradients(self, parameters: Iterable[torch.nn.Parameter], strategy: Any = None, world_size: int = 1) -> torch.Tensor | None:
        """Divide accumulated gradients by the global kept-token count (all-reduced through ``strategy``).

        DDP/FSDP average gradients over ranks, so the scale is ``world_size / global_count``. Idempotent within a
        step: a second call before the next micro-batch does nothing. Returns the global count (or None).
        """
        if self._count is None:
            return None
        count = self._count
        self._count = None
        if strategy is not None and world_size > 1:
            count = strategy.reduce(count.clone(), reduce_op="sum")
        scale = float(world_size) / count.clamp_min(1.0)
        for p in parameters:
            if p.grad is not None:
                p.grad.mul_(scale.to(p.grad.device, p.grad.dtype))
        return count

    def reset(self) -> None:
        self._count = None


_PIPELINE_ATTR = "_lit_ft_token_pipeline"


def token_pipeline_for(module: torch.nn.Module, create: bool = True) -> TokenPipeline | None:
    """The :class:`TokenPipeline` attached to ``module`` (created on first use when ``create``)."""
    pipe = module.__dict__.get(_PIPELINE_ATTR)
    if pipe is None and create:
        pipe = TokenPipeline()
        # stored in __dict__ directly: a plain attribute, not a submodule/parameter/buffer
        module.__dict__[_PIPELINE_ATTR] = pipe
    return pipe
