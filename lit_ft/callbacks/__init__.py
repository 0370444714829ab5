"""lit_ft callbacks, addressable from LightningCLI YAML as ``class_path: lit_ft.callbacks.<Name>``."""

from lit_ft.callbacks.token_selection import ExcessLossSelection
from lit_ft.callbacks.token_selection import KeyTokenWeighting
from lit_ft.callbacks.token_selection import MaskedThought
from lit_ft.callbacks.token_selection import QTuning
from lit_ft.callbacks.token_selection import SSToken

__all__ = ["ExcessLossSelection", "KeyTokenWeighting", "MaskedThought", "QTuning", "SSToken"]
