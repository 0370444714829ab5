"""One-Token Rollout (OTR): each supervised position is a one-step episode; K tokens sampled from the current policy
are rewarded by the gold token, and the REINFORCE loss over them is added to (or replaces) the cross-entropy."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from typing_extensions import override

from lit_ft.callbacks._objective import ObjectiveCallback
from lit_ft.kernels.gumbel_sampler import gumbel_max_sample, mix32
from lit_ft.core.counter_hash import GOLDEN, M32
from lit_ft.core.loss import ObjectiveInputs
from lit_ft.core.loss.primitives import supervised_count
from lit_ft.core.registry import technique

#: the seed of evaluation forwards: a fixed draw, unlike any training step's
_EVAL_SEED_SALT = 0x0E7A1
_M32, _GOLDEN = M32, GOLDEN


def step_seed(seed: int, step: int) -> int:
    """The draw's seed at optimizer step ``step``: every micro-batch and rank of one step shares it."""
    return int(mix32(torch.tensor([(seed * 1_000_003 + step) & _M32], dtype=torch.int64))[0])


def position_keys(batch: Mapping[str, Any], shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """A 32-bit key per ``(sample, position)``: the sample is ``batch["sample_idx"]`` when the batch has it (the same
    sample draws the same tokens whichever rank or micro-batch it lands in: DDP and gradient accumulation then train
    exactly like one process on the whole batch), else the row's index in this batch."""
    rows, cols = shape
    sidx = batch.get("sample_idx") if isinstance(batch, Mapping) else None
    if isinstance(sidx, torch.Tensor) and tuple(sidx.shape) == (rows,):
        sample = sidx.to(device=device, dtype=torch.int64)
    else:
        sample = torch.arange(rows, device=device, dtype=torch.int64)
    pos = torch.arange(cols, device=device, dtype=torch.int64)
    return mix32((mix32(sample & _M32)[:, None] + pos[None, :] * _GOLDEN) & _M32)


def otr_chunk_sum(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, row_ids: torch.Tensor, *,
                  seed: int, num_samples: int, temperature: float, negative_reward: float, baseline: bool,
                  ce_weight: float, weight: float = 1.0, vocab_chunk_size: int | None = None,
                  stats: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The OTR loss **sum** over a block of rows (a chunk function of :func:`lit_ft.kernels.chunked_linear_loss`).

    Per row (gold ``y``, samples ``a_1..a_K ~ softmax(z / temperature)``, rewards ``r_k = 1`` if ``a_k == y`` else
    ``negative_reward``, minus their mean over k when ``baseline``):
    ``w_t · ( -weight · (1/K) Σ_k r_k log softmax(z)[a_k]  +  (ce_weight - 1) · (-log softmax(z)[y]) )`` with
    ``w_t`` the row's entry of ``weights``. The second part cancels ``1 - ce_weight`` of the engine's token
    cross-entropy (see :class:`OneTokenRollout`). With ``weight == 0`` nothing is sampled. ``stats`` (optional)
    receives ``[hits, samples]`` of the block, detached.
    """
    logp = F.log_softmax(logits, dim=-1)
    row = torch.zeros(logp.shape[0], dtype=logp.dtype, device=logp.device)
    if ce_weight != 1.0:
        row = row + (1.0 - ce_weight) * logp.gather(1, targets[:, None]).squeeze(1)
    if weight == 0.0:
        return (row * weights.to(row.dtype)).sum()
    sampled = gumbel_max_sample(logits.detach(), num_samples, seed, row_ids, temperature, vocab_chunk_size)
    hit = sampled == targets[:, None]
    reward = torch.where(hit, torch.ones((), dtype=logp.dtype, device=logp.device),
                         torch.full((), negative_reward, dtype=logp.dtype, device=logp.device))
    if baseline:
        reward = reward - reward.mean(dim=1, keepdim=True)
    row = row - weight * (reward * logp.gather(1, sampled)).sum(dim=1) / num_samples
    if stats is not None:
        stats.append(torch.stack([hit.sum().to(torch.float32), torch.tensor(float(hit.numel()))]).detach())
    return (row * weights.to(row.dtype)).sum()


def _number(name: str, value: Any, low: float, high: float = math.inf, low_open: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and value <= high
    if not ok:
        bound = f"{'>' if low_open else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
        raise ValueError(f"OneTokenRollout: `{name}` must be a finite number {bound}, got {value!r}")
    return float(value)


@technique(name="one_token_rollout", family="objectives",
           paper="One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy Gradient", arxiv="2509.26313")
class OneTokenRollout(ObjectiveCallback):
    """One-Token Rollout: supervised fine-tuning guided by a token-level policy gradient.

    Paper: Ming, Wu, Hu, He & Yu, *One-Token Rollout: Guiding Supervised Fine-Tuning of LLMs with Policy Gradient*
    (arXiv 2509.26313). No code was released with it.

    Algorithm: every supervised position ``t`` (state: the gold prefix) is a one-step episode. ``K`` candidate
    tokens are sampled from the current policy (``softmax(z_t / temperature)``, no gradient through the draw); each
    gets reward ``1`` if it is the gold token ``y_t`` and ``negative_reward`` otherwise (the penalty on probability
    put on wrong sampled tokens); the REINFORCE loss ``-(1/K) Σ_k r_k log π_θ(a_k | s_t)`` (``π_θ`` at temperature
    1, the trained policy) is the per-token term. Its expected gradient is ``(1 - negative_reward) ∇π_θ(y_t|s_t)``.

    The paper's exact ``K``, temperature, penalty value, baseline and whether the gold token is always among the
    candidates could not be confirmed from the text available here: they are arguments, with the documented
    behaviour as defaults. Including the gold token with reward 1 amounts to a cross-entropy share, which
    ``ce_weight`` gives.

    How it runs: an :class:`~lit_ft.core.loss.Objective` on the token-loss engine. At level 3
    (:class:`lit_ft.modules.TokenLossMixin` modules) through the chunked fused-linear base: per chunk of rows the
    ``[c, V]`` logits, K Gumbel-max draws over vocabulary chunks (K running argmaxes), ``log p`` gathered at the
    K sampled ids and the gold id — never an ``[N, V]`` tensor. At level 2 (a plain ``self.model(**batch).loss``:
    the HF loss hook) on the model's logits. The term covers the pipeline's kept tokens, times their weights (token
    selection callbacks compose), and is normalised exactly like the token loss (its count, over the accumulation
    window and ranks), so ``ce_weight`` mixes or replaces the cross-entropy exactly. The draws are a hash of
    ``(seed, optimizer step, sample, position)`` (the sample: ``batch["sample_idx"]``, which lit_ft's DataModules
    add; else the row), so a resumed run draws the same tokens, and 2-process DDP and gradient accumulation draw
    what one process draws on the whole batch. Evaluation forwards use a fixed seed. Logs ``lit_ft/one_token_rollout/loss`` (the term, weight included) and
    ``lit_ft/one_token_rollout/hit_rate`` (share of the samples equal to the gold token).

    Args:
        num_samples: K, tokens sampled per position (int >= 1).
        temperature: sampling temperature of the rollout (> 0); the log-probabilities trained are at temperature 1.
        negative_reward: reward of a sampled token that is not the gold one (finite, <= 0; 0 = no penalty).
        baseline: subtract the mean reward over the K samples of a position from each (a variance-reducing
            baseline; ``False`` = the plain rewards).
        ce_weight: weight of the token cross-entropy left in the loss (>= 0): ``0`` replaces it with OTR, ``1``
            keeps it in full (OTR added to SFT).
        weight: weight of the OTR term (>= 0).
        seed: seed of the draws (int >= 0).
        vocab_chunk_size: vocabulary columns per Gumbel noise block (int >= 1), or ``None`` for a block of about
            4M ``(row, sample, token)`` entries.
        integration: ``"auto"`` (level 3 for ``TokenLossMixin`` modules, else level 2), ``"mixin"`` or ``"hook"``.
    """

    technique_name = "one_token_rollout"
    objective_name = "one_token_rollout"

    def __init__(self, num_samples: int = 8, temperature: float = 1.0, negative_reward: float = -0.1,
                 baseline: bool = False, ce_weight: float = 0.0, weight: float = 1.0, seed: int = 0,
                 vocab_chunk_size: int | None = None, integration: str = "auto") -> None:
        super().__init__(integration)
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"OneTokenRollout: `num_samples` must be an int >= 1, got {num_samples!r}")
        if not isinstance(baseline, bool):
            raise ValueError(f"OneTokenRollout: `baseline` must be true or false, got {baseline!r}")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"OneTokenRollout: `seed` must be an int >= 0, got {seed!r}")
        if vocab_chunk_size is not None and (not isinstance(vocab_chunk_size, int) or isinstance(vocab_chunk_size, bool)
                                             or vocab_chunk_size < 1):
            raise ValueError(f"OneTokenRollout: `vocab_chunk_size` must be an int >= 1 or null, got {vocab_chunk_size!r}")
        if baseline and num_samples == 1:
            raise ValueError("OneTokenRollout: `baseline` needs `num_samples` >= 2 (with one sample every reward "
                             "minus its mean is 0: no signal)")
        self.num_samples = num_samples
        self.temperature = _number("temperature", temperature, 0.0, low_open=True)
        self.negative_reward = _number("negative_reward", negative_reward, -math.inf, 0.0)
        self.baseline = baseline
        self.ce_weight = _number("ce_weight", ce_weight, 0.0)
        self.weight = _number("weight", weight, 0.0)
        self.seed = seed
        self.vocab_chunk_size = vocab_chunk_size
        self._step = 0  # the optimizer step of the current training batch (on_train_batch_start)
        self.last_hit_rate: torch.Tensor | None = None

    # -- the term ---------------------------------------------------------------------------------------------------
    @override
    def objective_weight(self) -> float:
        return 1.0  # `weight` and `ce_weight` are inside the sum: they scale different parts of it

    @override
    def objective_counts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        # the token loss's own count (a scorer's declared normaliser, else the supervised tokens): with the keep
        # ratio below, the term's divisor is the token term's, so `ce_weight` cancels cross-entropy exactly
        pipe = None if self._attachment is None else self._attachment.pipeline
        own = None if pipe is None else pipe.own_token_normaliser(batch)
        return {"tokens": supervised_count(batch) if own is None else own}

    @override
    def objective_normaliser(self, totals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        pipe = None if self._attachment is None else self._attachment.pipeline
        ratio = 1.0 if pipe is None else pipe.nominal_keep_ratio()
        return (totals["tokens"] * ratio).clamp_min(1.0)

    def _draw_seed(self, training: bool) -> int:
        return step_seed(self.seed, self._step) if training else self.seed ^ _EVAL_SEED_SALT

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._step = int(trainer.global_step)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def objective_loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        keep = inputs.keep
        targets = inputs.targets.to(keep.device)
        weights = torch.ones(keep.shape, device=keep.device) if inputs.weights is None else inputs.weights
        row_ids = position_keys(inputs.batch, tuple(keep.shape), keep.device)
        if self.weight == 0.0 and self.ce_weight == 1.0:
            return None
        seed = self._draw_seed(inputs.training)
        stats: list[torch.Tensor] = []

        def chunk(logits, targets, weights, row_ids):
            return otr_chunk_sum(
                logits, targets, weights, row_ids, seed=seed, num_samples=self.num_samples,
                temperature=self.temperature, negative_reward=self.negative_reward, baseline=self.baseline,
                ce_weight=self.ce_weight, weight=self.weight, vocab_chunk_size=self.vocab_chunk_size, stats=stats)

        rows = {"targets": targets[keep], "weights": weights.to(keep.device)[keep], "row_ids": row_ids[keep]}
        total = inputs.chunked_loss(chunk, keep, rows)
        if stats:
            s = torch.stack(stats).sum(0)
            self.last_hit_rate = s[0] / s[1].clamp_min(1.0)
        return total

    # -- logging and state ------------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.last_hit_rate is not None:
            pl_module.log("lit_ft/one_token_rollout/hit_rate", self.last_hit_rate, on_step=True, on_epoch=False,
                          batch_size=1)
            self.last_hit_rate = None

    @override
    def state_dict(self) -> dict[str, Any]:
        # the draws depend on (seed, step, sample, position) only: the restored step is all a resume needs
        return {"seed": self.seed}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # nothing to restore: the draws follow this run's seed and the restored optimizer step (a checkpoint of the
        # earlier generator-based version carries a "generator" entry, which no longer matters)
        return None
