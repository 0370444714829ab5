"""The pre-trained branch of a fine-tuned model, one decoder layer at a time (TuCo's f_PT).

TuCo (and the fine-tuning-component scaling of the same paper) need, at every decoder layer ``l`` of the fine-tuned
model, the *pre-trained* layer applied to the fine-tuned residual stream ``x_l``. Two ways to get it:

- :class:`AdapterDisabledBranch` (PEFT: LoRA, IA3, ... injected into the layers): the same layer with its adapters
  switched off for that one call — no second copy of the model.
- :class:`CopyBranch` (full fine-tuning): layer ``l`` of a separate pre-trained model (a frozen copy of the weights
  training started from, or a loaded pre-trained checkpoint).

Either way the layer is called with the positional and keyword arguments the fine-tuned layer received (attention
mask, RoPE position embeddings, position ids), captured by a forward hook, so the two branches see exactly the same
context. A KV cache is refused: calling a layer twice would append its keys/values to the cache twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
from torch import nn

from lit_ft.core.introspect import find_decoder_layers, find_hf_model
from lit_ft.core.layer_hooks import ORDER_REWRITE, register_layer_hook

__all__ = [
    "AdapterDisabledBranch", "CopyBranch", "PreTrainedBranch", "adapter_layers", "layer_input", "layer_output_tensor",
    "make_branch", "scale_fine_tuning_component",
]

#: the keyword names decoder layers take a KV cache under (transformers 4.x / 5.x, GPT-2 style)
_CACHE_KEYS = ("cache", "past_key_values", "past_key_value", "layer_past")


class PreTrainedBranch(Protocol):
    """``layer_output(index, layer, args, kwargs)``: the pre-trained layer ``index``'s output (a tensor, the new
    residual stream) on the fine-tuned layer's inputs ``args`` / ``kwargs``."""

    def layer_output(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor: ...


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    """The residual stream a decoder layer was called with (first positional argument, or ``hidden_states=``)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise TypeError("decoder layer called without a hidden-states tensor (neither args[0] nor hidden_states=)")
    return x


def layer_output_tensor(output: Any) -> torch.Tensor:
    """The new residual stream in a decoder layer's output (a tensor in transformers 5, ``output[0]`` before)."""
    return output if isinstance(output, torch.Tensor) else output[0]


def _replace_output(output: Any, hidden: torch.Tensor) -> Any:
    if isinstance(output, torch.Tensor):
        return hidden
    return (hidden, *output[1:])


def _without_cache(kwargs: dict) -> dict:
    """``kwargs`` for a second call of a layer: refuse a live KV cache, switch caching off."""
    for key in _CACHE_KEYS:
        if kwargs.get(key) is not None:
            raise ValueError(
                f"the pre-trained branch of a decoder layer cannot run with a KV cache (the layer received {key}=...): "
                "calling the layer twice would store its keys/values twice. Run the model with use_cache=False "
                "(generate(..., use_cache=False))"
            )
    out = dict(kwargs)
    if "use_cache" in out:
        out["use_cache"] = False
    return out


def adapter_layers(module: nn.Module) -> list[nn.Module]:
    """The PEFT tuner layers (LoRA, IA3, ... ``BaseTunerLayer``) inside ``module``."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


class AdapterDisabledBranch:
    """f_PT = the same decoder layer with its PEFT adapters switched off for one call (no second model copy).

    The adapters are switched through the tuner layers' ``_disable_adapters`` flag, which is what their forward
    reads: ``enable_adapters(True)`` (what PEFT's ``disable_adapter()`` context calls on exit) would also set
    ``requires_grad`` on every active adapter, un-freezing adapters the user froze. Merged adapters are refused:
    disabling them makes PEFT un-merge the weights in place.
    """

    def __init__(self) -> None:
        self._tuners: dict[int, list[nn.Module]] = {}

    def _tuners_of(self, index: int, layer: nn.Module) -> list[nn.Module]:
        tuners = self._tuners.get(id(layer))
        if tuners is None:
            tuners = adapter_layers(layer)
            if not tuners:
                raise ValueError(
                    f"decoder layer {index} ({type(layer).__name__}) has no PEFT adapter layer: the adapter-disabled "
                    "pre-trained branch needs adapters injected into the decoder layers (LoRA, IA3, ...); for full "
                    "fine-tuning use a copy of the pre-trained model"
                )
            merged = [type(m).__name__ for m in tuners if getattr(m, "merged", False)]
            if merged:
                raise ValueError(
                    f"decoder layer {index} has merged adapters ({merged[0]}): switching them off would un-merge "
                    "the weights in place. Unmerge them (model.unmerge_adapter()) or compare against a copy of the "
                    "pre-trained model"
                )
            self._tuners[id(layer)] = tuners
        return tuners

    def layer_output(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        tuners = self._tuners_of(index, layer)
        before = [m._disable_adapters for m in tuners]
        try:
            for m in tuners:
                m._disable_adapters = True
            # .forward, not __call__: the layer's own hooks (ours included) must not run for the second call
            out = layer.forward(*args, **_without_cache(kwargs))
        finally:
            for m, flag in zip(tuners, before):
                m._disable_adapters = flag
        return layer_output_tensor(out)


def _cast(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype) if value.is_floating_point() else value.to(device)
    if isinstance(value, tuple):
        return tuple(_cast(v, device, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, device, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, device, dtype) for k, v in value.items()}
    return value


class CopyBranch:
    """f_PT = decoder layer ``l`` of a separate pre-trained model (full fine-tuning), run on the fine-tuned stream.

    Floating-point inputs are cast to the copy's dtype and device (a float32 copy of a bfloat16 run, an offloaded
    copy), the output back to the fine-tuned stream's.
    """

    def __init__(self, pre_trained: nn.Module) -> None:
        self.layers = find_decoder_layers(find_hf_model(pre_trained))

    def layer_output(self, index: int, layer: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        if index >= len(self.layers):
            raise ValueError(f"the pre-trained model has {len(self.layers)} decoder layers, the fine-tuned model at "
                             f"least {index + 1}: they must have the same architecture")
        pt_layer = self.layers[index]
        ref = next(pt_layer.parameters())
        x = layer_input(args, kwargs)
        out = pt_layer(*_cast(args, ref.device, ref.dtype), **_cast(_without_cache(kwargs), ref.device, ref.dtype))
        return layer_output_tensor(out).to(device=x.device, dtype=x.dtype)


def make_branch(model: nn.Module, pre_trained: nn.Module | None) -> PreTrainedBranch:
    """``CopyBranch(pre_trained)``, or — ``pre_trained=None`` — the fine-tuned ``model``'s own layers with their
    PEFT adapters off (an error if it has none)."""
    if pre_trained is not None:
        return CopyBranch(pre_trained)
    if not adapter_layers(find_decoder_layers(find_hf_model(model))):
        raise ValueError("pre_trained=None means 'the same layers with their PEFT adapters off', but the model has no "
                         "PEFT adapter in its decoder layers: pass the pre-trained model (e.g. a frozen copy of the "
                         "initial weights, lit_ft.core.frozen.frozen_copy)")
    return AdapterDisabledBranch()


@contextmanager
def scale_fine_tuning_component(model: nn.Module, pre_trained: nn.Module | None = None,
                                alpha: float = 1.0) -> Iterator[None]:
    """Inside the block, every decoder layer of ``model`` outputs ``x + PTC + alpha * FTC`` (TuCo's steering knob).

    With ``x`` the layer's input (the *running*, already-scaled stream), ``PTC = f_PT(x) − x`` and
    ``FTC = f_FT(x) − f_PT(x)``, the output is ``f_PT(x) + alpha * (f_FT(x) − f_PT(x))``: ``alpha = 1`` is the
    fine-tuned model, ``alpha = 0`` runs the pre-trained layers on the fine-tuned model's embeddings (and final norm
    / head), ``alpha > 1`` amplifies fine-tuning, ``alpha < 0`` reverses it.

    Args:
        model: the fine-tuned model (an HF causal LM, a PEFT model, or a module holding one).
        pre_trained: the pre-trained model for full fine-tuning (same architecture); ``None`` = ``model``'s own
            layers with their PEFT adapters switched off.
        alpha: the scale of the fine-tuning component.

    Costs one extra layer call per layer (or, for a copy, the copy's memory); the model must run without a KV cache
    (``use_cache=False``). The hook is removed on exit.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"scale_fine_tuning_component: `alpha` must be a number, got {alpha!r}")
    branch = make_branch(model, pre_trained)
    scale = float(alpha)

    def hook(index: int, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        ft = layer_output_tensor(output)
        pt = branch.layer_output(index, layer, args, kwargs)
        return _replace_output(output, pt + scale * (ft - pt))

    # the rewrite band: every other forward hook on the layers sees the scaled output
    handle = register_layer_hook(find_hf_model(model), hook, order=ORDER_REWRITE)
    try:
        yield
    finally:
        handle.remove()
