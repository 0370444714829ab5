"""Frozen auxiliary models (references, history models, teachers) shared by techniques.

A frozen copy must not drag along what other callbacks attached to the live model (forward hooks, the lit_ft loss
hook and its pipeline): a plain ``deepcopy`` would copy those callbacks and their own models too.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)


def _copy_without_hooks(hf_model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    dropped: list[tuple[str, str]] = []
    for mname, m in hf_model.named_modules():
        for attr in _HOOK_DICTS:
            d = m.__dict__.get(attr)
            if d:
                memo[id(d)] = type(d)()
        for key, value in list(m.__dict__.items()):
            if key.startswith("_lit_ft") or (key == "_loss_function" and type(value).__module__.startswith("lit_ft")):
                memo[id(value)] = None
                dropped.append((mname, key))
    out = copy.deepcopy(hf_model, memo)
    modules = dict(out.named_modules())
    for mname, key in dropped:
        modules[mname].__dict__.pop(key, None)
    return out


def freeze(model: nn.Module, dtype: str = "float32", device: str | torch.device | None = None) -> nn.Module:
    """``model`` in eval mode, no gradients, cast to ``dtype`` (a key of :data:`DTYPES`), optionally moved."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = model.to(dtype=DTYPES[dtype]).eval()
    if device is not None:
        model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(hf_model: nn.Module, dtype: str = "float32", device: str | torch.device | None = None) -> nn.Module:
    """A frozen deep copy of ``hf_model`` without the hooks other callbacks put on it."""
    return freeze(_copy_without_hooks(hf_model), dtype, device)


def load_frozen_causal_lm(name_or_path: str, like: nn.Module, who: str, dtype: str = "float32") -> nn.Module:
    """Load a frozen causal LM from a local folder or ``lit_ft.assets`` name; it must share ``like``'s vocabulary
    (the error names ``who`` — the technique asking — and both vocab sizes)."""
    from transformers import AutoModelForCausalLM

    from lit_ft.assets import resolve

    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path))
    if model.config.vocab_size != like.config.vocab_size:
        raise ValueError(
            f"{who}: model {name_or_path!r} has vocab_size {model.config.vocab_size} but the trained model has "
            f"{like.config.vocab_size}; they must share a tokenizer"
        )
    return freeze(model, dtype)
