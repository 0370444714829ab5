"""PreferenceModule: a causal LM trained on chosen/rejected pairs (PreferenceDataModule batches) by the TokenDPO
objective."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.modules.causal_lm import CausalLMModule


class PreferenceModule(CausalLMModule):
    """A Hugging Face causal LM trained on preference pairs: the step of :class:`lit_ft.callbacks.TokenDPO` (DPO with
    a frozen reference policy and optional per-token weights, log-probs through the fused op).

    Batches are :class:`lit_ft.data.PreferenceDataModule`'s: ``chosen_input_ids`` / ``chosen_attention_mask`` /
    ``chosen_labels``, the same for ``rejected_*`` (``[B, T]``, labels unshifted, -100 on the prompt and padding),
    ``sample_idx`` and optionally ``chosen_token_weights`` / ``rejected_token_weights``. Put a ``TokenDPO`` in
    ``trainer.callbacks`` (its arguments: β, aggregation, reference policy); without one the module trains the
    chosen responses' token cross-entropy (SFT on the chosen side, the usual step before DPO) and says so once.

    Validation logs ``val/loss`` and, with TokenDPO, ``val/accuracy`` (share of held-out pairs whose chosen reward
    is higher) and ``val/margin`` (mean reward margin), pair-weighted over the validation set.

    Args: those of :class:`lit_ft.modules.CausalLMModule` (``eval_exact_match`` and ``eval_before_training`` are not
    used: preference pairs have no answers to match).
    """

    #: the TokenDPO callback that runs this module's pair step (set at its setup; None = SFT on the chosen side)
    token_dpo: Any = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._said_sft = False

    # -- steps --------------------------------------------------------------------------------------------------
    def _chosen_batch(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return {"input_ids": batch["chosen_input_ids"], "attention_mask": batch["chosen_attention_mask"],
                "labels": batch["chosen_labels"]}

    def _sft_loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean token cross-entropy of the chosen responses (this micro-batch's mean) through the fused op."""
        from lit_ft.core.loss.primitives import final_hidden_states, shift_targets
        from lit_ft.kernels import fused_linear_token_ce

        chosen = self._chosen_batch(batch)
        self.check_token_ids(chosen, "train" if self.training else "val")
        parts = self.loss_parts(self.causal_lm)  # a compiled model's trunk runs compiled
        hidden = final_hidden_states(parts, chosen)
        targets = shift_targets(chosen["labels"])
        return fused_linear_token_ce(
            hidden.reshape(-1, hidden.shape[-1]), parts.weight, targets.reshape(-1), bias=parts.bias,
            reduction="mean", logit_softcap=parts.logit_softcap, logit_scale=parts.logit_scale,
            impl=self.token_loss_impl, weight_grad_accumulation=self.token_loss_weight_grad_accumulation,
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        bs = batch["chosen_input_ids"].shape[0]
        if self.token_dpo is None:
            if not self._said_sft:
                rank_zero_info("PreferenceModule: no TokenDPO in trainer.callbacks; training the chosen responses' "
                               "token loss (SFT on the chosen side)")
                self._said_sft = True
            loss = self._sft_loss(batch)
            self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
            return loss
        for side in ("chosen", "rejected"):
            self.check_token_ids({"input_ids": batch[f"{side}_input_ids"], "labels": batch[f"{side}_labels"]},
                                 f"train_{side}")
        loss = self.token_dpo.training_loss(self, batch)
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        return loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        bs = batch["chosen_input_ids"].shape[0]
        if self.token_dpo is None:
            loss = self._sft_loss(batch)
            self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
            return loss
        t = self.token_dpo.terms(self, batch)
        loss = t.loss_sum / t.units.clamp_min(1.0)
        m = self.token_dpo.metrics(t, loss)
        self.log("val/loss", loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/accuracy", m["accuracy"], batch_size=bs, sync_dist=True)
        self.log("val/margin", m["margin"], batch_size=bs, sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        pass

    def on_validation_epoch_end(self) -> None:
        pass

    def on_train_start(self) -> None:
        from lit_ft.modules.data_stats import log_data_stats

        log_data_stats(self)  # no before-training evaluation: preference pairs have no answers to match

    # the token-loss engine's window bookkeeping counts supervised `labels`, which pair batches do not have: TokenDPO
    # counts its own units (pairs or aligned positions) over the window
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        return pl.LightningModule.on_train_batch_start(self, batch, batch_idx)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        pl.LightningModule.on_before_optimizer_step(self, optimizer)
