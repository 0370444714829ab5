"""Where ExcessLossSelection's reference model comes from: the explicitly named self-reference ``"initial"``, a local
HF folder or ``lit_ft.assets`` name, or a lit-ft/Lightning ``.ckpt`` (e.g. the reference trained by the Rho-1 recipe's
first stage, ``configs/rho1/reference.yaml``), whose weights go into a copy of the trained model's architecture."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from lit_ft.core.frozen import frozen_copy, load_frozen_causal_lm

#: the reserved ``reference`` value for "a frozen copy of the weights when training starts" (not Rho-1)
INITIAL = "initial"


def is_checkpoint(source: str) -> bool:
    """Whether ``source`` names a Lightning checkpoint file (rather than an HF folder or asset name)."""
    return source.endswith(".ckpt")


def _hf_state(state: dict[str, torch.Tensor], model: nn.Module, path: str, who: str) -> dict[str, torch.Tensor]:
    """The entries of a LightningModule's ``state_dict`` that belong to ``model`` (an HF model held somewhere inside
    the module, e.g. as ``model.``): the prefix is found from the keys, not assumed."""
    keys = list(model.state_dict())
    probe = keys[0]
    for full in state:
        if full.endswith(probe):
            prefix = full[: len(full) - len(probe)]
            if all(prefix + k in state for k in keys):
                return {k: state[prefix + k] for k in keys}
    missing = [k for k in keys if not any(s.endswith(k) for s in state)][:3]
    raise ValueError(f"{who}: checkpoint {path!r} does not hold the trained model's weights (no key prefix gives all "
                     f"{len(keys)} of them; e.g. {missing} are missing); the reference .ckpt must come from a run of "
                     "the same architecture")


def load_checkpoint_reference(path: str, like: nn.Module, who: str, dtype: str = "float32") -> nn.Module:
    """A frozen copy of ``like`` (the trained HF model: the architecture) carrying the weights of the checkpoint."""
    p = os.path.expanduser(path)
    if not os.path.isfile(p):
        raise FileNotFoundError(f"{who}: reference={path!r} is not a file (a .ckpt reference is the checkpoint "
                                "of the reference run, e.g. configs/rho1/reference.yaml's runs/rho1/reference.ckpt)")
    ckpt = torch.load(p, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{who}: reference={path!r} holds no state_dict")
    model = frozen_copy(like, dtype)
    model.load_state_dict(_hf_state(state, model, path, who))  # copies cast to the frozen model's dtype
    return model


def load_reference(source: str, like: nn.Module | None, who: str, dtype: str = "float32") -> nn.Module:
    """The frozen reference named by ``source`` (a ``.ckpt`` needs ``like``, the trained model's architecture; an HF
    folder or asset is checked against ``like``'s vocabulary when given)."""
    if is_checkpoint(source):
        if like is None:
            raise ValueError(f"{who}: a .ckpt reference ({source!r}) needs the trained model's architecture")
        return load_checkpoint_reference(source, like, who, dtype)
    if like is None:
        from transformers import AutoModelForCausalLM

        from lit_ft.assets import resolve
        from lit_ft.core.frozen import freeze

        return freeze(AutoModelForCausalLM.from_pretrained(resolve(source)), dtype)
    return load_frozen_causal_lm(source, like, who, dtype)


def reference_factory(source: str, who: str, dtype: str) -> Any:
    """A :class:`lit_ft.core.frozen.FrozenModel` source for ``source``: the string itself for an HF folder / asset
    (FrozenModel loads those), a factory for a ``.ckpt`` (it needs the trained model)."""
    if not is_checkpoint(source):
        return source
    return lambda trained: load_checkpoint_reference(source, trained, who, dtype)
