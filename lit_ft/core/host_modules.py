"""Modules a technique adds to the LightningModule (prompt sources, adapter sets) live in a ``ModuleDict`` attribute
of the module (``lit_ft_prompts``, ``lit_ft_adapters``): they move with ``.to()``, are in ``state_dict()`` (Lightning
checkpoints and resume) and in ``parameters()`` (the optimizer, DDP)."""

from __future__ import annotations

from torch import nn


def register_child(host: nn.Module, attr: str, name: str, module: nn.Module, error: type[Exception],
                   what: str) -> None:
    """Put ``module`` at ``host.<attr>[name]`` (the ``ModuleDict`` created on first use); ``error`` (naming ``what``)
    when another module already holds that name."""
    store = getattr(host, attr, None)
    if store is None:
        store = nn.ModuleDict()
        setattr(host, attr, store)
    if name in store and store[name] is not module:
        raise error(f"{what} named {name!r} is already installed on {type(host).__name__}")
    store[name] = module


def unregister_child(host: nn.Module, attr: str, name: str) -> None:
    """Remove ``host.<attr>[name]`` (and the ``ModuleDict`` once empty)."""
    store = getattr(host, attr, None)
    if store is not None and name in store:
        del store[name]
        if not len(store):
            delattr(host, attr)
