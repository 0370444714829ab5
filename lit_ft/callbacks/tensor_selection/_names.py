"""Map model parts (modules found with :mod:`lit_ft.core.introspect`) to the LightningModule's own parameter names.

Parameter plans are keyed by ``pl_module.named_parameters()`` names (``model.model.layers.0.mlp.down_proj.weight``
for lit_ft's CausalLMModule, ``model.base_model.model.model.layers...`` under PEFT). Techniques find modules by
structure and translate them to names by object identity here, so that no prefix is ever hard-coded.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lit_ft.core.params import FROZEN, TRAINABLE, ParamPlan


def param_names_by_id(root: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` for every parameter of ``root`` (tied tensors: their first, canonical name)."""
    return {id(p): n for n, p in root.named_parameters()}


def module_param_names(root: nn.Module, modules: Iterable[nn.Module], owner: str = "lit_ft") -> list[str]:
    """Canonical names (as ``root.named_parameters()`` spells them, in that order) of every parameter of
    ``modules`` (recursively). Tied tensors appear once.

    Raises:
        ValueError: a module's parameter is not a parameter of ``root`` (the module lives outside it).
    """
    by_id = param_names_by_id(root)
    order = {n: i for i, n in enumerate(by_id.values())}
    names: set[str] = set()
    for m in modules:
        for p in m.parameters():
            n = by_id.get(id(p))
            if n is None:
                raise ValueError(
                    f"{owner}: a parameter of {type(m).__name__} (shape {tuple(p.shape)}) is not a parameter of "
                    f"{type(root).__name__}; the model part must be registered inside the LightningModule."
                )
            names.add(n)
    return sorted(names, key=order.__getitem__)


def selection_plan(
    pl_module: nn.Module, names: list[str], baseline: ParamPlan, owner: str, required: bool, what: str,
    hint: str = "",
) -> tuple[ParamPlan, list[str]]:
    """Plan that trains ``names`` minus what the user's module already froze (``baseline``) and freezes every
    other tensor; returns it with the names it trains. Raises if nothing would train."""
    keep = [n for n in names if n not in baseline or baseline[n].trainable]
    if not keep:
        raise ValueError(
            f"{owner}: {what} selects {len(names)} tensor(s) ({names[:4]}{' ...' if len(names) > 4 else ''}), but "
            f"your LightningModule froze all of them (requires_grad=False before training, e.g. PEFT's frozen base "
            f"weights), so nothing would train. {owner} never unfreezes what your module froze; {hint}"
        )
    keep_set = set(keep)
    entries = {n: (TRAINABLE if n in keep_set else FROZEN) for n, _ in pl_module.named_parameters()}
    return ParamPlan(entries, owner, required=keep if required else ()), keep
