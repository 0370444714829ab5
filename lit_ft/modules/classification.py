"""ClassificationModule: sequence classification with a Hugging Face encoder or decoder."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics

from lit_ft.modules.data_stats import log_data_stats
from lit_ft.modules.optim import MODULE_NO_DECAY_PATTERNS, adamw_param_groups


class ClassificationModule(pl.LightningModule):
    """Fine-tune ``AutoModelForSequenceClassification`` (encoders like MiniLM, or decoders with a score head).

    Args:
        model: local HF folder or ``lit_ft.assets`` name (default: all-MiniLM-L6-v2 from PyPI).
        num_labels: number of classes (≥ 2).
        model_config: a transformers config dict with ``model_type`` for a random model (tests); overrides
            ``model``.
        learning_rate: AdamW learning rate (> 0).
        weight_decay: AdamW weight decay (≥ 0), not applied to biases, norms and embeddings.
    """

    #: tensors without weight decay, in configure_optimizers and when parameter callbacks rebuild the groups
    no_decay_patterns = MODULE_NO_DECAY_PATTERNS

    def __init__(
        self,
        model: str = "minilm-l6-v2",
        num_labels: int = 2,
        model_config: dict[str, Any] | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"ClassificationModule: num_labels must be >= 2, got {num_labels}")
        if not learning_rate > 0:
            raise ValueError(f"ClassificationModule: learning_rate must be > 0, got {learning_rate}")
        if weight_decay < 0:
            raise ValueError(f"ClassificationModule: weight_decay must be >= 0, got {weight_decay}")
        self.save_hyperparameters()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        if model_config is not None:
            cfg = dict(model_config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ValueError("ClassificationModule: model_config needs a 'model_type' key")
            config = AutoConfig.for_model(model_type, num_labels=num_labels, **cfg)
            self.model = AutoModelForSequenceClassification.from_config(config)
        else:
            from lit_ft.assets import resolve

            self.model = AutoModelForSequenceClassification.from_pretrained(resolve(model), num_labels=num_labels)
        self.model.train()  # from_pretrained returns eval mode (dropout off); Lightning keeps whatever mode it finds
        if self.model.config.pad_token_id is None:
            # decoders have no pad token; the score head needs one to find the last real token
            self.model.config.pad_token_id = getattr(self.model.config, "eos_token_id", None) or 0
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_labels)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_labels)

    def _forward(self, batch: Mapping[str, Any]) -> Any:
        keys = ("input_ids", "attention_mask", "token_type_ids", "labels")
        return self.model(**{k: batch[k] for k in keys if k in batch})

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._forward(batch)
        bs = batch["input_ids"].shape[0]
        self.train_acc(out.logits.argmax(-1), batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
        return out.loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._forward(batch)
        bs = batch["input_ids"].shape[0]
        self.val_acc(out.logits.argmax(-1), batch["labels"])
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/acc", self.val_acc, prog_bar=True, batch_size=bs)
        return out.loss

    def on_train_start(self) -> None:
        log_data_stats(self)

    def configure_optimizers(self) -> Any:
        groups = adamw_param_groups(self, self.hparams.learning_rate, self.hparams.weight_decay)
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
