"""Gradient tensor selection techniques: which parameter tensors (or elements) train."""

from lit_ft.callbacks.tensor_selection.freeze_layers import FreezeLayers
from lit_ft.callbacks.tensor_selection.green_trainer import GreenTrainer
from lit_ft.callbacks.tensor_selection.layerwise_lr_decay import LayerwiseLRDecay
from lit_ft.callbacks.tensor_selection.localized_tuning import LocalizedTuning
from lit_ft.callbacks.tensor_selection.train_only import TrainOnly

__all__ = ["FreezeLayers", "GreenTrainer", "LayerwiseLRDecay", "LocalizedTuning", "TrainOnly"]
