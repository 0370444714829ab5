"""lit_ft callbacks, addressable from LightningCLI YAML as ``class_path: lit_ft.callbacks.<Name>``."""

from lit_ft.callbacks.token_selection import ExcessLossSelection

__all__ = ["ExcessLossSelection"]
