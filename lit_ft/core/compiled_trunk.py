"""The parts of a causal LM a loss runs, with the trunk compiled when the user compiled the model.

lit_ft's losses never call the HF model itself: they run its trunk for hidden states and the lm_head through a fused
op or a few label-word rows. So ``module.model = torch.compile(module.model)`` alone would compile nothing. Every
loss that runs the trunk takes it from :func:`loss_parts`, which wraps the trunk once in an ``OptimizedModule`` with
the user's own compile context (backend, mode and options), sharing its parameters and hooks.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Any

from torch import nn

from lit_ft.core.introspect import CausalLMParts, causal_lm_parts

__all__ = ["loss_parts", "compiled_wrapper"]

_CACHE = "_lit_ft_compiled_trunks"


def compiled_wrapper(owner: nn.Module, model: nn.Module) -> Any:
    """The ``torch.compile`` wrapper (``OptimizedModule``) of ``model``: ``model`` itself, or the child of ``owner``
    that wraps it (``find_hf_model`` returns the inner model). ``None`` when nothing is compiled."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:  # torch.compile was never called (and importing dynamo here would cost seconds)
        return None
    OptimizedModule = eval_frame.OptimizedModule  # noqa: N806
    if isinstance(model, OptimizedModule):
        return model
    for child in owner.children():
        if isinstance(child, OptimizedModule) and child._orig_mod is model:
            return child
    return None


def loss_parts(owner: nn.Module, model: nn.Module) -> CausalLMParts:
    """:func:`lit_ft.core.introspect.causal_lm_parts` of ``model`` (a child of the LightningModule ``owner``, or
    its compiled wrapper), with the trunk compiled like the model when the user compiled it."""
    compiled = compiled_wrapper(owner, model)
    parts = causal_lm_parts(model if compiled is None else compiled._orig_mod)
    if compiled is None:
        return parts
    return replace(parts, base=_compiled_trunk(owner, compiled, parts.base))


def _compiled_trunk(owner: nn.Module, compiled_model: Any, base: nn.Module) -> nn.Module:
    """``base`` wrapped once in an ``OptimizedModule`` with ``compiled_model``'s compile context. Kept in the
    owner's ``__dict__`` (not a submodule: no duplicate parameters or state-dict keys)."""
    from torch._dynamo.eval_frame import OptimizedModule

    cache = owner.__dict__.setdefault(_CACHE, {})
    hit = cache.get(id(base))
    if hit is not None and hit[0] is base and hit[1] is compiled_model:
        return hit[2]
    trunk = OptimizedModule(base, compiled_model.dynamo_ctx)
    cache[id(base)] = (base, compiled_model, trunk)
    return trunk
