"""lit_ft.core.layer_hooks: one ordered hook chain per decoder-layer list."""

import pytest
import torch
from torch import nn

from lit_ft.core.frozen import frozen_copy
from lit_ft.core.layer_hooks import (
    ORDER_ELIMINATE,
    ORDER_PREFIX,
    ORDER_READ,
    ORDER_REWRITE,
    layer_hooks_for,
    register_layer_hook,
    register_layer_pre_hook,
)
from lit_ft.core.introspect import ModelLayoutError

from helpers import tiny_hf_model


class _Layer(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.tensor(factor))

    def forward(self, hidden_states, shift=0.0):
        return hidden_states * self.factor + shift


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_Layer(2.0), _Layer(3.0), _Layer(5.0)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x, shift=0.0)
        return x


class _Toy(nn.Module):
    """Found by lit_ft.core.introspect like an HF model: trunk at ``.model``, layers at ``.model.layers``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _Trunk()

    def forward(self, x):
        return self.model(x)


def _no_module_hooks(model) -> bool:
    return all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in model.model.layers)


def test_order_then_registration_order_on_every_layer():
    model = _Toy()
    calls = []

    def recorder(name):
        return lambda i, m, a, k: calls.append((i, name))

    register_layer_pre_hook(model, recorder("eliminate"), order=ORDER_ELIMINATE)
    register_layer_pre_hook(model, recorder("read"), order=ORDER_READ)
    register_layer_pre_hook(model, recorder("prefix"), order=ORDER_PREFIX)
    register_layer_pre_hook(model, recorder("read-2"), order=ORDER_READ)  # same band: registration order
    register_layer_pre_hook(model, recorder("rewrite"), order=ORDER_REWRITE)
    model(torch.ones(2))
    names = ["rewrite", "prefix", "read", "read-2", "eliminate"]
    assert calls == [(i, n) for i in range(3) for n in names]
    assert ORDER_REWRITE < ORDER_PREFIX < ORDER_READ < ORDER_ELIMINATE


def test_modifications_chain_through_args_and_kwargs():
    model = _Toy()
    seen = []

    def double_input(i, m, args, kwargs):
        return (args[0] * 2,), kwargs

    def shift_by_one(i, m, args, kwargs):
        return args, {**kwargs, "shift": kwargs["shift"] + 1.0}

    def read(i, m, args, kwargs):
        seen.append((i, args[0].clone(), kwargs["shift"]))

    register_layer_pre_hook(model, read, order=ORDER_READ, layers=[-1])  # last layer only
    register_layer_pre_hook(model, double_input, order=ORDER_REWRITE, layers=[0])
    register_layer_pre_hook(model, shift_by_one, order=ORDER_PREFIX)
    out = model(torch.ones(1))
    # layer 0: (1*2)*2 + 1 = 5; layer 1: 5*3 + 1 = 16; layer 2 (read sees its modified input): 16*5 + 1 = 81
    assert seen == [(2, torch.tensor([16.0]), 1.0)]
    assert torch.equal(out, torch.tensor([81.0]))


def test_forward_hook_chain_replaces_outputs_in_order():
    model = _Toy()
    register_layer_hook(model, lambda i, m, a, k, out: out - 1.0, order=ORDER_READ, layers=[0])
    register_layer_hook(model, lambda i, m, a, k, out: out * 10.0, order=ORDER_PREFIX, layers=[0])
    register_layer_hook(model, lambda i, m, a, k, out: None, order=ORDER_ELIMINATE)  # None: output unchanged
    # layer 0: 1*2 -> *10 -> -1 = 19; then *3*5
    assert torch.equal(model(torch.ones(1)), torch.tensor([19.0 * 15.0]))


def test_handles_remove_entries_and_the_last_removes_the_layer_hooks():
    model = _Toy()
    calls = []
    h1 = register_layer_pre_hook(model, lambda i, m, a, k: calls.append("a"), order=ORDER_READ, layers=[0])
    h2 = register_layer_pre_hook(model, lambda i, m, a, k: calls.append("b"), order=ORDER_READ, layers=[0])
    h3 = register_layer_hook(model, lambda i, m, a, k, o: calls.append("post"), order=ORDER_READ, layers=[0])
    assert all(len(layer._forward_pre_hooks) == 1 for layer in model.model.layers)  # one dispatcher per layer
    h1.remove()
    h1.remove()  # idempotent
    model(torch.ones(1))
    assert calls == ["b", "post"]
    h3.remove()
    assert all(not layer._forward_hooks for layer in model.model.layers)  # the post chain went with its last entry
    assert all(len(layer._forward_pre_hooks) == 1 for layer in model.model.layers)
    h2.remove()
    assert _no_module_hooks(model) and layer_hooks_for(model, create=False) is None
    calls.clear()
    model(torch.ones(1))
    assert calls == []

    registry = layer_hooks_for(model)  # an emptied registry kept by a caller is re-attached on its next use
    registry.add_pre_hook(lambda i, m, a, k: calls.append("again"), order=0, layers=[1]).remove()
    h = registry.add_pre_hook(lambda i, m, a, k: calls.append("again"), order=0, layers=[1])
    assert layer_hooks_for(model, create=False) is registry
    model(torch.ones(1))
    assert calls == ["again"]
    h.remove()


def test_a_callable_may_remove_its_own_registration_while_running():
    model = _Toy()
    calls = []
    handle = None

    def once(i, m, a, k):
        calls.append(i)
        handle.remove()

    handle = register_layer_pre_hook(model, once, order=ORDER_READ)
    model(torch.ones(1))
    assert calls == [0] and _no_module_hooks(model)


def test_two_owners_on_two_models_do_not_mix():
    a, b = _Toy(), _Toy()
    calls = []
    ha = register_layer_pre_hook(a, lambda i, m, ar, k: calls.append(("a", i)), order=ORDER_READ, layers=[1])
    hb = register_layer_pre_hook(b, lambda i, m, ar, k: calls.append(("b", i)), order=ORDER_READ, layers=[2])
    assert layer_hooks_for(a) is not layer_hooks_for(b)
    a(torch.ones(1))
    b(torch.ones(1))
    assert calls == [("a", 1), ("b", 2)]
    ha.remove()
    assert _no_module_hooks(a) and not _no_module_hooks(b)
    hb.remove()


def test_frozen_copy_carries_neither_the_registry_nor_its_hooks():
    model = tiny_hf_model()
    calls = []
    h = register_layer_pre_hook(model, lambda i, m, a, k: calls.append(i), order=ORDER_READ)
    copy = frozen_copy(model)
    assert layer_hooks_for(copy, create=False) is None
    assert all(not layer._forward_pre_hooks for layer in copy.model.layers)
    ids = torch.randint(3, 100, (1, 6))
    copy(input_ids=ids)
    assert calls == []
    model(input_ids=ids)
    assert calls == list(range(len(model.model.layers)))  # a real HF decoder stack calls every layer's chain
    h.remove()


def test_bad_registrations_name_the_argument_and_range():
    model = _Toy()
    with pytest.raises(ValueError, match="layer index must be an int in \\[-3, 2\\] \\(3 decoder layers\\), got 3"):
        register_layer_pre_hook(model, lambda *a: None, order=ORDER_READ, layers=[3])
    with pytest.raises(ValueError, match="order must be an int .*got 1.5"):
        register_layer_pre_hook(model, lambda *a: None, order=1.5)
    with pytest.raises(TypeError, match="layer hook must be callable"):
        register_layer_hook(model, "not callable", order=ORDER_READ)
    assert _no_module_hooks(model)
    with pytest.raises(ModelLayoutError):
        register_layer_pre_hook(nn.Linear(2, 2), lambda *a: None, order=ORDER_READ)


def test_trunk_hooks_order_around_the_prompt_injector():
    """The prompt injector is on the trunk's owner in the rewrite band: a later trunk pre-hook sees the prompt
    prepended (embeddings n + T long); a trunk hook ordered before it sees the trunk output with the prompt
    positions, one ordered after it the stripped output (T long). Removing the prompt removes its hooks only."""
    from lit_ft.callbacks.prompt.prompt_tuning import PromptEmbedding
    from lit_ft.core.introspect import find_base_model
    from lit_ft.core.layer_hooks import register_trunk_hook, register_trunk_pre_hook, trunk_hooks_for
    from lit_ft.core.prompts import attach_prompt, model_geometry

    model = tiny_hf_model()
    n, T = 3, 7
    injector = attach_prompt(model, PromptEmbedding(model_geometry(model), n))
    base = find_base_model(model)
    seen = {}

    def pre(i, m, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].shape[1] if kwargs.get("inputs_embeds") is not None else None

    def before_strip(i, m, args, kwargs, out):
        seen["before"] = out[0].shape[1] if isinstance(out, tuple) else out.last_hidden_state.shape[1]

    def after_strip(i, m, args, kwargs, out):
        seen["after"] = out[0].shape[1] if isinstance(out, tuple) else out.last_hidden_state.shape[1]

    handles = [register_trunk_pre_hook(base, pre, order=ORDER_READ),
               register_trunk_hook(base, before_strip, order=ORDER_REWRITE - 1),
               register_trunk_hook(base, after_strip, order=ORDER_READ)]
    with torch.no_grad():
        model(input_ids=torch.randint(3, 100, (2, T)))
    assert seen == {"embeds": n + T, "before": n + T, "after": T}
    injector.remove()
    registry = trunk_hooks_for(base, create=False)
    assert registry is not None and len(registry._entries["pre"]) == 1 and len(registry._entries["post"]) == 2
    for h in handles:
        h.remove()
    assert trunk_hooks_for(base, create=False) is None and not base._forward_pre_hooks and not base._forward_hooks
