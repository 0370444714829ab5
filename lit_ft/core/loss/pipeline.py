"""The per-module token-loss registry and the normalisation of its terms.

One :class:`TokenPipeline` lives on each LightningModule that has token scorers or objectives (see
:func:`token_pipeline_for`); the HF loss hook (level 2) and :class:`~lit_ft.core.loss.level3.TokenLossHost`
(level 3) both run it. It holds the token scorers (:class:`~lit_ft.core.loss.scoring.TokenScorer`), the objectives
(:class:`~lit_ft.core.loss.objectives.Objective`) and the window normaliser counts
(:class:`~lit_ft.core.loss.window.WindowCounter`).

Normalisation. The token loss of a training micro-batch contributes ``Σ_kept w·ℓ / C`` to the gradients, where
``C = N_supervised(window, all ranks) × Π nominal keep ratios`` (or, when a scorer declares its own
``token_normaliser`` — TL-Training's ``Σ w`` — that count of the window instead of ``N_supervised``) — known
before the window's first forward, so the
gradient is final when the backward ends and nothing is rescaled afterwards: a term the user adds to the loss trains
exactly as without lit_ft. Each objective contributes ``weight · sum / normaliser`` likewise, with its own counts.
The *value* the step returns is this micro-batch's own mean (kept tokens; each objective over its own batch
counts), so logs read as usual.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch

from lit_ft.core.loss.objectives import Objective, ObjectiveInputs
from lit_ft.core.loss.primitives import TOKEN_QUANTITIES, supervised_count
from lit_ft.core.loss.scoring import TokenScorer, TokenScores, compose_decisions
from lit_ft.core.loss.window import WindowCounter

TOKEN_TERM = "token"


class TokenPipeline:
    """Registry of scorers and objectives for one module, plus the normaliser bookkeeping."""

    def __init__(self) -> None:
        self.scorers: list[TokenScorer] = []
        self.objectives: list[Objective] = []
        #: everything attached through :func:`lit_ft.core.loss.attach` (scorers, objectives, batch-weight
        #: producers such as CPT); the HF loss hook stays installed while this is not empty
        self.holders: list[Any] = []
        self.window = WindowCounter()
        self.last_metrics: dict[str, float | torch.Tensor] = {}
        #: the batch of the forward in progress, bound at batch start (the HF loss hook sees only logits and
        #: labels, so scorers and objectives that need other keys read them from here)
        self.current_batch: Mapping[str, Any] | None = None
        #: per-objective detached values of the last forward (``objective_name -> sum / normaliser``), for logs
        self.last_objective_values: dict[str, torch.Tensor] = {}
        #: training forwards that went through the engine (a participant can check its terms were applied)
        self.training_forwards = 0
        self._forwards_in_window = 0
        self._side_depth = 0  # > 0 inside side_computation()
        self._window_trainer: Any = None  # weak reference to the trainer of the last micro-batch (mid_window)
        #: optimizer steps (accumulation windows) of this run whose batches had no supervised token (every label
        #: -100 after the shift, on every rank): their token loss is 0 and they train nothing from it
        self.empty_steps = 0
        self._epoch: int | None = None
        self._epoch_windows = 0  # windows counted in the current epoch
        self._epoch_empty = 0  # ... without a supervised token
        self._epoch_void = 0  # ... where every term (token and objectives) counted nothing
        self._warned_empty = False

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

    def register_objective(self, objective: Objective) -> None:
        if not callable(getattr(objective, "objective_loss", None)):
            raise TypeError(f"{type(objective).__name__} has no objective_loss(inputs) method")
        names = {o.objective_name for o in self.objectives if o is not objective}
        if objective.objective_name in names or objective.objective_name == TOKEN_TERM:
            raise ValueError(f"an objective named {objective.objective_name!r} is already registered on this module")
        if objective not in self.objectives:
            self.objectives.append(objective)

    def unregister_objective(self, objective: Objective) -> None:
        if objective in self.objectives:
            self.objectives.remove(objective)

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

    # -- counting -----------------------------------------------------------------------------------------------
    def nominal_keep_ratio(self) -> float:
        return math.prod(float(s.nominal_keep_ratio()) for s in self.scorers)

    def batch_counts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Every term's normaliser counts for one raw micro-batch (this rank)."""
        counted = batch
        for holder in self.holders:  # deterministic batch-start edits (CPT's context labels) before counting
            edit = getattr(holder, "batch_for_count", None)
            if callable(edit):
                counted = edit(counted)
        own = self.own_token_normaliser(counted)
        out = {TOKEN_TERM: supervised_count(counted) if own is None else own}
        for o in self.objectives:
            for k, v in o.objective_counts(counted).items():
                out[f"{o.objective_name}/{k}"] = torch.as_tensor(v, dtype=torch.float32)
        return out

    def own_token_normaliser(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """The one scorer-declared token normaliser of ``batch`` (:meth:`TokenScorer.token_normaliser`), or
        ``None`` when no scorer declares one (the supervised-token count applies)."""
        found = [(s, c) for s in self.scorers if (c := s.token_normaliser(batch)) is not None]
        if len(found) > 1:
            raise ValueError(
                "lit_ft: several token scorers normalise the token loss by their own count ("
                + ", ".join(type(s).__name__ for s, _ in found) + "); at most one may (e.g. "
                "KeyTokenWeighting(normalize='tokens') for all but one)"
            )
        return None if not found else torch.as_tensor(found[0][1], dtype=torch.float32).reshape(()).cpu()

    def begin_micro_batch(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Bind the batch and, at a window's first micro-batch, count the window's normalisers (idempotent)."""
        self.current_batch = batch
        try:
            self._window_trainer = weakref.ref(trainer)
        except TypeError:  # a test double that cannot be weakly referenced
            self._window_trainer = None
        if self.window.begin(trainer, pl_module, batch, batch_idx, self.batch_counts):
            # a new window: the previous one's forwards are over even if end_window() never ran (a module whose
            # on_before_optimizer_step does not call super())
            self._forwards_in_window = 0
            self._note_window(trainer)

    # -- windows without a supervised token -----------------------------------------------------------------------
    def _note_window(self, trainer: Any) -> None:
        """Bookkeeping of a newly counted window: count the steps whose window has no supervised token (their loss
        is 0 and the optimizer steps on nothing: plain HF would show NaN), warn once per run with that count when an
        epoch (or the run, at ``max_steps``) ends, and fail when a whole epoch had nothing to train on. The window
        totals are already all-reduced, so every rank decides the same (no rank raises alone)."""
        totals = self.window.totals or {}
        epoch = int(getattr(trainer, "current_epoch", 0) or 0)
        if self._epoch is not None and epoch != self._epoch:
            self._close_epoch(trainer, self._epoch, complete=True)  # its last window did not know it was the last
        self._epoch = epoch
        values = [float(v) for v in totals.values()]  # one host read per window (after the window's all-reduce)
        token = float(totals[TOKEN_TERM]) if TOKEN_TERM in totals else 0.0
        self._epoch_windows += 1
        if token == 0.0:
            self._epoch_empty += 1
            self.empty_steps += 1
        if not any(values):
            self._epoch_void += 1
        max_steps = int(getattr(trainer, "max_steps", -1) or -1)
        run_ends = max_steps > 0 and int(getattr(trainer, "global_step", 0)) + 1 >= max_steps
        if self.window.reaches_epoch_end or run_ends:
            self._close_epoch(trainer, epoch, complete=self.window.reaches_epoch_end)

    def _close_epoch(self, trainer: Any, epoch: int, complete: bool) -> None:
        windows, empty, void = self._epoch_windows, self._epoch_empty, self._epoch_void
        self._epoch_windows = self._epoch_empty = self._epoch_void = 0
        if complete and windows and void == windows:
            raise RuntimeError(
                f"lit_ft: no batch of epoch {epoch} has a supervised token: all {windows} optimizer steps saw only "
                "labels of -100 (after the one-token shift), so the loss is 0 and nothing trains. Check the data's "
                "labels: a prompt mask or a max_length that cuts off every response, or a collator that drops them."
            )
        if empty and not self._warned_empty and getattr(trainer, "is_global_zero", True):
            self._warned_empty = True
            warnings.warn(  # not lightning's rank_zero_warn: importing lightning pulls in triton
                f"lit_ft: {empty} of {windows} optimizer steps of epoch {epoch} had no supervised token (every label "
                "-100 after the one-token shift, on every rank): their token loss is 0 and they train nothing from "
                f"it (plain Hugging Face would show NaN). {self.empty_steps} such steps in this run so far; "
                "`lit_ft.core.loss.token_pipeline_for(module).empty_steps` keeps counting; this warning is not "
                "repeated.", stacklevel=2
            )

    def end_window(self) -> None:
        self.window.end()
        self._forwards_in_window = 0
        self._side_depth = 0  # > 0 inside side_computation()

    @contextmanager
    def side_computation(self, plain: bool = False) -> Iterator[None]:
        """For a probe forward outside the real step (GreenTrainer's importance / FLOPs probes): the window's
        bookkeeping (:attr:`mid_window`) is left as it was. ``plain``: the scorers and objectives sit out, so the
        probe is the plain fine-tuning step (the baseline a token technique's compute is measured against)."""
        saved = self._forwards_in_window
        scorers, objectives = self.scorers, self.objectives
        if plain:
            self.scorers, self.objectives = [], []
        self._side_depth += 1
        try:
            yield
        finally:
            self._side_depth -= 1
            self._forwards_in_window = saved
            self.scorers, self.objectives = scorers, objectives

    @property
    def mid_window(self) -> bool:
        """True between a training forward through the engine and the optimizer step that closes its window. The
        trainer's step count is read too, so the window closes at the optimizer step even when ``end_window()`` was
        not called there (a module whose ``on_before_optimizer_step`` does not call ``super()``)."""
        if self._forwards_in_window == 0:
            return False
        trainer = self._window_trainer() if self._window_trainer is not None else None
        seen = self.window._seen  # (global step, batch_idx) of the last micro-batch begun
        return trainer is None or seen is None or int(getattr(trainer, "global_step", seen[0])) == seen[0]

    def _totals(self, batch: Mapping[str, Any], training: bool, accumulate: int = 1,
                world_size: int = 1) -> dict[str, torch.Tensor]:
        if training and self.window.totals is not None:
            return self.window.totals
        if training and (accumulate > 1 or world_size > 1) and not self._side_depth:
            # this batch's own counts would be wrong for the window: refuse rather than train inexactly
            raise RuntimeError(
                "lit_ft: a training forward went through the token-loss engine, but no accumulation window was "
                f"counted (accumulate_grad_batches={accumulate}, world size {world_size}). The engine counts it at "
                "on_train_batch_start: if your module overrides on_train_batch_start, call super() there."
            )
        return self.batch_counts(batch)  # evaluation, side computations, or one process without accumulation

    @staticmethod
    def _objective_totals(totals: Mapping[str, torch.Tensor], objective: Objective) -> dict[str, torch.Tensor]:
        prefix = f"{objective.objective_name}/"
        return {k[len(prefix):]: v for k, v in totals.items() if k.startswith(prefix)}

    # -- the loss ------------------------------------------------------------------------------------------------
    def objective_terms(self, inputs: ObjectiveInputs) -> list[tuple[Objective, torch.Tensor]]:
        terms = []
        for o in self.objectives:
            value = o.objective_loss(inputs)
            if value is None:
                continue
            if value.dim() != 0:
                raise ValueError(f"{type(o).__name__}.objective_loss must return a scalar sum, got shape "
                                 f"{tuple(value.shape)}")
            terms.append((o, value))
        return terms

    def combine(self, token_sum: torch.Tensor, n_kept: torch.Tensor, terms: list[tuple[Objective, torch.Tensor]],
                batch: Mapping[str, Any], training: bool, accumulate: int = 1, world_size: int = 1) -> torch.Tensor:
        """The tensor a step returns. Evaluation: token mean + Σ weight·sum/normaliser over this batch.

        Training: its *value* is the same (this micro-batch's own means); its *gradient* is ``accumulate ·
        world_size · (token_sum / C + Σ weight · sum / normaliser)`` with the window totals, which cancels
        Lightning's division by the accumulation factor and DDP's average over ranks.
        """
        local = self.batch_counts(batch) if (training and terms) else None
        own = self.own_token_normaliser(batch) if training else None
        # the value is this micro-batch's own mean: Σ w·ℓ / its own normaliser when a scorer declares one
        denom = n_kept.detach() if own is None else own.to(n_kept.device)
        value = token_sum.detach() / denom.to(token_sum.dtype).clamp_min(1)
        values: dict[str, torch.Tensor] = {}
        if not training:
            total = token_sum / n_kept.to(token_sum.dtype).clamp_min(1)
            totals = self.batch_counts(batch) if terms else {}
            for o, s in terms:
                norm = o.objective_normaliser(self._objective_totals(totals, o)).to(s.device).clamp_min(1e-12)
                t = float(o.objective_weight()) * s / norm
                values[o.objective_name] = t.detach()
                total = total + t
            self.last_objective_values = values
            return total
        self.training_forwards += 1
        self._forwards_in_window += 1
        totals = self._totals(batch, training, accumulate, world_size)
        scale = float(accumulate) * float(world_size)
        c_tok = (totals[TOKEN_TERM] * self.nominal_keep_ratio()).to(token_sum.device).clamp_min(1.0)
        grad_part = token_sum / c_tok
        for o, s in terms:
            w = float(o.objective_weight())
            norm = o.objective_normaliser(self._objective_totals(totals, o)).to(s.device).clamp_min(1e-12)
            grad_part = grad_part + w * s / norm
            own = o.objective_normaliser(self._objective_totals(local or totals, o)).to(s.device).clamp_min(1e-12)
            values[o.objective_name] = (w * s.detach() / own)
            value = value + values[o.objective_name]
        self.last_objective_values = values
        grad_part = grad_part * scale
        return grad_part + (value.to(grad_part.dtype) - grad_part.detach())


_PIPELINE_ATTR = "_lit_ft_token_pipeline"


def token_pipeline_for(module: torch.nn.Module, create: bool = True) -> TokenPipeline | None:
    """The :class:`TokenPipeline` attached to ``module`` (created on first use when ``create``)."""
    pipe = module.__dict__.get(_PIPELINE_ATTR)
    if pipe is None and create:
        pipe = TokenPipeline()
        # stored in __dict__ directly: a plain attribute, not a submodule/parameter/buffer
        module.__dict__[_PIPELINE_ATTR] = pipe
    return pipe
