"""The parallel adapter of He et al. ("Towards a Unified View of Parameter-Efficient Transfer Learning", arXiv
2110.04366) and its fused FFN path, shared by the adapter techniques that use it (ParallelAdapters, MAM).

* :class:`ParallelAdapter`: ``y' = y + s·(ReLU(x W_down + b_down) W_up + b_up)`` with ``x`` the target's *input* and
  ``y`` its output (the authors' ``Adapter_Layer`` with ``adapter_layernorm_option="none"``: the scale multiplies the
  whole up-projection, its bias included). LoRA-style init (``W_down`` Kaiming-uniform, ``W_up`` and both biases 0):
  the model's outputs are unchanged at the start. Not mergeable: the ReLU makes it non-linear in ``x``.
* :class:`FusedParallelAdapterSet`: the same adapters on FFN blocks, computed inside a replacement forward of the
  block with two GEMMs instead of four (five for a gated MLP):

  - non-gated (``fc1 -> act -> fc2``, GPT-2's ``c_fc``/``c_proj``, GPT-NeoX's ``dense_h_to_4h``/``dense_4h_to_h``):
    ``h = x [W_fc1 | W_down] + [b_fc1 | b_down]``, split into ``(h1, h2)``;
    ``out = [act(h1) | ReLU(h2)] [W_fc2 ; s·W_up] + b_fc2 + s·b_up``;
  - gated (Llama/Mistral/Qwen: ``down(act(gate(x)) * up(x))``):
    ``h = x [W_gate | W_up | W_down_adapter] + biases``, split into ``(g, u, a)``;
    ``out = [act(g) * u | ReLU(a)] [W_down ; s·W_up_adapter] + b_down + s·b_up_adapter``.

  Weights are written in ``x @ W`` orientation (``nn.Linear`` weights transposed; GPT-2's ``Conv1D`` already is).
  With gradients on, the concatenated weights are rebuilt every call (the adapter weights change every step and
  autograd must reach them); under ``torch.no_grad()`` they are built once and reused until a weight changes
  (``Tensor._version``, ``data_ptr``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lit_ft.core.adapters import Adapter, AdapterError, AdapterSet, _submodule
from lit_ft.core.introspect import find_decoder_layers

__all__ = ["PA_INITS", "FFNLayout", "FusedParallelAdapterSet", "ParallelAdapter", "ffn_layout"]

#: ``"lora"``: W_down Kaiming-uniform (a = √5), W_up and biases 0 (the authors' ``ffn_adapter_init_option=lora``,
#: used for the scaled PA and MAM); ``"bert"``: both weights N(0, 0.02²), biases 0 (their option for sequential
#: adapters: outputs move at step 0)
PA_INITS = ("lora", "bert")


class ParallelAdapter(Adapter):
    """``y + s·(ReLU(x W_down + b_down) W_up + b_up)`` from the target's input ``x`` (``[.., in_features]``) onto its
    output ``y`` (``[.., out_features]``). Tensors: ``down`` = Linear(in, r), ``up`` = Linear(r, out)."""

    mergeable = False

    def __init__(self, in_features: int, out_features: int, bottleneck: int = 512, scale: float = 4.0,
                 init: str = "lora") -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bottleneck, self.scale, self.init = int(bottleneck), float(scale), str(init)
        self.down = nn.Linear(self.in_features, self.bottleneck)
        self.up = nn.Linear(self.bottleneck, self.out_features)
        with torch.no_grad():
            self.up.weight.zero_()
            self.up.bias.zero_()
            self.down.bias.zero_()

    @torch.no_grad()
    def reset(self, generator: torch.Generator | None = None) -> None:
        """Initialise as :data:`PA_INITS` says, from ``generator``."""
        if self.init == "lora":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
            self.up.weight.zero_()
        elif self.init == "bert":
            self.down.weight.copy_(torch.randn(self.down.weight.shape, generator=generator) * 0.02)
            self.up.weight.copy_(torch.randn(self.up.weight.shape, generator=generator) * 0.02)
        else:
            raise AdapterError(f"ParallelAdapter: init must be one of {list(PA_INITS)}, got {self.init!r}")
        self.down.bias.zero_()
        self.up.bias.zero_()

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s·(ReLU(x W_down + b_down) W_up + b_up)``, in the adapter's dtype."""
        return self.up(torch.relu(self.down(x.to(self.down.weight.dtype)))) * self.scale

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        if x is None:
            raise AdapterError("ParallelAdapter: the target module was called without a tensor input; a parallel "
                               "adapter reads the sublayer's input (positional, or hidden_states= / input= / x=)")
        return y + self.delta(x).to(y.dtype)

    def merge_into(self, target: nn.Module) -> None:
        raise AdapterError("ParallelAdapter cannot be merged into the base weights: s·ReLU(x W_down + b) W_up is not "
                           "linear in x (the ReLU); keep the adapters attached, or save them with save_adapters()")

    def artifact_config(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features, "bottleneck": self.bottleneck,
                "scale": self.scale, "init": self.init}


# ------------------------------------------------------------------------------------------------------------------
# Fused FFN path
# ------------------------------------------------------------------------------------------------------------------
#: (first, second) linear layers of a non-gated FFN block, per architecture
_NON_GATED = (("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"))
_ACTS = ("act_fn", "act", "activation_fn", "activation")


@dataclass
class FFNLayout:
    """An FFN block's pieces: ``first`` (``[gate, up]`` when ``gated``, else ``[fc1]``), ``second`` (down / fc2) and
    its activation."""

    gated: bool
    first: list[nn.Module]
    second: nn.Module
    act: Callable[[torch.Tensor], torch.Tensor]


def _xw(m: nn.Module) -> torch.Tensor:
    """The weight of a linear-like module as ``[in, out]`` (``x @ W``)."""
    if isinstance(m, nn.Linear):
        return m.weight.t()
    if type(m).__name__ == "Conv1D":  # GPT-2 stores [in, out]
        return m.weight
    raise AdapterError(f"the fused FFN path needs nn.Linear or Conv1D layers, got a {type(m).__name__}")


def _out_features(m: nn.Module) -> int:
    return int(_xw(m).shape[1])


def ffn_layout(block: nn.Module, owner: str = "ParallelAdapters") -> FFNLayout:
    """The layout of an FFN block the fused path can replace, or :class:`AdapterError` naming what is missing."""
    children = [n for n, _ in block.named_children()]
    act = next((a for n in _ACTS if callable(a := getattr(block, n, None))), None)
    drops = [(n, m.p) for n, m in block.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
    if drops:
        raise AdapterError(f"{owner}: fused=true: the FFN block {type(block).__name__} has dropout {drops} after its "
                           "output layer, which would also drop the adapter's output; set the model's dropout to 0 "
                           "or use fused=false")
    if act is not None and all(isinstance(getattr(block, n, None), nn.Module)
                               for n in ("gate_proj", "up_proj", "down_proj")):
        return FFNLayout(True, [block.gate_proj, block.up_proj], block.down_proj, act)
    for a, b in _NON_GATED:
        if act is not None and isinstance(getattr(block, a, None), nn.Module) and isinstance(getattr(block, b, None),
                                                                                            nn.Module):
            return FFNLayout(False, [getattr(block, a)], getattr(block, b), act)
    raise AdapterError(
        f"{owner}: fused=true needs an FFN block of the form down(act(gate(x)) * up(x)) (gate_proj/up_proj/down_proj "
        f"+ act_fn) or fc2(act(fc1(x))) ({', '.join('/'.join(p) for p in _NON_GATED)} + one of {list(_ACTS)}); "
        f"{type(block).__name__} has {children}. Target the FFN block (role 'mlp') or use fused=false."
    )


class _FusedForward:
    """The replacement ``forward`` of one FFN block (an instance attribute of the block; removing it restores the
    class's forward)."""

    def __init__(self, owner: FusedParallelAdapterSet, block: nn.Module, layout: FFNLayout,
                 adapter: ParallelAdapter) -> None:
        self.owner, self.block, self.layout, self.adapter = owner, block, layout, adapter
        self._cache: tuple[Any, tuple[torch.Tensor, ...]] | None = None

    def remove(self) -> None:
        self.block.__dict__.pop("forward", None)
        self._cache = None

    def _tensors(self) -> list[torch.Tensor]:
        mods = [*self.layout.first, self.layout.second]
        return [t for m in mods for t in (m.weight, getattr(m, "bias", None)) if t is not None] + \
            list(self.adapter.parameters())

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        """``(W1, b1, W2, b2)`` of the fused GEMMs, in ``dtype``."""
        cacheable = not torch.is_grad_enabled()
        if cacheable:
            key = (dtype, tuple((t.data_ptr(), t._version) for t in self._tensors()))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        lay, a, s = self.layout, self.adapter, self.adapter.scale
        firsts = lay.first
        w1 = torch.cat([*(_xw(m).to(dtype) for m in firsts), a.down.weight.t().to(dtype)], dim=1)
        b1 = torch.cat([*(m.bias.to(dtype) if getattr(m, "bias", None) is not None
                          else torch.zeros(_out_features(m), dtype=dtype, device=w1.device) for m in firsts),
                        a.down.bias.to(dtype)])
        w2 = torch.cat([_xw(lay.second).to(dtype), (a.up.weight.t() * s).to(dtype)], dim=0)
        b2 = (a.up.bias * s).to(dtype)
        if getattr(lay.second, "bias", None) is not None:
            b2 = lay.second.bias.to(dtype) + b2
        out = (w1, b1, w2, b2)
        if cacheable:
            self._cache = (key, out)
        return out

    def __call__(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self.owner.enabled:
            return type(self.block).forward(self.block, x, *args, **kwargs)
        lay = self.layout
        w1, b1, w2, b2 = self.weights(x.dtype)
        shape = x.shape
        h = torch.addmm(b1, x.reshape(-1, shape[-1]), w1)
        r = self.adapter.bottleneck
        if lay.gated:
            f = _out_features(lay.first[0])
            g, u, a = h.split([f, f, r], dim=-1)
            mid = torch.cat([lay.act(g) * u, torch.relu(a)], dim=-1)
        else:
            f = _out_features(lay.first[0])
            h1, a = h.split([f, r], dim=-1)
            mid = torch.cat([lay.act(h1), torch.relu(a)], dim=-1)
        out = torch.addmm(b2, mid, w2)
        return out.reshape(*shape[:-1], out.shape[-1])


class FusedParallelAdapterSet(AdapterSet):
    """An :class:`~lit_ft.core.adapters.AdapterSet` of :class:`ParallelAdapter` on FFN blocks that runs each block
    with the fused two-GEMM forward (module docstring) instead of a forward hook. Same tensors, same state-dict keys
    and artifact as the hooked set; :meth:`disabled` runs the block's own forward."""

    def attach(self, hf_model: nn.Module) -> None:
        if self._handles:
            raise AdapterError("AdapterSet: already attached; detach() first")
        blocks = find_decoder_layers(hf_model)
        for t in self.targets:
            block = _submodule(blocks[t.layer], t.path) if t.layer < len(blocks) else None
            if block is None:
                self.detach()
                raise AdapterError(f"AdapterSet: the model has no module {t.path!r} in decoder layer {t.layer}")
            adapter = self.adapter(t)
            if not isinstance(adapter, ParallelAdapter):
                self.detach()
                raise AdapterError(f"FusedParallelAdapterSet: {t.key} holds a {type(adapter).__name__}, not a "
                                   "ParallelAdapter")
            try:
                layout = ffn_layout(block)
            except AdapterError:
                self.detach()
                raise
            fwd = _FusedForward(self, block, layout, adapter)
            block.forward = fwd  # instance attribute: shadows the class's forward until removed
            self._handles.append(fwd)
        # not through nn.Module.__setattr__, which would register the whole model as a submodule of the set (its
        # tensors in the set's parameters() and state_dict())
        self.__dict__["_model"] = hf_model

