"""Q-Tuning: joint sample and token pruning on the Error-Uncertainty plane."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from lit_ft.callbacks._token_scorer import TokenScorerCallback
from lit_ft.core.registry import technique
from lit_ft.core.step_probe import StepFlopsFraction, flops_monitor_of
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number
from lit_ft.core.batch import IGNORE_INDEX, refuse_packed
from lit_ft.core.introspect import find_hf_model
from lit_ft.core.flops import measured_step
from lit_ft.core.introspect import causal_lm_parts
from lit_ft.core.loss import (
    final_hidden_states,
    token_stats,
    TokenDecision,
    TokenScores,
    dist_ready,
    gather_varlen,
    global_topk_mask,
    shift_targets,
)

QUADRANTS = ("paper", "swap_entropy")
SCORINGS = ("separate", "inline")
#: bisection iterations over the quantile level (the released code uses 10 with a 1% tolerance; we aim at the
#: exact sample count, which 20 halvings of [0, 0.5] resolve for any batch below ~10^6 samples)
BISECT_ITERS = 20
_MAX_LOG_PPL = 700.0  # exp() of a mean NLL above this overflows float64


@dataclass
class Triage:
    """Stage-1 result over the *global* pool of samples (all ranks, rank order, then row order).

    ``quadrant``: int8 per pool sample — 1..4 for the quadrant corners, 0 for the middle band (dropped), -1 for a
    sample without any valid target (dropped, not counted). ``keep_q2`` / ``keep_q4``: the kept samples (Q2 is
    token-pruned, Q4 keeps every token); top-up samples are included there. Thresholds are PPL / entropy values.
    """

    ppl: torch.Tensor
    ent: torch.Tensor
    counted: torch.Tensor
    quadrant: torch.Tensor
    keep_q2: torch.Tensor
    keep_q4: torch.Tensor
    alpha: float = 0.0
    beta: float = 0.0
    ppl_lo: float = float("nan")
    ppl_hi: float = float("nan")
    ent_lo: float = float("nan")
    ent_hi: float = float("nan")
    target: int = 0
    bisect_kept: int = 0
    topped_up: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def _quantile(x: torch.Tensor, q: float) -> float:
    # linear interpolation, as numpy.quantile's default (the released code's choice)
    return float(torch.quantile(x, min(max(q, 0.0), 1.0)))


def _corners(ppl: torch.Tensor, ent: torch.Tensor, a: float, quadrants: str) -> tuple[torch.Tensor, ...]:
    """Quadrant corners at quantile level ``a`` (= α = β). Returns (q1, q2, q3, q4, thresholds)."""
    p_lo, p_hi = _quantile(ppl, a), _quantile(ppl, 1.0 - a)
    e_lo, e_hi = _quantile(ent, a), _quantile(ent, 1.0 - a)
    hi_p, lo_p = ppl > p_hi, ppl <= p_lo
    hi_e, lo_e = ent > e_hi, ent <= e_lo
    if quadrants == "paper":
        q1, q2, q3, q4 = hi_p & hi_e, hi_p & lo_e, lo_p & lo_e, lo_p & hi_e
    else:  # swap_entropy: the entropy axis reversed
        q1, q2, q3, q4 = hi_p & lo_e, hi_p & hi_e, lo_p & hi_e, lo_p & lo_e
    return q1, q2, q3, q4, (p_lo, p_hi, e_lo, e_hi)


def triage(ppl: torch.Tensor, ent: torch.Tensor, counted: torch.Tensor, sample_ratio: float,
           quadrants: str = "paper", top_up: bool = True) -> Triage:
    """Stage 1 on a pool of per-sample PPL / mean entropy (1-D, CPU, float64). ``counted``: samples with at least
    one valid target (the others are dropped and not counted). Deterministic: every DDP rank runs it on the same
    gathered pool and gets the same answer."""
    n_all = ppl.numel()
    idx = counted.nonzero().squeeze(1)
    p, e = ppl[idx], ent[idx]
    n = idx.numel()
    quadrant = torch.full((n_all,), -1, dtype=torch.int8)
    keep_q2 = torch.zeros(n_all, dtype=torch.bool)
    keep_q4 = torch.zeros(n_all, dtype=torch.bool)
    out = Triage(ppl=ppl, ent=ent, counted=counted, quadrant=quadrant, keep_q2=keep_q2, keep_q4=keep_q4)
    if n == 0:
        return out
    target = max(1, round(sample_ratio * n))
    lo, hi = 0.0, 0.5
    best: tuple[int, float, tuple] | None = None
    for _ in range(BISECT_ITERS):
        a = (lo + hi) / 2.0
        res = _corners(p, e, a, quadrants)
        kept = int((res[1] | res[3]).sum())
        # closest count wins; on a tie the one below the target (top-up then fills it exactly)
        if best is None or (abs(kept - target), kept > target) < (abs(best[0] - target), best[0] > target):
            best = (kept, a, res)
        if kept == target:
            break
        if kept < target:
            lo = a  # too few kept: widen the corners
        else:
            hi = a
    assert best is not None
    kept, a, (q1, q2, q3, q4, (p_lo, p_hi, e_lo, e_hi)) = best
    local_q = torch.zeros(n, dtype=torch.int8)
    for k, m in ((1, q1), (2, q2), (3, q3), (4, q4)):
        local_q[m] = k
    k2, k4 = q2.clone(), q4.clone()
    topped = 0
    if top_up and kept < target:
        # the released code tops the batch up to round(ratio * B) samples with the most "off-diagonal" ones
        pn = (p - p.min()) / (p.max() - p.min()) if float(p.max() - p.min()) > 1e-12 else torch.zeros_like(p)
        en = (e - e.min()) / (e.max() - e.min()) if float(e.max() - e.min()) > 1e-12 else torch.zeros_like(e)
        if quadrants == "paper":
            s2, s4 = pn - en, en - pn
        else:
            s2, s4 = pn + en - 1.0, 1.0 - pn - en
        score = torch.maximum(s2, s4)
        rest = (~(k2 | k4)).nonzero().squeeze(1)
        order = torch.sort(score[rest], descending=True, stable=True).indices[: target - kept]
        extra = rest[order]
        to_q2 = extra[s2[extra] >= s4[extra]]
        to_q4 = extra[s2[extra] < s4[extra]]
        k2[to_q2] = True
        k4[to_q4] = True
        topped = int(extra.numel())
    quadrant[idx] = local_q
    keep_q2[idx] = k2
    keep_q4[idx] = k4
    out.alpha = out.beta = a
    out.ppl_lo, out.ppl_hi, out.ent_lo, out.ent_hi = p_lo, p_hi, e_lo, e_hi
    out.target, out.bisect_kept, out.topped_up = target, kept, topped
    return out


def smoothed_log_score(nll: torch.Tensor, valid: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``log s_t`` with ``s_t = (1-λ)·PPL_t + λ·(PPL_{t-1} + PPL_{t+1})``, ``PPL_t = exp(ℓ_t)``; a neighbour that is
    not a valid target (sequence end, prompt, padding) contributes 0 (as in the released code). Computed in log
    space (logsumexp) so that large losses cannot overflow; the order is that of ``s_t``. ``-inf`` where not valid.
    """
    neg = torch.full_like(nll, -math.inf, dtype=torch.float32)
    x = torch.where(valid, nll.float(), neg)
    left = torch.cat([neg[:, :1], x[:, :-1]], dim=1)
    right = torch.cat([x[:, 1:], neg[:, :1]], dim=1)
    lam = float(smoothing)
    own_w = math.log(1.0 - lam) if lam < 1.0 else -math.inf
    nb_w = math.log(lam) if lam > 0.0 else -math.inf
    terms = torch.stack([x + own_w, left + nb_w, right + nb_w], dim=0)
    terms = torch.nan_to_num(terms, nan=-math.inf)  # -inf + -inf stays -inf; guard inf - inf
    s = torch.logsumexp(terms, dim=0)
    return torch.where(valid, s, neg)


@technique(name="qtuning", family="token_selection",
           paper="Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for Efficient "
                 "Supervised Fine-Tuning",
           arxiv="2509.23873")
class QTuning(TokenScorerCallback):
    """Q-Tuning (Wang et al. 2025, "Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token
    Pruning for Efficient Supervised Fine-Tuning", arXiv 2509.23873): per batch, drop whole samples by their place
    on the Error-Uncertainty plane, then prune tokens inside the "misconception" samples.

    Algorithm, every training step, from the *current* model:

    1. per sample i (valid = non -100 targets): ``PPL_i = exp(mean_t ℓ_t)``, ``Ent_i = mean_t H_t``;
    2. stage 1 (sample triage), over the whole batch and all DDP ranks: bisect a quantile level ``α = β`` in
       [0, 0.5] until the two kept corners hold ``round(sample_ratio · N)`` samples. With ``quadrants="paper"``:
       Q2 = ``PPL > Q_{1-α}(PPL) and Ent ≤ Q_β(Ent)`` (high error, low uncertainty: kept, token-pruned),
       Q4 = ``PPL ≤ Q_α(PPL) and Ent > Q_{1-β}(Ent)`` (low error, high uncertainty: kept whole),
       Q1 = ``PPL > Q_{1-α} and Ent > Q_{1-β}`` and Q3 = ``PPL ≤ Q_α and Ent ≤ Q_β`` are dropped, and so is the
       middle band between the lines. ``Q_q`` is the linear-interpolation quantile;
    3. stage 2, inside Q2 only: ``s_t = (1-λ)·exp(ℓ_t) + λ·(exp(ℓ_{t-1}) + exp(ℓ_{t+1}))`` (a missing neighbour
       counts 0); keep the ``token_ratio`` fraction of Q2 tokens with the *lowest* ``s_t`` (counted over all Q2
       tokens of the batch and of every rank); the others get label -100 (they stay in the input as context).

    Loss normaliser: supervised target positions only (the kept targets, or under accumulation / DDP on the mixin
    and hook levels the window's targets × ``sample_ratio``); prompt positions never count. The released trainer's
    divisor reportedly also counts prompt positions (not re-checked here), which only rescales each step by the
    batch's target share; see ``docs/techniques/qtuning.md``, "Limits and deviations".

    Args:
        sample_ratio: fraction of samples kept per step (Q2 ∪ Q4), in (0, 1]. Paper: 0.25 on MathInstruct
            (with token_ratio 0.5), 0.125 on WizardLM. The achieved fraction is logged.
        token_ratio: fraction of the Q2 samples' tokens kept, in (0, 1]. Paper: 0.5.
        smoothing: λ of the neighbour-smoothed token score, in [0, 1]. Paper: 0.5.
        quadrants: ``"paper"`` (default; Q2 = high PPL / low Ent, Q4 = low PPL / high Ent, as in the released
            code) or ``"swap_entropy"`` (the entropy axis reversed: Q2 = high PPL / high Ent is kept and
            token-pruned, Q4 = low PPL / low Ent is kept whole; the project page's
            wording). Which one the paper's Algorithm 1 uses could not be confirmed.
        top_up: when the two corners hold fewer than ``round(sample_ratio · N)`` samples at every α (PPL and
            entropy strongly correlated), add the most off-diagonal remaining samples (largest
            ``max(p̂ - ê, ê - p̂)`` on min-max-normalised axes) until the count is reached, as the released code
            does; those nearer Q2 are token-pruned. ``False`` keeps only what the bisection found.
        scoring: ``"separate"`` (default): a no-grad scoring forward in ``on_train_batch_start``, then the batch
            is edited in place — dropped samples are *removed* from every per-sample entry (so the training forward
            costs less) and pruned tokens' labels set to -100; works with any module. ``"inline"``: scores come
            from the training forward's own NLL / entropy and only the loss is masked (no extra forward, no
            saving).
        integration: how the loss is attached. ``"auto"`` (``"mixin"`` for :class:`lit_ft.modules.TokenLossMixin`
            modules, else ``"hook"``: the HF ``loss_function`` of a plain module), ``"mixin"``, ``"hook"``, or —
            with ``scoring="separate"`` only — ``"batch"`` (no loss hook: the module's own loss reads the edited
            labels). With ``"separate"`` the mixin / hook give a global token normalisation (exact under DDP and
            gradient accumulation) and a zero loss for a rank whose samples were all dropped.
        plot_every_n_steps: write the EU-plane scatter every N optimizer steps (0 = never): a W&B image when a
            ``WandbLogger`` is attached, else ``<log_dir>/qtuning/eu_plane_step{N}.png``.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    token_needs = frozenset({"nll", "entropy"})
    scorer_name = "qtuning"

    def __init__(
        self,
        sample_ratio: float = 0.25,
        token_ratio: float = 0.5,
        smoothing: float = 0.5,
        quadrants: str = "paper",
        top_up: bool = True,
        scoring: str = "separate",
        integration: str = "auto",
        plot_every_n_steps: int = 100,
        picture_every_n_steps: int = 0,
    ) -> None:
        super().__init__(integration=integration, picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        check_number(owner, "sample_ratio", sample_ratio, low=0, high=1, low_open=True)
        check_number(owner, "token_ratio", token_ratio, low=0, high=1, low_open=True)
        check_number(owner, "smoothing", smoothing, low=0, high=1)
        check_choice(owner, "quadrants", quadrants, QUADRANTS)
        check_bool(owner, "top_up", top_up)
        check_choice(owner, "scoring", scoring, SCORINGS)
        if scoring == "inline" and integration == "batch":
            raise ValueError(
                "QTuning: scoring='inline' scores inside the training loss and needs integration 'auto', 'mixin' or "
                "'hook'; integration='batch' goes with scoring='separate'"
            )
        check_int(owner, "plot_every_n_steps", plot_every_n_steps, minimum=0)  # 0 = off
        self.sample_ratio = float(sample_ratio)
        self.token_ratio = float(token_ratio)
        self.smoothing = float(smoothing)
        self.quadrants = quadrants
        self.top_up = top_up
        self.scoring = scoring
        self.plot_every_n_steps = plot_every_n_steps
        # separate scoring needs nothing from the training forward (the loss path only normalises)
        self.token_needs = frozenset() if scoring == "separate" else frozenset({"nll", "entropy"})
        self.last_triage: Triage | None = None
        self.last_token_keep: torch.Tensor | None = None  # [B, T] target space, local rows before removal
        self.last_sample_keep: torch.Tensor | None = None  # [B] local rows
        self._metrics: dict[str, Any] = {}
        self._step_at_start = 0
        self._last_plot_step: int | None = None

    @property
    def state_key(self) -> str:
        # stateless, but several instances must still be told apart (contract suite)
        return self._generate_state_key(sample_ratio=self.sample_ratio, token_ratio=self.token_ratio,
                                        quadrants=self.quadrants, scoring=self.scoring)

    # -- batch order (lit_ft.core.loss.batch_order, checked when a participant attaches) ---------------------------
    @property
    def batch_start_edits(self) -> frozenset[str]:
        # separate scoring removes rows and sets pruned tokens' labels to -100 at on_train_batch_start
        return frozenset({"rows", "labels"}) if self.scoring == "separate" else frozenset()

    @property
    def batch_order_name(self) -> str:
        return f"QTuning(scoring={self.scoring!r})"

    #: the configuration that leaves the batch alone (named when a reader cannot combine with the edit)
    batch_start_alternative = "QTuning(scoring='inline')"

    # -- stage 1 + 2 ----------------------------------------------------------------------------------------------
    def select(self, nll: torch.Tensor, entropy: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Decide from per-token NLL / entropy ``[B, T]`` (target space). Returns ``(sample_keep [B], token_keep
        [B, T])`` for the local rows; global across DDP ranks. Also sets :attr:`last_triage` and the metrics."""
        B = valid.shape[0]
        device = valid.device
        n_tok = valid.sum(1)
        counted = n_tok > 0
        denom = n_tok.clamp_min(1).double()
        mean_nll = (torch.where(valid, nll.double(), 0.0).sum(1) / denom).clamp(max=_MAX_LOG_PPL)
        ppl = torch.exp(mean_nll)
        ent = torch.where(valid, entropy.double(), 0.0).sum(1) / denom
        local = torch.stack([ppl, ent, counted.double()], dim=1)  # [B, 3]
        offset = 0
        if dist_ready():
            flat, sizes = gather_varlen(local.reshape(-1), return_sizes=True)
            offset = sum(sizes[: dist.get_rank()]) // 3  # 3 values per sample
            pool = flat.reshape(-1, 3)
        else:
            pool = local
        pool = pool.detach().cpu()
        tri = triage(pool[:, 0], pool[:, 1], pool[:, 2] > 0, self.sample_ratio, self.quadrants, self.top_up)
        q2 = tri.keep_q2[offset : offset + B].to(device)
        q4 = tri.keep_q4[offset : offset + B].to(device)
        sample_keep = q2 | q4

        q2_tokens = valid & q2[:, None]
        if self.token_ratio < 1.0:
            score = smoothed_log_score(nll, valid, self.smoothing)
            q2_keep = global_topk_mask(score, q2_tokens, self.token_ratio, largest=False)
        else:
            q2_keep = q2_tokens
        token_keep = q2_keep | (valid & q4[:, None])

        counts = torch.stack([token_keep.sum(), valid.sum(), q2_keep.sum(), q2_tokens.sum()]).double()
        if dist_ready():
            dist.all_reduce(counts)
        n = int(tri.counted.sum())
        kept_samples = int((tri.keep_q2 | tri.keep_q4).sum())
        quad = tri.quadrant
        tri.metrics = {
            "sample_fraction": kept_samples / max(n, 1),
            "sample_target_fraction": tri.target / max(n, 1),
            "kept_token_fraction": float(counts[0] / counts[1].clamp_min(1)),
            "q2_token_fraction": float(counts[2] / counts[3].clamp_min(1)),
            "alpha": tri.alpha,
            "beta": tri.beta,
            "ppl_lo": tri.ppl_lo,
            "ppl_hi": tri.ppl_hi,
            "ent_lo": tri.ent_lo,
            "ent_hi": tri.ent_hi,
            "q1": float((quad == 1).sum()),
            "q2": float((quad == 2).sum()),
            "q3": float((quad == 3).sum()),
            "q4": float((quad == 4).sum()),
            "middle": float((quad == 0).sum()),
            "topped_up": float(tri.topped_up),
            "kept_q2": float(tri.keep_q2.sum()),
            "kept_q4": float(tri.keep_q4.sum()),
        }
        self.last_triage = tri
        self.last_sample_keep = sample_keep
        self.last_token_keep = token_keep
        return sample_keep, token_keep

    # -- inline: levels mixin / hook ------------------------------------------------------------------------------
    def nominal_keep_ratio(self) -> float:
        # the sample budget: sample triage keeps `sample_ratio` of the samples. Token pruning inside the kept
        # misconception samples is not counted ahead (which samples fall in that quadrant depends on the model),
        # so the loss is Σ kept / (sample_ratio · N_supervised), not the mean over the tokens finally kept
        return self.sample_ratio

    def score_tokens(self, scores: TokenScores) -> TokenDecision:
        if not scores.training or self.scoring != "inline":
            return TokenDecision()
        if scores.nll is None or scores.entropy is None:
            raise RuntimeError("QTuning(scoring='inline') needs per-token NLL and entropy; the loss path gave none")
        _, keep = self.select(scores.nll, scores.entropy, scores.valid)
        return TokenDecision(keep=keep, metrics=dict(self.last_triage.metrics))  # type: ignore[union-attr]

    # -- separate: edit the batch ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_start = int(trainer.global_step)
        refuse_packed(batch, "QTuning", "it keeps or drops whole rows as samples, and a packed row holds several")
        if self.scoring == "inline":
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
            return
        self._check(batch)
        if self._attachment is not None:
            self._attachment.begin_batch(trainer, pl_module, batch, batch_idx)
        if not self._flops.due(trainer, pl_module, self.flops_every_n_steps):
            self.edit_batch(trainer, pl_module, batch)
            return
        # measured step: the full step on the raw batch, then the scoring pass + the step on the pruned batch
        full = [n for n, p in pl_module.named_parameters() if p.requires_grad]
        self._flops.start(trainer, pl_module, batch, full, plain=True)  # the baseline: plain SFT on this batch
        with measured_step() as scoring:
            self.edit_batch(trainer, pl_module, batch)
        self._flops.add_to_real(scoring.total)

    #: separate scoring claims compute savings (pruned samples skip the backward; the scoring pass is a forward of
    #: the whole batch): every this many steps (and at step 0) the step's FLOPs, scoring included, are measured
    #: against a plain step on the unpruned batch and logged as ``lit_ft/qtuning/flops_fraction`` (0 = never)
    flops_every_n_steps: int = 50

    @property
    def _flops(self) -> StepFlopsFraction:
        return flops_monitor_of(self, self.scorer_name)

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "_flops_monitor" in self.__dict__:
            self._flops.after_backward(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if "_flops_monitor" in self.__dict__:
            self._flops.abort()

    def edit_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict[str, Any]) -> None:
        """Separate scoring: no-grad forward of the current model, triage, then remove dropped samples from every
        per-sample entry of ``batch`` and set pruned tokens' labels to -100 (in place)."""

        hf_model = find_hf_model(pl_module, require_lm_head=True)
        parts = causal_lm_parts(hf_model)
        labels = batch["labels"]
        targets = shift_targets(labels)
        valid = targets != IGNORE_INDEX
        with torch.no_grad():
            stats = token_stats(parts, final_hidden_states(parts, batch), targets, {"nll", "entropy"})
        assert stats.nll is not None and stats.entropy is not None
        sample_keep, token_keep = self.select(stats.nll, stats.entropy, valid)

        new_labels = labels.clone()
        new_labels[:, 1:] = torch.where(token_keep[:, :-1], labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE_INDEX))
        batch["labels"] = new_labels
        B = labels.shape[0]
        rows = sample_keep.nonzero().squeeze(1)
        if rows.numel() == 0:
            # every local sample dropped (another rank keeps the batch's share): one row with no target gives a
            # graph-connected zero loss under the mixin / hook, so DDP still all-reduces
            rows = torch.zeros(1, dtype=torch.long, device=labels.device)
            batch["labels"][0] = IGNORE_INDEX
        if rows.numel() < B:
            rows_list = rows.tolist()
            for key, value in list(batch.items()):
                if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == B:
                    batch[key] = value.index_select(0, rows.to(value.device))
                elif isinstance(value, (list, tuple)) and len(value) == B:
                    batch[key] = type(value)(value[i] for i in rows_list) if isinstance(value, tuple) else [value[i] for i in rows_list]
        self._metrics = {f"lit_ft/{self.scorer_name}/{k}": v for k, v in self.last_triage.metrics.items()}  # type: ignore[union-attr]

    # -- logging / plot -------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.scoring == "inline":
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        else:
            for name, value in self._metrics.items():
                pl_module.log(name, float(value), on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
            if "_flops_monitor" in self.__dict__:
                self._flops.batch_end(pl_module)  # logs lit_ft/qtuning/flops_fraction after a measured step
        step = self._step_at_start
        n = self.plot_every_n_steps
        if n and self.last_triage is not None and step % n == 0 and step != self._last_plot_step:
            self._last_plot_step = step
            self._plot(trainer, step)

    def _plot(self, trainer: pl.Trainer, step: int) -> None:
        from lightning.pytorch.loggers import WandbLogger

        root = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: call it on every rank
        if not trainer.is_global_zero:
            return
        path = os.path.join(str(root), "qtuning", f"eu_plane_step{step}.png")
        write_eu_plane_png(self.last_triage, path, step=step, quadrants=self.quadrants)  # type: ignore[arg-type]
        for lg in trainer.loggers:
            if isinstance(lg, WandbLogger):
                lg.log_image(key=f"lit_ft/{self.scorer_name}/eu_plane", images=[path], step=step)


_COLOURS = {-1: "#bbbbbb", 0: "#999999", 1: "#d62728", 2: "#1f77b4", 3: "#8c564b", 4: "#2ca02c"}


def write_eu_plane_png(tri: Triage, path: str, step: int = 0, quadrants: str = "paper") -> str:
    """Scatter of the pool on the EU plane (x: PPL, log scale; y: mean entropy), coloured by quadrant, with the
    four threshold lines. Uses matplotlib's Agg canvas directly (no global backend change)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = {
        "paper": {1: "Q1 noise (drop)", 2: "Q2 misconception (keep, prune tokens)", 3: "Q3 redundant (drop)",
                  4: "Q4 calibration (keep all)"},
        "swap_entropy": {1: "Q1 (drop)", 2: "Q2 high/high (keep, prune tokens)", 3: "Q3 (drop)",
                         4: "Q4 low/low (keep all)"},
    }[quadrants]
    names = {**names, 0: "middle band (drop)", -1: "no targets"}
    q = tri.quadrant.clone()
    kept = tri.keep_q2 | tri.keep_q4
    topped = kept & ~((q == 2) | (q == 4))
    for k in (0, 1, 3, 2, 4, -1):
        m = (q == k) & ~topped
        if m.any():
            ax.scatter(tri.ppl[m].numpy(), tri.ent[m].numpy(), s=18, c=_COLOURS[k], label=f"{names[k]} ({int(m.sum())})")
    if topped.any():
        ax.scatter(tri.ppl[topped].numpy(), tri.ent[topped].numpy(), s=40, facecolors="none", edgecolors="k",
                   label=f"topped up (kept, {int(topped.sum())})")
    for v in (tri.ppl_lo, tri.ppl_hi):
        if math.isfinite(v):
            ax.axvline(v, color="k", lw=0.8, ls="--")
    for v in (tri.ent_lo, tri.ent_hi):
        if math.isfinite(v):
            ax.axhline(v, color="k", lw=0.8, ls=":")
    finite = tri.ppl[torch.isfinite(tri.ppl) & (tri.ppl > 0)]
    if finite.numel() and float(finite.max() / finite.min()) > 20.0:
        ax.set_xscale("log")
    else:
        ax.ticklabel_format(axis="x", useOffset=False)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_xlabel("sample perplexity (error)")
    ax.set_ylabel("mean token entropy (uncertainty)")
    frac = tri.metrics.get("sample_fraction", float("nan"))
    ax.set_title(f"Q-Tuning EU plane, step {step}: α=β={tri.alpha:.3f}, kept {frac:.1%}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    return path
