"""Gradient tensor selection techniques: which parameter tensors (or elements) train."""

from lit_ft.callbacks.tensor_selection.localized_tuning import LocalizedTuning
from lit_ft.callbacks.tensor_selection.train_only import TrainOnly

__all__ = ["LocalizedTuning", "TrainOnly"]
