"""Data-selection family: GOT-D optimal-transport selection, LiST self-training, the LeTI feedback loop, black-box
prompt learning — techniques that choose or re-weight training examples (through the DataModule or
``batch["token_weights"]``) rather than change the loss of a step. Each one runs before (or between) training
passes and hands the Trainer's DataModule the rows to serve: GOT-D at setup (:class:`OTDataSelection`)."""

from lit_ft.callbacks.data_selection.feedback_loop import FeedbackLoop
from lit_ft.callbacks.data_selection.ot_data_selection import OTDataSelection
from lit_ft.callbacks.data_selection.self_training import SelfTraining

__all__ = ["FeedbackLoop", "OTDataSelection", "SelfTraining"]
