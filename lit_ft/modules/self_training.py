"""SelfTrainingModule: the verbalizer classifier with manual optimisation, the module ``SelfTraining`` drives (its
teacher phase, self-training sessions and meta-reweighted steps are not one loss per batch)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from lit_ft.modules.verbalizer import VerbalizerClassificationModule


class SelfTrainingModule(VerbalizerClassificationModule):
    """:class:`~lit_ft.modules.VerbalizerClassificationModule` trained with manual optimisation.

    With a ``lit_ft.callbacks.SelfTraining`` callback, each training step is the callback's (LiST: the teacher phase
    on the labelled batches, then self-training sessions: the student learns from the teacher's soft pseudo-labels on
    unlabelled batches, weighted by meta-reweighting, then fine-tunes on the labelled batches). Without one, it is
    plain prompt-based fine-tuning on the labelled batches (cross-entropy of the class scores, one optimizer step per
    batch, gradient norm clipped to ``max_grad_norm``).

    The defaults follow LiST's code (``microsoft/LiST``): lr 5e-6, no weight decay, fixed label-word weights. The
    other arguments are :class:`~lit_ft.modules.VerbalizerClassificationModule`'s (``model``, ``label_words``,
    ``learning_rate``, ...).

    Args:
        max_grad_norm: clip the gradient norm to this before each step when no callback drives the step (>= 0;
            HF Trainer's 1.0, which LiST keeps); 0 = no clipping.
    """

    def __init__(self, model: str = "smollm2-135m-instruct", model_config: dict[str, Any] | None = None,
                 num_hidden_layers: int | None = None, torch_dtype: str = "float32",
                 label_words: list[list[str]] | list[str] | None = None, word_scores: list[list[float]] | None = None,
                 label_word_prefix: str = " ", multi_token: str = "mean", trainable_word_weights: bool = False,
                 pred_temp: float = 1.0, calibration_samples: int = 0, calibration_average: str = "logits",
                 freeze_backbone: bool = False, tokenizer: str | None = None, learning_rate: float = 5e-6,
                 weight_decay: float = 0.0, seed: int = 0, max_grad_norm: float = 1.0) -> None:
        if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)) or not max_grad_norm >= 0:
            raise ValueError(f"SelfTrainingModule: `max_grad_norm` must be a number >= 0 (0 = no clipping), got "
                             f"{max_grad_norm!r}")
        super().__init__(model=model, model_config=model_config, num_hidden_layers=num_hidden_layers,
                         torch_dtype=torch_dtype, label_words=label_words, word_scores=word_scores,
                         label_word_prefix=label_word_prefix, multi_token=multi_token,
                         trainable_word_weights=trainable_word_weights, pred_temp=pred_temp,
                         calibration_samples=calibration_samples, calibration_average=calibration_average,
                         freeze_backbone=freeze_backbone, tokenizer=tokenizer, learning_rate=learning_rate,
                         weight_decay=weight_decay, seed=seed)
        self.max_grad_norm = float(max_grad_norm)
        self.automatic_optimization = False

    # -- the pieces the callback composes ---------------------------------------------------------------------------
    def labelled_loss(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy of the class scores on a labelled batch, and the scores ``[B, C]``."""
        labels = batch.get("labels")
        if labels is None or labels.dim() != 1:
            raise ValueError("SelfTrainingModule: a labelled batch needs `labels` (class ids [batch]); "
                             "FewShotDataModule / ClassificationDataModule provide them")
        scores = self(batch["input_ids"], batch.get("attention_mask"))
        return F.cross_entropy(scores, labels), scores

    def optimizer_step_with(self, loss: torch.Tensor, lr: float | None = None,
                            max_grad_norm: float | None = None) -> None:
        """Backward ``loss``, clip, step and zero the optimizer (at ``lr`` for every group when given)."""
        opt = self.optimizers()
        if lr is not None:
            for group in opt.optimizer.param_groups:
                group["lr"] = float(lr)
        self.manual_backward(loss)
        clip = self.max_grad_norm if max_grad_norm is None else max_grad_norm
        if clip > 0:
            params = [p for g in opt.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _driver(self) -> Any:
        trainer = self._trainer
        for cb in getattr(trainer, "callbacks", []) if trainer is not None else []:
            if callable(getattr(cb, "self_training_step", None)):
                return cb
        return None

    # -- Lightning --------------------------------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        driver = self._driver()
        if driver is not None:
            return driver.self_training_step(self, batch, batch_idx)
        loss, scores = self.labelled_loss(batch)
        self.optimizer_step_with(loss)
        self.log_train_step(loss, scores, batch["labels"])
        return loss.detach()

    def log_train_step(self, loss: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor) -> None:
        """Log a labelled step's ``train/loss`` and ``train/acc``."""
        assert self.train_acc is not None
        self.train_acc(scores.detach().argmax(-1), labels)
        bs = labels.shape[0]
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=bs)
