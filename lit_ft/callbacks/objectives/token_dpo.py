"""Token-level DPO (cDPO's objective): DPO with a frozen reference policy and optional per-token weights, the policy's
and the reference's per-token log-probs through the fused op (no ``[N, V]`` logits)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.frozen import FrozenModel
from lit_ft.core.loss.primitives import causal_lm_token_nll, final_hidden_states, shift_targets
from lit_ft.core.loss.window import WindowCounter
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE, ResumeRecorded

AGGREGATIONS = ("position", "sequence")
#: reference policies by name; any other non-empty string is a local folder or lit_ft asset name
REFERENCES = ("auto", "frozen_copy", "adapter_off")
SIDES = ("chosen", "rejected")
PAIR_KEYS = tuple(f"{s}_{k}" for s in SIDES for k in ("input_ids", "attention_mask", "labels"))
WEIGHT_KEYS = ("chosen_token_weights", "rejected_token_weights")
PROVIDERS = {k: "lit_ft.data.PreferenceDataModule (chosen/rejected pairs)" for k in PAIR_KEYS}


# -- the math ------------------------------------------------------------------------------------------------------
@dataclass
class DPOTerms:
    """One forward's DPO term: ``loss_sum`` (with gradient) over ``units`` (pairs, or aligned positions), and per
    pair the detached rewards ``β Σ_t (log π − log π_ref)`` of each side (unweighted, as TRL logs them)."""

    loss_sum: torch.Tensor
    units: torch.Tensor
    chosen_reward: torch.Tensor
    rejected_reward: torch.Tensor


def dpo_units(mask_chosen: torch.Tensor, mask_rejected: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The normaliser's unit count of a pair batch: its pairs (``"sequence"``) or its aligned positions where the
    chosen or the rejected response has a target (``"position"``)."""
    if aggregation == "sequence":
        return torch.tensor(float(mask_chosen.shape[0]))
    return (mask_chosen | mask_rejected).sum().to(torch.float32)


def token_dpo_terms(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                    ref_rejected: torch.Tensor, mask_chosen: torch.Tensor, mask_rejected: torch.Tensor,
                    weights_chosen: torch.Tensor | None, weights_rejected: torch.Tensor | None, beta: float,
                    aggregation: str) -> DPOTerms:
    """The token-weighted DPO loss sum from per-token log-probs ``[B, T]`` in target space (position ``t`` scores
    token ``t + 1``; any value where the mask is False is ignored).

    With ``Δ_t = w_t (log π_θ − log π_ref)`` per side:

    - ``"sequence"``: ``Σ_pairs −log σ(β (Σ_t Δ^c_t − Σ_t Δ^r_t))`` — with all weights 1 the standard DPO loss;
    - ``"position"``: ``Σ_pairs Σ_t −log σ(β (Δ^c_t − Δ^r_t))`` over the positions ``t`` where either side has a
      target, a side without a target there contributing 0 (the cDPO authors' code: the chosen and rejected
      sequences padded to one length, the sigmoid per aligned position).
    """
    zero = torch.zeros((), dtype=policy_chosen.dtype, device=policy_chosen.device)

    def delta(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, w: torch.Tensor | None) -> torch.Tensor:
        d = torch.where(mask, policy - ref.to(policy.dtype), zero)
        return d if w is None else d * w.to(d.dtype)

    dc = delta(policy_chosen, ref_chosen, mask_chosen, weights_chosen)
    dr = delta(policy_rejected, ref_rejected, mask_rejected, weights_rejected)
    if aggregation == "sequence":
        loss_sum = -F.logsigmoid(beta * (dc.sum(1) - dr.sum(1))).sum()
    elif aggregation == "position":
        union = mask_chosen | mask_rejected
        loss_sum = torch.where(union, -F.logsigmoid(beta * (dc - dr)), zero).sum()
    else:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    with torch.no_grad():
        rc = beta * torch.where(mask_chosen, policy_chosen - ref_chosen.to(policy_chosen.dtype), zero).sum(1)
        rr = beta * torch.where(mask_rejected, policy_rejected - ref_rejected.to(policy_rejected.dtype), zero).sum(1)
    return DPOTerms(loss_sum, dpo_units(mask_chosen, mask_rejected, aggregation).to(loss_sum.device), rc, rr)


# -- batches -------------------------------------------------------------------------------------------------------
def _pad_to(x: torch.Tensor, width: int, value: float) -> torch.Tensor:
    return x if x.shape[1] == width else F.pad(x, (0, width - x.shape[1]), value=value)


def concat_pairs(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """One ``[2B, T]`` causal-LM batch of a pair batch: the chosen rows, then the rejected rows (right-padded to a
    common ``T`` when the two sides differ in width)."""
    width = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    out = {}
    for key, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX)):
        out[key] = torch.cat([_pad_to(batch[f"{s}_{key}"], width, pad) for s in SIDES])
    return out


def pair_targets(batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Target-space masks ``[B, T]`` (common width) of the chosen and the rejected side."""
    cat = concat_pairs(batch)["labels"]
    targets = shift_targets(cat)
    b = batch["chosen_labels"].shape[0]
    return targets[:b] != IGNORE_INDEX, targets[b:] != IGNORE_INDEX


def pair_weights(batch: Mapping[str, Any], width: int, use_chosen: bool) -> tuple[torch.Tensor | None, ...]:
    """``chosen_token_weights`` / ``rejected_token_weights`` (unshifted, aligned with the labels) in target space at
    ``width``; ``None`` for a side without weights (weight 1) — the chosen side also when ``use_chosen`` is off."""
    out: list[torch.Tensor | None] = []
    for side, key in zip(SIDES, WEIGHT_KEYS):
        w = batch.get(key)
        if w is None or (side == "chosen" and not use_chosen):
            out.append(None)
            continue
        labels = batch[f"{side}_labels"]
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(labels.shape) or not w.is_floating_point():
            raise ValueError(f"TokenDPO: batch[{key!r}] must be a float tensor shaped like batch['{side}_labels'] "
                             f"{tuple(labels.shape)}, got {getattr(w, 'dtype', type(w).__name__)} "
                             f"{tuple(getattr(w, 'shape', ()))}")
        out.append(shift_targets(_pad_to(w.float(), width, 0.0), ignore_index=0))
    return tuple(out)


# -- the technique -------------------------------------------------------------------------------------------------
def _check_beta(beta: Any) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"TokenDPO: `beta` must be a finite number > 0, got {beta!r}")
    return float(beta)


def is_peft_model(model: Any) -> bool:
    return callable(getattr(model, "disable_adapter", None)) and callable(getattr(model, "get_base_model", None))


@technique(name="token_dpo", family="objectives",
           paper="Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability",
           arxiv="2411.19943")
class TokenDPO(ResumeRecorded, Callback):
    """Token-level DPO: the objective of cDPO, DPO on chosen/rejected pairs with per-token weights.

    Paper: Lin, Liang, Xu et al., *Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's
    Reasoning Capability* (arXiv 2411.19943, ICML 2025); code: chenzhiling9954/Critical-Tokens-Matter.

    Algorithm: for a prompt with a chosen response ``y^c`` and a rejected one ``y^r``, per token
    ``Δ_t = w_t (log π_θ(y_t | x, y_<t) − log π_ref(y_t | x, y_<t))`` with ``π_ref`` a frozen reference policy and
    ``w_t`` a per-token weight (cDPO: from contrastive positive/negative models, see ``CriticalTokenScoring``; 1
    without). The loss is ``−log σ(β (Δ^c − Δ^r))``, either per aligned position ``t`` (the authors' code, the
    default) or on the sums over each response (``aggregation="sequence"``; with all weights 1 this is standard
    DPO). The authors weight only the rejected response (their ``only_neg=True``); ``use_chosen_weights`` turns the
    chosen side's weights on.

    How it runs: :class:`lit_ft.modules.PreferenceModule` (a causal LM fed by :class:`lit_ft.data.PreferenceDataModule`)
    calls this objective in its steps. The chosen and rejected rows go through the trunk as one ``[2B, T]`` batch;
    the per-token log-probs of the supervised positions come from the fused linear-CE op (``reduction="none"``,
    exact per-token gradients) — never an ``[N, V]`` logits tensor; the reference's through the same op without
    gradient. The loss is normalised by its units (pairs or aligned positions) counted over the whole accumulation
    window and all ranks, so gradient accumulation and DDP train exactly like one large batch. Weights come from the
    batch keys ``chosen_token_weights`` / ``rejected_token_weights`` (float ``[B, T]``, aligned with the labels)
    when present. A module whose step is ``self.model(**batch).loss`` cannot express a pair step with a reference:
    it is refused at setup, naming ``PreferenceModule``.

    Logs ``lit_ft/token_dpo/{loss, accuracy, margin, chosen_reward, rejected_reward}`` at every training step
    (rewards ``β Σ_t (log π_θ − log π_ref)``, unweighted; accuracy = share of pairs whose chosen reward is higher)
    and ``val/loss``, ``val/accuracy``, ``val/margin`` at validation.

    Args:
        beta: the DPO temperature β (> 0; the authors' 0.1).
        aggregation: ``"position"`` (the sigmoid per aligned token position, the authors' code) or ``"sequence"``
            (on the per-response sums: standard DPO with weights 1).
        reference: the frozen reference policy: ``"auto"`` (``"adapter_off"`` when the model is PEFT-wrapped, else
            ``"frozen_copy"``), ``"frozen_copy"`` (a copy of the model when training starts, saved in checkpoints),
            ``"adapter_off"`` (the same model with its PEFT adapters disabled: the authors' LoRA setup) or a local
            folder / ``lit_ft.assets`` name of a causal LM with the same vocabulary.
        use_chosen_weights: weight the chosen response's tokens too (``False``: only the rejected side's, the
            authors' ``only_neg=True``).
    """

    technique_name = "token_dpo"
    #: resumed with a changed argument: the objective's arguments apply from then on; the saved reference policy is
    #: what the run trained against, so another reference is refused
    resume_decisions = {
        "beta": RESTORE, "aggregation": RESTORE, "use_chosen_weights": RESTORE,
        "reference": "the checkpoint holds the reference policy the run started with; resume with the saved "
                     "`reference` (or start a new run)",
    }

    def __init__(self, beta: float = 0.1, aggregation: str = "position", reference: str = "auto",
                 use_chosen_weights: bool = False) -> None:
        self.beta = _check_beta(beta)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"TokenDPO: `aggregation` must be one of {AGGREGATIONS}, got {aggregation!r}")
        if not isinstance(reference, str) or not reference:
            raise ValueError(f"TokenDPO: `reference` must be one of {REFERENCES} or a local folder / lit_ft asset "
                             f"name, got {reference!r}")
        if not isinstance(use_chosen_weights, bool):
            raise ValueError(f"TokenDPO: `use_chosen_weights` must be true or false, got {use_chosen_weights!r}")
        self.aggregation = aggregation
        self.reference = reference
        self.use_chosen_weights = use_chosen_weights
        self._frozen = FrozenModel(None if reference in REFERENCES else reference, owner="TokenDPO")
        self._mode: str | None = None  # "adapter_off" or "frozen" once set up
        self._window = WindowCounter()
        self._checked = False
        self.last: dict[str, torch.Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(beta=self.beta, aggregation=self.aggregation, reference=self.reference,
                                        use_chosen_weights=self.use_chosen_weights)

    @property
    def reference_model(self) -> torch.nn.Module | None:
        """The frozen reference model (``None`` with ``adapter_off`` or before the build)."""
        return self._frozen.model

    # -- life cycle ---------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # a module that runs the pair step declares the `token_dpo` slot (lit_ft.modules.PreferenceModule does; the
        # callbacks never import lit_ft.modules)
        if not hasattr(type(pl_module), "token_dpo"):
            raise TypeError(
                f"TokenDPO trains preference pairs with a reference policy, a step that {type(pl_module).__name__} "
                "(whose training_step is its own) cannot express: use lit_ft.modules.PreferenceModule with "
                "lit_ft.data.PreferenceDataModule"
            )
        other = getattr(pl_module, "token_dpo", None)
        if other is not None and other is not self:
            raise ValueError("TokenDPO: this PreferenceModule already trains with another TokenDPO; use one per "
                             "module")
        peft = is_peft_model(pl_module.model)
        if self.reference == "adapter_off" and not peft:
            raise ValueError(f"TokenDPO: reference='adapter_off' needs a PEFT-wrapped model (PreferenceModule(peft="
                             f"...)); {type(pl_module.model).__name__} has no adapters. Use 'frozen_copy'.")
        self._mode = "adapter_off" if self.reference == "adapter_off" or (self.reference == "auto" and peft) \
            else "frozen"
        pl_module.token_dpo = self
        if self._mode == "frozen":
            self._frozen.ensure(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if getattr(pl_module, "token_dpo", None) is self:
            pl_module.token_dpo = None

    def check_batch(self, batch: Any) -> None:
        """The first batch has the pair keys (errors name the key and what provides it)."""
        if not self._checked:
            require_keys(batch, PAIR_KEYS, who="TokenDPO", providers=PROVIDERS)
            self._checked = True

    def counts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The normaliser's units of one micro-batch (read from the batch alone)."""
        mc, mr = pair_targets(batch)
        return {"units": dpo_units(mc, mr, self.aggregation)}

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.check_batch(batch)
        self._window.begin(trainer, pl_module, batch, batch_idx, self.counts)

    @override
    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self._window.end()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        for name, value in self.last.items():
            pl_module.log(f"lit_ft/token_dpo/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    # -- checkpoint ---------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"reference": self._frozen.state_dict() if self._mode != "adapter_off" else None}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._frozen.load_state_dict(state_dict.get("reference"))

    # -- the step -----------------------------------------------------------------------------------------------
    def reference_logps(self, pl_module: Any, cat: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The reference policy's per-token log-probs ``[2B, T]`` (target space, no gradient)."""
        if self._mode == "adapter_off":
            with pl_module.model.disable_adapter():
                return -causal_lm_token_nll(pl_module.causal_lm, cat, impl=pl_module.token_loss_impl)
        self._frozen.ensure(pl_module)
        with self._frozen.on(cat["input_ids"].device) as model:
            return -causal_lm_token_nll(model, cat, impl=pl_module.token_loss_impl)

    def terms(self, pl_module: Any, batch: Mapping[str, Any]) -> DPOTerms:
        """The policy's (with gradient) and the reference's per-token log-probs of a pair batch, and the DPO term."""
        from lit_ft.kernels import fused_linear_token_ce

        self.check_batch(batch)
        cat = concat_pairs(batch)
        b, width = batch["chosen_input_ids"].shape[0], cat["input_ids"].shape[1]
        with torch.no_grad():
            ref = self.reference_logps(pl_module, cat)
        parts = pl_module.loss_parts(pl_module.causal_lm)  # a compiled model's trunk runs compiled
        hidden = final_hidden_states(parts, cat)
        targets = shift_targets(cat["labels"])
        valid = targets != IGNORE_INDEX
        # only the supervised rows go through the head: the prompt and padding never reach the matmul
        nll = fused_linear_token_ce(
            hidden[valid], parts.weight, targets[valid], bias=parts.bias, reduction="none",
            logit_softcap=parts.logit_softcap, logit_scale=parts.logit_scale, impl=pl_module.token_loss_impl,
            weight_grad_accumulation=pl_module.token_loss_weight_grad_accumulation,
        )
        policy = torch.zeros(valid.shape, dtype=nll.dtype, device=nll.device).masked_scatter(valid, -nll)
        wc, wr = pair_weights(batch, width, self.use_chosen_weights)
        return token_dpo_terms(policy[:b], policy[b:], ref[:b], ref[b:], valid[:b], valid[b:], wc, wr, self.beta,
                               self.aggregation)

    def training_loss(self, pl_module: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """The tensor a training step returns: value = this micro-batch's mean loss per unit; gradient =
        ``accumulate · world · loss_sum / units of the window (all ranks)``, which cancels Lightning's division by
        the accumulation factor and DDP's average over ranks."""
        t = self.terms(pl_module, batch)
        trainer = pl_module.trainer
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        world = int(getattr(trainer, "world_size", 1) or 1)
        if not self._window.active:  # a step outside Lightning's loop (a test calling training_step itself)
            self._window.totals = {"units": t.units.detach().cpu()}
        total = self._window.totals["units"].to(t.loss_sum.device).clamp_min(1.0)
        grad_part = t.loss_sum * (accumulate * world) / total
        value = t.loss_sum.detach() / t.units.clamp_min(1.0)
        self.last = self.metrics(t, value)
        return grad_part + (value - grad_part.detach())

    @staticmethod
    def metrics(t: DPOTerms, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        margin = t.chosen_reward - t.rejected_reward
        return {"loss": loss.detach(), "accuracy": (margin > 0).float().mean(), "margin": margin.mean(),
                "chosen_reward": t.chosen_reward.mean(), "rejected_reward": t.rejected_reward.mean()}
