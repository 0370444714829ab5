"""Token selection / weighting techniques."""

from lit_ft.callbacks.token_selection.excess_loss import ExcessLossSelection
from lit_ft.callbacks.token_selection.key_token_weighting import KeyTokenWeighting
from lit_ft.callbacks.token_selection.masked_thought import MaskedThought
from lit_ft.callbacks.token_selection.qtuning import QTuning
from lit_ft.callbacks.token_selection.sstoken import SSToken
from lit_ft.callbacks.token_selection.token_elimination import TokenElimination

__all__ = ["ExcessLossSelection", "KeyTokenWeighting", "MaskedThought", "QTuning", "SSToken", "TokenElimination"]
