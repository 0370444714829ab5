"""One owner of the decoder-layer hooks of a model, so techniques that hook the same layers run in a defined order.

Several techniques act at the input of decoder layers: IAPT builds each layer's prefix from that layer's input,
SSToken captures one layer's input to recompute its attention, TokenElimination (LeMo) runs each layer on its
kept tokens only. Registered separately on the layers, their order would be the order their callbacks happened to run
``setup``. Instead, one :class:`LayerHooks` per decoder-layer list (found with
:func:`lit_ft.core.introspect.find_decoder_layers`) installs one forward pre-hook (and, only while someone needs
it, one forward hook) on every layer and dispatches to the registered callables by ``order``, then registration
order. Each callable may return modified ``(args, kwargs)`` (pre-hooks) or a modified output (forward hooks); the
next callable sees the modification. Registration returns a handle with ``.remove()``; the layers' own hooks are
removed when the last registration of their kind goes, and the registry itself when nothing is registered.

Order bands (lower runs first; leave gaps so a technique can sit between two bands):

======================  =====  ==================================================================================
band                    value  who, and why there
======================  =====  ==================================================================================
``ORDER_REWRITE``       100    rewrite a layer's input before anything reads it (per-layer prompt injection into
                               the hidden states). Nothing uses it yet.
``ORDER_PREFIX``        200    per-layer prefix makers: compute the layer's prompt from its input (IAPT writes
                               its prefix keys/values into the cache). After rewriters: the prefix is made from
                               the input the layer will really see.
``ORDER_READ``          300    readers that observe the layer input (SSToken's attention capture). After the
                               writers, so they read what the layer computes on.
``ORDER_ELIMINATE``     400    token eliminators (TokenElimination): the pre-hook gathers the kept rows, the
                               forward hook merges the layer's output rows back. Last: every reader and prefix
                               maker at this layer still sees the full sequence; a forward hook registered in a
                               lower band sees the compacted output, one in a higher band the merged one.
======================  =====  ==================================================================================

The decoder *trunk* (``find_base_model``: embeddings, the layer stack, the final norm) has an owner of the same
kind (:func:`trunk_hooks_for`, :func:`register_trunk_pre_hook`, :func:`register_trunk_hook`; index 0 is the trunk),
with the same bands. The :class:`~lit_ft.core.prompts.PromptInjector` registers there at ``ORDER_REWRITE``: it
prepends the prompt to the trunk's inputs (embeddings, mask, positions, cache) before any layer runs and strips the
prompt positions from the trunk's outputs after the last, so it brackets every layer hook; a technique that must
see the trunk's output before the prompt is stripped registers a trunk hook with a lower order than it, one that
must see the stripped output a higher one.

The registry lives in the layer list's ``__dict__`` under a ``_lit_ft`` key, so :func:`lit_ft.core.frozen.frozen_copy`
(which drops hooks and ``_lit_ft`` attributes) gives frozen copies without it, and wrappers of one model (PEFT)
that reach the same layer list share one registry.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from torch import nn

from lit_ft.core.introspect import find_decoder_layers

__all__ = [
    "ORDER_REWRITE", "ORDER_PREFIX", "ORDER_READ", "ORDER_ELIMINATE", "LayerHooks", "LayerHookHandle",
    "layer_hooks_for", "register_layer_pre_hook", "register_layer_hook", "trunk_hooks_for", "register_trunk_pre_hook",
    "register_trunk_hook",
]

ORDER_REWRITE = 100
ORDER_PREFIX = 200
ORDER_READ = 300
ORDER_ELIMINATE = 400

#: ``fn(layer_index, layer, args, kwargs) -> (args, kwargs) | None``
PreHook = Callable[[int, nn.Module, tuple, dict], "tuple[tuple, dict] | None"]
#: ``fn(layer_index, layer, args, kwargs, output) -> output | None``
PostHook = Callable[[int, nn.Module, tuple, dict, Any], Any]

_ATTR = "_lit_ft_layer_hooks"
_TRUNK_ATTR = "_lit_ft_trunk_hooks"
_PRE, _POST = "pre", "post"


@dataclass
class _Entry:
    fn: Callable[..., Any]
    order: int
    seq: int
    layers: frozenset[int] | None  # None = every layer


class LayerHookHandle:
    """Returned by a registration; :meth:`remove` unregisters (idempotent)."""

    def __init__(self, registry: LayerHooks, kind: str, entry: _Entry) -> None:
        self._registry: LayerHooks | None = registry
        self._kind = kind
        self._entry = entry

    def remove(self) -> None:
        if self._registry is not None:
            self._registry._remove(self._kind, self._entry)
            self._registry = None


class LayerHooks:
    """The hook registry of one decoder-layer list (get it with :func:`layer_hooks_for`)."""

    def __init__(self, layers: nn.ModuleList | list[nn.Module], host: nn.Module | None = None,
                 attr: str = _ATTR) -> None:
        self.layers = layers
        #: the module whose ``__dict__`` holds this registry (the layer list itself, or the trunk)
        self.host = layers if host is None else host
        self.attr = attr
        self._entries: dict[str, list[_Entry]] = {_PRE: [], _POST: []}
        self._installed: dict[str, list[Any]] = {_PRE: [], _POST: []}
        self._seq = itertools.count()

    def add_pre_hook(self, fn: PreHook, *, order: int, layers: Iterable[int] | None = None) -> LayerHookHandle:
        """Call ``fn(index, layer, args, kwargs)`` before each selected layer's forward (``layers``: indices into
        the layer list, negative counting from the end; ``None`` = all). Returning ``(args, kwargs)`` replaces the
        layer's inputs for the callables after it and for the layer."""
        return self._add(_PRE, fn, order, layers)

    def add_hook(self, fn: PostHook, *, order: int, layers: Iterable[int] | None = None) -> LayerHookHandle:
        """Call ``fn(index, layer, args, kwargs, output)`` after each selected layer's forward; returning a value
        replaces the output for the callables after it and for the caller."""
        return self._add(_POST, fn, order, layers)

    @property
    def empty(self) -> bool:
        return not (self._entries[_PRE] or self._entries[_POST])

    # -- registration ----------------------------------------------------------------------------------------------
    def _add(self, kind: str, fn: Callable[..., Any], order: int, layers: Iterable[int] | None) -> LayerHookHandle:
        if not callable(fn):
            raise TypeError(f"layer hook must be callable, got {type(fn).__name__}")
        if isinstance(order, bool) or not isinstance(order, int):
            raise ValueError(f"order must be an int (see the ORDER_* bands in lit_ft.core.layer_hooks), got {order!r}")
        attached = self.host.__dict__.setdefault(self.attr, self)  # re-attach a registry emptied and detached before
        if attached is not self:  # ... unless a new one took its place: one registry per layer list
            return attached._add(kind, fn, order, layers)
        selected = None if layers is None else frozenset(self._index(i) for i in layers)
        entry = _Entry(fn, order, next(self._seq), selected)
        entries = self._entries[kind]
        entries.append(entry)
        entries.sort(key=lambda e: (e.order, e.seq))
        if not self._installed[kind]:
            self._install(kind)
        return LayerHookHandle(self, kind, entry)

    def _index(self, i: int) -> int:
        n = len(self.layers)
        if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
            raise ValueError(f"layer index must be an int in [-{n}, {n - 1}] ({n} decoder layers), got {i!r}")
        return i % n

    def _remove(self, kind: str, entry: _Entry) -> None:
        entries = self._entries[kind]
        if entry in entries:
            entries.remove(entry)
        if not entries:
            for h in self._installed[kind]:
                h.remove()
            self._installed[kind] = []
        if self.empty and self.host.__dict__.get(self.attr) is self:
            del self.host.__dict__[self.attr]

    def _install(self, kind: str) -> None:
        for i, layer in enumerate(self.layers):
            if kind == _PRE:
                h = layer.register_forward_pre_hook(self._pre_dispatcher(i), with_kwargs=True)
            else:
                h = layer.register_forward_hook(self._post_dispatcher(i), with_kwargs=True)
            self._installed[kind].append(h)

    # -- dispatch --------------------------------------------------------------------------------------------------
    def _pre_dispatcher(self, index: int) -> Callable[..., Any]:
        def dispatch(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            changed = False
            for e in tuple(self._entries[_PRE]):  # a callable may remove its own registration
                if e.layers is not None and index not in e.layers:
                    continue
                out = e.fn(index, module, args, kwargs)
                if out is not None:
                    args, kwargs = out
                    changed = True
            return (args, kwargs) if changed else None

        return dispatch

    def _post_dispatcher(self, index: int) -> Callable[..., Any]:
        def dispatch(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            changed = False
            for e in tuple(self._entries[_POST]):
                if e.layers is not None and index not in e.layers:
                    continue
                out = e.fn(index, module, args, kwargs, output)
                if out is not None:
                    output = out
                    changed = True
            return output if changed else None

        return dispatch


def layer_hooks_for(model: nn.Module, create: bool = True) -> LayerHooks | None:
    """The :class:`LayerHooks` of ``model``'s decoder layers (created on first use; ``None`` if absent and not
    ``create``). Raises :class:`~lit_ft.core.introspect.ModelLayoutError` when the model has no layer list."""
    layers = find_decoder_layers(model)
    registry = layers.__dict__.get(_ATTR)
    if registry is None and create:
        registry = LayerHooks(layers)
        layers.__dict__[_ATTR] = registry
    return registry


def register_layer_pre_hook(model: nn.Module, fn: PreHook, *, order: int,
                            layers: Iterable[int] | None = None) -> LayerHookHandle:
    """:meth:`LayerHooks.add_pre_hook` on ``model``'s registry."""
    registry = layer_hooks_for(model)
    assert registry is not None
    return registry.add_pre_hook(fn, order=order, layers=layers)


def register_layer_hook(model: nn.Module, fn: PostHook, *, order: int,
                        layers: Iterable[int] | None = None) -> LayerHookHandle:
    """:meth:`LayerHooks.add_hook` on ``model``'s registry."""
    registry = layer_hooks_for(model)
    assert registry is not None
    return registry.add_hook(fn, order=order, layers=layers)


def trunk_hooks_for(base: nn.Module, create: bool = True) -> LayerHooks | None:
    """The hook registry of a decoder trunk ``base`` (the module :func:`lit_ft.core.introspect.find_base_model`
    returns); it has one "layer", index 0: the trunk itself."""
    registry = base.__dict__.get(_TRUNK_ATTR)
    if registry is None and create:
        registry = LayerHooks([base], host=base, attr=_TRUNK_ATTR)
        base.__dict__[_TRUNK_ATTR] = registry
    return registry


def register_trunk_pre_hook(base: nn.Module, fn: PreHook, *, order: int) -> LayerHookHandle:
    """``fn(0, base, args, kwargs) -> (args, kwargs) | None`` before the trunk's forward, in ``order``."""
    registry = trunk_hooks_for(base)
    assert registry is not None
    return registry.add_pre_hook(fn, order=order)


def register_trunk_hook(base: nn.Module, fn: PostHook, *, order: int) -> LayerHookHandle:
    """``fn(0, base, args, kwargs, output) -> output | None`` after the trunk's forward, in ``order``."""
    registry = trunk_hooks_for(base)
    assert registry is not None
    return registry.add_hook(fn, order=order)
