"""Excess-loss token selection (Rho-1 style selective language modelling)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lit_ft.callbacks._token_scorer import TokenScorerCallback
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE
from lit_ft.core.validate import check_choice, check_number
from lit_ft.core.frozen import DTYPES, FrozenModel, frozen_model_property
from lit_ft.core.loss import TokenDecision, TokenScores, causal_lm_token_nll, global_topk_mask

def _reference_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> str | None:
    """Resuming with another ``reference``: a loaded model is (re)loaded; "the initial weights" exist only if saved."""
    if new is None and saved is not None:
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

    Args:
        keep_ratio: fraction of valid tokens kept per step, in (0, 1]. Rho-1 reports ~0.6-0.7 (not yet
            confirmed against the paper's text); 1.0 keeps everything (plain SFT, useful as a control).
        reference: the reference model. ``None`` = a frozen copy of the model's weights when training starts
            (stored in the checkpoint, so a resumed run keeps the same reference). Otherwise a local HF folder or
            a ``lit_ft.assets`` name, loaded with ``AutoModelForCausalLM``; it must share the tokenizer.
        reference_dtype: dtype of the reference copy: ``"float32"``, ``"bfloat16"`` or ``"float16"`` (halves its
            memory; its NLL is computed in fp32 all the same).
        integration: ``"auto"`` (best available), ``"mixin"``, ``"hook"`` (HF ``loss_function`` of a plain module)
            or ``"batch"`` (labels of dropped tokens set to -100 before the forward; costs an extra no-grad
            forward of the current model).
    """

    token_needs = frozenset({"nll"})
    scorer_name = "excess_loss"
    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`): the saved initial-weights reference is
    #: restored whatever ``keep_ratio``; switching to ``reference=None`` from a loaded model is refused
    resume_decisions = {"keep_ratio": RESTORE, "reference": _reference_decision, "reference_dtype": RESTORE,
                        "integration": RESTORE}

    def __init__(
        self,
        keep_ratio: float = 0.6,
        reference: str | None = None,
        reference_dtype: str = "float32",
        integration: str = "auto",
    ) -> None:
        super().__init__(integration=integration)
        owner = type(self).__name__
        check_number(owner, "keep_ratio", keep_ratio, low=0, high=1, low_open=True)
        check_choice(owner, "reference_dtype", reference_dtype, sorted(DTYPES))
        self.keep_ratio = float(keep_ratio)
        self.reference = reference
        self.reference_dtype = reference_dtype
        # reference=None: a copy of the weights when training starts, stored in checkpoints (a resumed run could not
        # re-create it); a path is reloaded instead
        self._reference = FrozenModel(reference, owner="ExcessLossSelection", dtype=reference_dtype)
        self._ref_nll: torch.Tensor | None = None
        self._ref_batch_id: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(keep_ratio=self.keep_ratio, reference=self.reference)

    # -- reference model ------------------------------------------------------------------------------------------
    reference_model = frozen_model_property("_reference", "The frozen reference model (``None`` before setup).")

    #: the name tests (and code written before FrozenModel) read and inject the reference under
    _ref_model = reference_model

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._reference.ensure(pl_module)

    def _reference_nll(self, pl_module: pl.LightningModule, batch: Mapping[str, Any]) -> torch.Tensor:

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
        weights = self._reference.state_dict()  # only for reference=None: "the weights when training started"
        if weights is not None:
            state["reference_state"] = weights
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.reference is None:  # a loaded reference is reloaded (the checkpoint's may be another one)
            self._reference.load_state_dict(state_dict.get("reference_state"))
