"""ClassificationModule: sequence classification with a Hugging Face encoder or decoder."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.core.validate import check_int, check_number, check_str
from lit_ft.modules.data_stats import log_data_stats
from lit_ft.modules.optim import MODULE_NO_DECAY_PATTERNS, adamw_param_groups
from lit_ft.modules.peft_adapter import apply_peft, build_peft_config, describe_trainable


class ClassificationModule(pl.LightningModule):
    """Fine-tune ``AutoModelForSequenceClassification`` (encoders like MiniLM, or decoders with a score head).

    Args:
        model: local HF folder or ``lit_ft.assets`` name (default: all-MiniLM-L6-v2 from PyPI).
        num_labels: number of classes (≥ 2).
        model_config: a transformers config dict with ``model_type`` for a random model (tests); overrides
            ``model``.
        learning_rate: AdamW learning rate (> 0).
        weight_decay: AdamW weight decay (≥ 0), not applied to biases, norms and embeddings.
        multi_label: several labels per sample (``labels`` multi-hot [B, num_labels], e.g. from
            ``ClassificationDataModule(multi_label=True)``): sigmoid per label, ``BCEWithLogitsLoss``, predictions
            ``sigmoid > 0.5``, metric micro-F1 (``train/f1``, ``val/f1``). False: softmax cross-entropy, accuracy.
        pos_weight: multi-label only: per-label weight of the positive term of the BCE (``num_labels`` numbers
            > 0), or ``"balanced"`` = max_c(count_c) / count_c over the training labels (PTEC's weights; needs a
            DataModule with ``label_counts()``); None = 1 for every label.
        peft: a PEFT adapter as a dict of its ``peft`` config, e.g. ``{"peft_type": "LORA", "r": 8,
            "target_modules": ["query", "value"]}`` (``task_type`` defaults to ``"SEQ_CLS"``, so PEFT also trains
            the classification head): the model is wrapped with ``peft.get_peft_model`` once built, and only
            trainable tensors are optimised; the trainable share is logged once. Needs ``lit-ft[peft]``. None = full
            fine-tuning.
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
        multi_label: bool = False,
        pos_weight: list[float] | str | None = None,
        peft: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        owner = "ClassificationModule"
        # types first: a YAML `null` or list must not reach a comparison whose TypeError names no argument
        check_str(owner, "model", model)
        check_int(owner, "num_labels", num_labels, 2)
        if model_config is not None and not isinstance(model_config, Mapping):
            raise ValueError(f"{owner}: `model_config` must be a dict of config fields (with 'model_type') or null, "
                             f"got {model_config!r:.200}")
        if not isinstance(multi_label, bool):
            raise ValueError(f"ClassificationModule: multi_label must be true or false, got {multi_label!r}")
        if pos_weight is not None:
            if not multi_label:
                raise ValueError("ClassificationModule: pos_weight is for multi_label=true (per-label BCE weights)")
            if isinstance(pos_weight, str):
                if pos_weight != "balanced":
                    raise ValueError(f"ClassificationModule: pos_weight must be a list, 'balanced' or null, got {pos_weight!r}")
            elif (not isinstance(pos_weight, (list, tuple)) or len(pos_weight) != num_labels
                  or any(isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w <= 0
                         for w in pos_weight)):
                raise ValueError(
                    f"ClassificationModule: pos_weight must be {num_labels} (num_labels) finite numbers > 0, got {pos_weight!r}"
                )
        check_number(owner, "learning_rate", learning_rate, 0, low_open=True)
        check_number(owner, "weight_decay", weight_decay, 0)
        if peft is not None:  # a bad adapter config fails before the model is loaded
            build_peft_config(peft, "ClassificationModule", "SEQ_CLS")
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
        if peft is not None:
            self.model = apply_peft(self.model, peft, "ClassificationModule", "SEQ_CLS")
            self.model.train()
            rank_zero_info(describe_trainable(self.model, "ClassificationModule", peft))
        self.multi_label = multi_label
        if multi_label:
            self.model.config.problem_type = "multi_label_classification"
            self.train_f1 = torchmetrics.F1Score(task="multilabel", num_labels=num_labels, average="micro")
            self.val_f1 = torchmetrics.F1Score(task="multilabel", num_labels=num_labels, average="micro")
            pw = torch.tensor(pos_weight, dtype=torch.float32) if isinstance(pos_weight, (list, tuple)) else None
            self.register_buffer("pos_weight", pw, persistent=False)
        else:
            self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_labels)
            self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_labels)

    def setup(self, stage: str) -> None:
        if self.hparams.get("pos_weight") == "balanced" and self.pos_weight is None:
            dm = getattr(self.trainer, "datamodule", None)
            if not hasattr(dm, "label_counts"):
                raise ValueError("ClassificationModule: pos_weight='balanced' needs a DataModule with label_counts() "
                                 "(ClassificationDataModule); pass the weights as a list instead")
            counts = torch.tensor(dm.label_counts(), dtype=torch.float32)
            if counts.numel() != self.hparams.num_labels:
                raise ValueError(f"ClassificationModule: the data has {counts.numel()} labels, num_labels is "
                                 f"{self.hparams.num_labels}")
            self.pos_weight = (counts.max() / counts.clamp_min(1.0)).to(self.device)

    def _forward(self, batch: Mapping[str, Any]) -> Any:
        keys = ("input_ids", "attention_mask", "token_type_ids") + (() if self.multi_label else ("labels",))
        out = self.model(**{k: batch[k] for k in keys if k in batch})
        if self.multi_label:
            labels = batch["labels"]
            if labels.shape != out.logits.shape:
                raise ValueError(
                    f"ClassificationModule(multi_label=True): labels must be multi-hot [batch, num_labels] = "
                    f"{tuple(out.logits.shape)}, got {tuple(labels.shape)} (ClassificationDataModule(multi_label=true))"
                )
            out.loss = torch.nn.functional.binary_cross_entropy_with_logits(
                out.logits.float(), labels.float(), pos_weight=self.pos_weight)
        return out

    def _update_metric(self, split: str, out: Any, labels: torch.Tensor) -> torchmetrics.Metric:
        if self.multi_label:
            metric = self.train_f1 if split == "train" else self.val_f1
            metric(out.logits.detach().sigmoid(), labels.long())
        else:
            metric = self.train_acc if split == "train" else self.val_acc
            metric(out.logits.argmax(-1), labels)
        return metric

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._forward(batch)
        bs = batch["input_ids"].shape[0]
        metric = self._update_metric("train", out, batch["labels"])
        self.log("train/loss", out.loss, prog_bar=True, batch_size=bs)
        self.log("train/f1" if self.multi_label else "train/acc", metric, on_step=False, on_epoch=True, batch_size=bs)
        return out.loss

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        out = self._forward(batch)
        bs = batch["input_ids"].shape[0]
        metric = self._update_metric("val", out, batch["labels"])
        self.log("val/loss", out.loss, prog_bar=True, batch_size=bs, sync_dist=True)
        self.log("val/f1" if self.multi_label else "val/acc", metric, prog_bar=True, batch_size=bs)
        return out.loss

    def on_train_start(self) -> None:
        log_data_stats(self)

    def configure_optimizers(self) -> Any:
        groups = adamw_param_groups(self, self.hparams.learning_rate, self.hparams.weight_decay)
        return torch.optim.AdamW(groups, lr=self.hparams.learning_rate)
