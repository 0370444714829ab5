"""Token selection / weighting techniques."""

from lit_ft.callbacks.token_selection.excess_loss import ExcessLossSelection

__all__ = ["ExcessLossSelection"]
