"""A PEFT adapter (LoRA, IA3, ...) from a plain config dict, so a YAML/LightningCLI user gets a PEFT model without code.

``CausalLMModule(peft={...})`` and ``ClassificationModule(peft={...})`` call :func:`apply_peft` right after the model
is built: the dict becomes a ``peft`` config (``peft.get_peft_config``), ``peft.get_peft_model`` wraps the model
(base weights frozen, adapters trainable) and the modules' optimizers take the ``requires_grad`` tensors only.
``peft`` is an optional extra (``pip install 'lit-ft[peft]'``).
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from torch import nn

EXTRA_HINT = "install it: pip install 'lit-ft[peft]' (or pip install peft)"


def _import_peft(owner: str) -> Any:
    try:
        import peft
    except ImportError:
        raise ImportError(f"{owner}: peft=... needs the `peft` library; {EXTRA_HINT}") from None
    return peft


def build_peft_config(spec: Mapping[str, Any], owner: str, task_type: str) -> Any:
    """The ``peft`` config of ``spec`` (``{"peft_type": "LORA", "r": 8, ...}``), ``task_type`` filled in.

    Errors name the key: a missing or unknown ``peft_type``, a ``task_type`` other than the module's, a key the
    config class does not have (with the closest names), a value the config refuses, and a prompt-learning type
    (its virtual tokens would not reach lit_ft's fused loss; lit_ft's prompt callbacks do that instead).
    """
    if not isinstance(spec, Mapping):
        raise ValueError(f"{owner}: peft must be a dict such as {{'peft_type': 'LORA', 'r': 8, 'lora_alpha': 16, "
                         f"'target_modules': ['q_proj', 'v_proj']}} or null, got {type(spec).__name__} {spec!r:.200}")
    peft = _import_peft(owner)
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    cfg = {str(k): v for k, v in spec.items()}
    kind = cfg.get("peft_type")
    if not isinstance(kind, str) or kind.upper() not in PEFT_TYPE_TO_CONFIG_MAPPING:
        raise ValueError(f"{owner}: peft['peft_type'] must be one of {sorted(str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING)}"
                         f" (e.g. 'LORA'), got {kind!r}")
    cfg["peft_type"] = kind.upper()
    given_task = cfg.setdefault("task_type", task_type)
    if str(given_task).upper() != task_type:
        raise ValueError(f"{owner}: peft['task_type'] must be {task_type!r} for this module (or left out), "
                         f"got {given_task!r}")
    cfg["task_type"] = task_type
    cls = PEFT_TYPE_TO_CONFIG_MAPPING[cfg["peft_type"]]
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in cfg:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ValueError(f"{owner}: peft[{key!r}] is not an argument of peft.{cls.__name__} "
                             f"(peft_type={cfg['peft_type']!r}){hint}")
    try:
        config = peft.get_peft_config(cfg)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{owner}: peft={dict(spec)!r} is refused by peft.{cls.__name__}: {e}") from None
    if config.is_prompt_learning:
        raise ValueError(f"{owner}: peft['peft_type']={cfg['peft_type']!r} is a prompt-learning method; its virtual "
                         "tokens would bypass lit_ft's fused loss. Use lit_ft's prompt callbacks instead "
                         "(lit_ft.callbacks.PromptTuning, PrefixTuning, ...; `lit-ft techniques`)")
    return config


def apply_peft(model: nn.Module, spec: Mapping[str, Any], owner: str, task_type: str) -> nn.Module:
    """``peft.get_peft_model(model, build_peft_config(spec))``; an adapter target missing from the model is refused
    with ``peft['target_modules']`` named."""
    peft = _import_peft(owner)
    config = build_peft_config(spec, owner, task_type)
    try:
        return peft.get_peft_model(model, config)
    except ValueError as e:
        where = "peft['target_modules']" if "target" in str(e).lower() else "peft"
        raise ValueError(f"{owner}: {where} does not fit the model ({type(model).__name__}): {e}") from None


def trainable_summary(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts — the fraction a PEFT adapter trains."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def describe_trainable(model: nn.Module, owner: str, spec: Mapping[str, Any]) -> str:
    """One line for the log: the adapter type and the trainable share of the parameters."""
    trainable, total = trainable_summary(model)
    return (f"{owner}: PEFT {str(spec.get('peft_type')).upper()} adapter: {trainable:,} of {total:,} parameters "
            f"trainable ({100.0 * trainable / max(total, 1):.2f}%)")
