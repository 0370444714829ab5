"""Excess-loss token selection (Rho-1 style selective language modelling)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lit_ft.callbacks._token_scorer import TokenScorerCallback
from lit_ft.callbacks.token_selection._reference import INITIAL, reference_factory
from lit_ft.callbacks.token_selection.reference_cache import ReferenceLossCache
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE
from lit_ft.core.validate import check_choice, check_number
from lit_ft.core.frozen import DTYPES, FrozenModel, frozen_model_property
from lit_ft.core.loss import TokenDecision, TokenScores, causal_lm_token_nll, global_topk_mask

#: what ExcessLossSelection says when it has no reference (at setup, not at construction: every callback is
#: constructible with no arguments, and a config may set the reference on the command line)
NO_REFERENCE = (
    "ExcessLossSelection needs a reference (Rho-1 scores each token against a model trained on high-quality data); "
    "got reference=None and reference_losses=None. Give one of:\n"
    "  - reference=<path or name>: a local HF folder, a lit_ft.assets name, or a lit-ft .ckpt (the Rho-1 recipe "
    "trains it on a clean split first: configs/rho1/reference.yaml, docs/techniques/excess_loss.md#rho-1-recipe);\n"
    "  - reference_losses=<file>: the reference's per-token losses, scored once offline "
    "(python -m lit_ft.callbacks.token_selection.reference_cache); no reference forward while training;\n"
    "  - reference='initial': a frozen copy of the weights when training starts. This is NOT Rho-1 (all excess "
    "losses are 0 at step 0; later it prefers the tokens that improved least); use it only knowingly."
)


def _reference_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> str | None:
    """Resuming with another ``reference``: a loaded model is (re)loaded; "the initial weights" exist only if saved
    (a checkpoint written before ``"initial"`` was named records ``None`` for it)."""
    saved_initial = saved in (None, INITIAL) and "reference_state" in state
    if new == INITIAL and not saved_initial:
        return ("the checkpoint holds no initial weights (its reference was a loaded model), so the reference would "
                "be the trained weights")
    return None


@technique(name="excess_loss", family="token_selection",
           paper="Rho-1: Not All Tokens Are What You Need", arxiv="2404.07965")
class ExcessLossSelection(TokenScorerCallback):
    """Train only on the tokens whose loss most exceeds a reference model's (Rho-1, Lin et al. 2024,
    "Not All Tokens Are What You Need").

    Algorithm, every training step:

    1. ``ℓ_ref,t`` — per-token NLL of a frozen reference model on the same batch (no grad, no logits tensor);
    2. ``ℓ_θ,t`` — per-token NLL of the current model (from the same forward that trains);
    3. excess ``Δ_t = ℓ_θ,t − ℓ_ref,t``; keep the top ``keep_ratio`` of valid tokens by ``Δ`` — counted over the whole
       batch and across DDP ranks, not per sequence;
    4. loss = mean NLL over the kept tokens (normalised by the global kept-token count of the accumulation window).

    Dropped tokens are removed before the lm_head matmul under :class:`lit_ft.modules.TokenLossMixin`.
    Evaluation losses are never filtered.

    A reference is required (setup refuses ``reference=None`` without ``reference_losses``, listing the ways):
    Rho-1's reference is a model trained on high-quality data (the recipe: ``configs/rho1/``).

    Args:
        keep_ratio: fraction of valid tokens kept per step, in (0, 1]. Rho-1 reports ~0.6-0.7 (not yet
            confirmed against the paper's text); 1.0 keeps everything (plain SFT, useful as a control).
        reference: the reference model: a local HF folder or a ``lit_ft.assets`` name (loaded with
            ``AutoModelForCausalLM``; it must share the tokenizer), or a lit-ft ``.ckpt`` (its weights in the trained
            model's architecture), or ``"initial"``: a frozen copy of the weights when training starts (stored in
            the checkpoint, so a resumed run keeps it) — the self-reference mode, which is NOT Rho-1 (every excess
            is 0 at step 0; later it prefers the tokens that improved least).
        reference_losses: a file of per-token reference NLLs keyed by ``sample_idx``, scored once offline
            (:mod:`lit_ft.callbacks.token_selection.reference_cache`): no reference model is loaded and no reference
            forward runs while training. With ``reference`` also given, it must name the model the file was made
            with.
        reference_dtype: dtype of the reference copy: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (halves its
            memory; its NLL is computed in fp32 all the same).
        integration: ``"auto"`` (best available), ``"mixin"``, ``"hook"`` (HF ``loss_function`` of a plain module)
            or ``"batch"`` (labels of dropped tokens set to -100 before the forward; costs an extra no-grad
            forward of the current model).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    token_needs = frozenset({"nll"})
    scorer_name = "excess_loss"
    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`): the saved initial-weights reference is
    #: restored whatever ``keep_ratio``; switching to ``reference=None`` from a loaded model is refused
    resume_decisions = {"keep_ratio": RESTORE, "reference": _reference_decision, "reference_dtype": RESTORE,
                        "integration": RESTORE, "reference_losses": RESTORE}

    def __init__(
        self,
        keep_ratio: float = 0.6,
        reference: str | None = None,
        reference_dtype: str = "float32",
        integration: str = "auto",
        reference_losses: str | None = None,
        picture_every_n_steps: int = 0,
    ) -> None:
        super().__init__(integration=integration, picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        check_number(owner, "keep_ratio", keep_ratio, low=0, high=1, low_open=True)
        check_choice(owner, "reference_dtype", reference_dtype, sorted(DTYPES))
        for name, value in (("reference", reference), ("reference_losses", reference_losses)):
            if value is not None and not (isinstance(value, str) and value):
                raise ValueError(f"{owner}: `{name}` must be None or a non-empty string, got {value!r}")
        self.keep_ratio = float(keep_ratio)
        self.reference = reference
        self.reference_dtype = reference_dtype
        self.reference_losses = reference_losses
        # reference="initial": a copy of the weights when training starts, stored in checkpoints (a resumed run
        # could not re-create it); a path is reloaded instead; with reference_losses no model is built at all
        source = None if reference in (None, INITIAL) else reference_factory(reference, owner, reference_dtype)
        self._reference = FrozenModel(source, owner=owner, dtype=reference_dtype, persist=reference == INITIAL)
        self._cache: ReferenceLossCache | None = None
        self._ref_nll: torch.Tensor | None = None
        self._ref_batch_id: int | None = None

    @property
    def state_key(self) -> str:
        extra = {} if self.reference_losses is None else {"reference_losses": self.reference_losses}
        return self._generate_state_key(keep_ratio=self.keep_ratio, reference=self.reference, **extra)

    # -- reference model ------------------------------------------------------------------------------------------
    reference_model = frozen_model_property("_reference", "The frozen reference model (``None`` before setup).")

    #: the name tests (and code written before FrozenModel) read and inject the reference under
    _ref_model = reference_model

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.reference is None and self.reference_losses is None and self.reference_model is None:
            raise ValueError(NO_REFERENCE)  # (a model injected through reference_model counts as a reference)
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        if self.reference_losses is not None:
            self._cache = self._load_cache(trainer)
        else:
            self._reference.ensure(pl_module)

    def _load_cache(self, trainer: pl.Trainer) -> ReferenceLossCache:
        """The offline reference losses, checked against ``reference`` and the DataModule they are used with."""
        cache = ReferenceLossCache.load(self.reference_losses)
        made_with = cache.meta.get("reference")
        if self.reference is not None and made_with is not None and made_with != self.reference:
            raise ValueError(f"ExcessLossSelection: reference_losses={self.reference_losses!r} was scored with "
                             f"reference {made_with!r}, but reference={self.reference!r}; give the matching pair "
                             "(or reference=None to use the file as it is)")
        datamodule = getattr(trainer, "datamodule", None)
        for key, attr in (("tokenizer", "tokenizer_name"), ("max_length", "max_length")):
            ours = getattr(datamodule, attr, None)
            if ours is not None and key in cache.meta and cache.meta[key] != str(ours):
                raise ValueError(f"ExcessLossSelection: reference_losses={self.reference_losses!r} was made with "
                                 f"{key} {cache.meta[key]!r}, but the DataModule has {attr}={ours!r}; re-make the "
                                 "cache for this DataModule")
        return cache

    def _reference_nll(self, pl_module: pl.LightningModule, batch: Mapping[str, Any]) -> torch.Tensor:
        if self.reference_losses is not None:  # offline scores: no reference forward
            if self._cache is None:
                self._cache = ReferenceLossCache.load(self.reference_losses)
            return self._cache.lookup(batch)
        self._reference.ensure(pl_module)
        with self._reference.on(batch["input_ids"].device) as reference:
            return causal_lm_token_nll(reference, batch)

    def prepare_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any], training: bool) -> None:
        self._ref_nll = self._reference_nll(pl_module, batch) if training else None
        self._ref_batch_id = id(batch)

    # -- selection ------------------------------------------------------------------------------------------------
    def nominal_keep_ratio(self) -> float:
        # Rho-1 normalises by N · k% (its eq. for L_SLM): the window's supervised tokens times keep_ratio
        return self.keep_ratio

    def score_tokens(self, scores: TokenScores) -> TokenDecision:
        if not scores.training:
            return TokenDecision()
        if scores.nll is None:
            raise RuntimeError("ExcessLossSelection needs the current per-token NLL; the loss path did not provide it")
        if self._ref_nll is None or self._ref_nll.shape != scores.nll.shape:
            raise RuntimeError(
                "ExcessLossSelection: no reference NLL for this batch. Its on_train_batch_start must run before the "
                "forward (is the callback passed to the Trainer that trains?)"
            )
        excess = scores.nll - self._ref_nll.to(scores.nll.device)
        keep = global_topk_mask(excess, scores.valid, self.keep_ratio)
        n_valid = scores.valid.sum().clamp_min(1)
        kept = keep.sum().clamp_min(1)
        metrics = {
            "kept_fraction": (keep.sum() / n_valid).float(),
            "excess_kept_mean": (excess * keep).sum() / kept,
            "excess_mean": (excess * scores.valid).sum() / n_valid,
            "reference_nll": (self._ref_nll.to(excess.device) * scores.valid).sum() / n_valid,
        }
        return TokenDecision(keep=keep, metrics=metrics)

    # -- checkpoint -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"keep_ratio": self.keep_ratio, "reference": self.reference}
        weights = self._reference.state_dict()  # only for reference="initial": "the weights when training started"
        if weights is not None:
            state["reference_state"] = weights
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.reference == INITIAL:  # a loaded reference is reloaded (the checkpoint's may be another one)
            self._reference.load_state_dict(state_dict.get("reference_state"))
