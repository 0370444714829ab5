"""lit-ft: recent LLM fine-tuning research as drop-in PyTorch Lightning callbacks, mixins and fused kernels.

Public API is imported lazily so that ``import lit_ft`` stays cheap and never imports triton.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "CausalLMModule": "lit_ft.modules",
    "ClassificationModule": "lit_ft.modules",
    "TokenLossMixin": "lit_ft.modules",
    "SFTDataModule": "lit_ft.data",
    "ClassificationDataModule": "lit_ft.data",
    "ExcessLossSelection": "lit_ft.callbacks",
    "fused_linear_token_ce": "lit_ft.kernels",
    "compose_sparse_diffs": "lit_ft.core.sparse_diff",
    "techniques": "lit_ft.callbacks",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lit_ft' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
