"""Shared plumbing for token-scoring callbacks: attach to the best integration level, bind batches, let the engine
count the window normalisers, log metrics. Technique files subclass :class:`TokenScorerCallback` and implement
``score_tokens`` (levels 2-3) and, optionally, ``edit_batch`` (level 1)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.introspect import causal_lm_parts, find_hf_model
from lit_ft.core.loss import (
    INTEGRATIONS,
    Attachment,
    TokenLossHost,
    TokenScorer,
    TokenScores,
    attach,
    detach,
    final_hidden_states,
    shift_targets,
    token_stats,
)
from lit_ft.core.pictures import PictureEvery, is_picture_step, log_html
from lit_ft.core.resume import Decision, adopt_saved_state, record_resume_args
from lit_ft.core.validate import check_choice


class TokenScorerCallback(PictureEvery, Callback, TokenScorer):
    """Base class. ``integration``: ``"auto"`` (mixin when the module is a :class:`lit_ft.modules.TokenLossMixin`,
    else the HF loss hook), ``"mixin"``, ``"hook"`` or ``"batch"`` (edit ``labels`` before the forward; needs a
    scoring forward of its own). The level is chosen and the scorer registered by :func:`lit_ft.core.loss.attach`.

    ``picture_every_n_steps`` (0 = off, the default): every that many optimizer steps, an HTML heat-map of the first
    ``picture_rows`` rows of the step's first micro-batch, each token coloured by this scorer's decision (kept /
    dropped, loss weight), tokens decoded with the DataModule's or module's ``tokenizer`` (else ids):
    ``<log_dir>/<scorer_name>/tokens_step{N}.html`` and a W&B ``Html`` when a ``WandbLogger`` is attached
    (:mod:`lit_ft.core.picture_tokens`). It reuses the decision the step computes anyway; nothing is kept between
    pictures."""

    #: batch keys this technique needs at the first batch (checked once, with a clear error)
    required_batch_keys: tuple[str, ...] = ("input_ids", "labels")
    #: resuming with changed arguments (:mod:`lit_ft.core.resume`): argument -> ``RESTORE``, a reason to refuse, or
    #: ``(saved, new, state) -> reason | None``; ``None`` = every change of the state key's arguments is refused
    resume_decisions: Mapping[str, Decision] | None = None
    #: rows of the micro-batch the token picture shows
    picture_rows: int = 3
    #: path of the last token picture (rank 0; ``None`` before the first)
    last_picture: str | None = None
    _picture_step: int | None = None  # the step whose decision is being captured
    _picture_rows: Any = None  # the captured rows (TokenRows) until drawn
    _picture_done: int | None = None  # the last step drawn (one picture per step under accumulation)

    def __init__(self, integration: str = "auto", picture_every_n_steps: int = 0) -> None:
        self.integration = check_choice(type(self).__name__, "integration", integration, INTEGRATIONS)
        self.picture_every_n_steps = picture_every_n_steps  # checked by PictureEvery
        self.level: str | None = None  # resolved at setup
        self._attachment: Attachment | None = None
        self._checked_batch = False

    # -- attach / detach ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._attachment = attach(trainer, pl_module, self, self.integration)
        self.level = self._attachment.level

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detach(self._attachment, self)
        self._attachment = None
        self._disarm_picture()

    # -- resume with changed arguments: restore or refuse, never a silent reset (lit_ft.core.resume) -------------
    @override
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        record_resume_args(self, checkpoint)

    @override
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        adopt_saved_state(self, trainer, checkpoint)

    @property
    def _pipeline(self) -> Any:
        return None if self._attachment is None else self._attachment.pipeline

    # -- per batch ----------------------------------------------------------------------------------------------
    def _check(self, batch: Any) -> None:
        if not self._checked_batch:
            require_keys(batch, self.required_batch_keys, who=type(self).__name__)
            self._checked_batch = True

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._check(batch)
        self._arm_picture(trainer)
        if self._attachment is not None:
            self._attachment.begin_batch(trainer, pl_module, batch, batch_idx)
        self.prepare_batch(trainer, pl_module, batch, training=True)
        if self.level == "batch":
            self.edit_batch(trainer, pl_module, batch)

    @override
    def on_validation_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._check(batch)
        if self._attachment is not None:
            self._attachment.bind(batch)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self._attachment is not None:
            self._attachment.end_window()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        metrics = self._pipeline.last_metrics if self._pipeline is not None else self._batch_metrics
        prefix = f"lit_ft/{self.scorer_name}/"
        for name, value in metrics.items():
            if name.startswith(prefix) or name == "lit_ft/tokens/kept_fraction":
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self._draw_picture(trainer, pl_module)

    # -- the token picture (lit_ft.core.picture_tokens) ----------------------------------------------------------
    def _arm_picture(self, trainer: pl.Trainer) -> None:
        """At the first micro-batch of a picture step, wrap this instance's ``score_tokens`` so that its first
        training decision is copied (first rows, CPU). Every rank arms at the same step (it reads only the step)."""
        step = int(trainer.global_step) + 1  # the optimizer step this micro-batch belongs to
        if (not is_picture_step(step, self.picture_every_n_steps) or self._picture_step is not None
                or self._picture_done == step):
            return
        from lit_ft.core.picture_tokens import capture_rows

        self._picture_step, self._picture_rows = step, None
        scorer = self.score_tokens  # the technique's own method (bound before the wrapper shadows it)

        def capturing(scores: TokenScores) -> Any:
            decision = scorer(scores)
            if scores.training and self._picture_rows is None:
                self._picture_rows = capture_rows(scores, decision, self.picture_rows)
                self.__dict__.pop("score_tokens", None)  # captured: back to the plain method
            return decision

        self.__dict__["score_tokens"] = capturing

    def _disarm_picture(self) -> None:
        self.__dict__.pop("score_tokens", None)
        self._picture_step = self._picture_rows = None

    def _draw_picture(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = self._picture_step
        if step is None:
            return
        rows = self._picture_rows
        self._disarm_picture()
        self._picture_done = step
        page = None
        if trainer.is_global_zero and rows is not None:
            from lit_ft.core.picture_tokens import find_tokenizer, token_heatmap_html

            page = token_heatmap_html(rows, find_tokenizer(trainer, pl_module),
                                      title=f"{type(self).__name__}: kept / dropped tokens, step {step}")
        # every rank calls (the log dir is broadcast); only rank 0 writes
        self.last_picture = log_html(trainer, page, self.scorer_name, "tokens", step)

    # -- for subclasses -----------------------------------------------------------------------------------------
    _batch_metrics: dict[str, Any] = {}

    def prepare_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any], training: bool) -> None:
        """Per-batch work before the forward (e.g. a reference model's NLL). Default: nothing."""

    def edit_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: dict[str, Any]) -> None:
        """Level 1: score with a no-grad forward of the current model, then set dropped targets to -100."""
        hf_model = find_hf_model(pl_module, require_lm_head=True)
        parts = causal_lm_parts(hf_model)
        targets = shift_targets(batch["labels"])
        valid = targets != IGNORE_INDEX
        with torch.no_grad():
            needs = self.token_needs
            stats = token_stats(parts, final_hidden_states(parts, batch), targets, needs) if needs else None
        scores = TokenScores(
            targets=targets, valid=valid, batch=batch, training=True,
            nll=None if stats is None else stats.nll,
            entropy=None if stats is None else stats.entropy,
            lse=None if stats is None else stats.lse,
        )
        decision = self.score_tokens(scores)
        keep = valid if decision.keep is None else valid & decision.keep
        labels = batch["labels"].clone()
        # target t is label t+1
        labels[:, 1:] = torch.where(keep[:, :-1], labels[:, 1:], torch.full_like(labels[:, 1:], IGNORE_INDEX))
        batch["labels"] = labels
        if decision.weights is not None:
            if not isinstance(pl_module, TokenLossHost):
                # a plain module's HF loss ignores `token_weights`: refuse rather than silently drop the weights
                raise TypeError(
                    f"{type(self).__name__}(integration='batch') produces token weights, which only a "
                    "lit_ft.modules.TokenLossMixin module or the HF loss hook consume; use integration='auto'"
                )
            w = torch.ones_like(labels, dtype=torch.float32)
            w[:, 1:] = decision.weights[:, :-1].float()
            batch["token_weights"] = w if batch.get("token_weights") is None else batch["token_weights"] * w
        m = {f"lit_ft/{self.scorer_name}/{k}": v for k, v in decision.metrics.items()}
        m["lit_ft/tokens/kept_fraction"] = (keep.sum() / valid.sum().clamp_min(1)).float()
        self._batch_metrics = m
