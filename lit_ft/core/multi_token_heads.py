"""CAFT's auxiliary heads: ``K`` small modules on a causal LM's final hidden state, head ``k`` predicting the token
``k + 1`` places after the next one through the model's own (shared) lm_head.

Two head kinds, as in the authors' code: ``"transformer"`` — a fresh instance of the model's own decoder-layer class
(``type(layers[0])(config, layer_idx)``), optionally initialised from one of the model's layers — and ``"linear"`` —
a residual block ``x + SiLU(W x + b)`` with ``W`` zero-initialised (the head starts as the identity). A decoder-layer
head needs the rotary position embeddings and the causal mask of its input: :meth:`MultiTokenHeadSet.forward` takes
them from the model (``trunk.rotary_emb``, ``transformers.masking_utils.create_causal_mask``), as the model's own
layers get them. The set lives on the LightningModule (``lit_ft_heads.<name>``, see :mod:`lit_ft.core.host_modules`)
and is saved on its own (``heads.safetensors`` + ``heads_config.json``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lit_ft.core.introspect import find_base_model, find_decoder_layers

HEAD_ARCHS = ("transformer", "linear")
HOST_ATTR = "lit_ft_heads"
WEIGHTS_FILE = "heads.safetensors"
CONFIG_FILE = "heads_config.json"


class HeadsError(ValueError):
    """A head set that cannot be built, loaded or run on this model."""


class ResBlockHead(nn.Module):
    """``x + SiLU(W x + b)`` with ``W`` zero at init (so the head starts as the identity), the authors' ``linear``
    head."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.act(self.linear(x))


def _layer_weights(layer: nn.Module) -> dict[str, torch.Tensor]:
    """A decoder layer's own weights by plain name: a PEFT-wrapped linear's ``base_layer`` is read as the linear,
    its LoRA factors are left out (the copy starts from the pretrained weights)."""
    out = {}
    for name, t in layer.state_dict().items():
        if "lora_" in name or "lora_magnitude" in name:
            continue
        out[name.replace(".base_layer.", ".")] = t
    return out


def build_heads(hf_model: nn.Module, num_heads: int, head_arch: str, init_layer: int | None,
                owner: str = "MultiTokenHeads") -> MultiTokenHeadSet:
    """``num_heads`` fresh heads for ``hf_model`` on its device and in its dtype.

    ``init_layer`` (transformer heads): index into the model's decoder layers whose weights every head copies;
    ``None`` keeps the decoder-layer class's own initialisation."""
    cfg = getattr(hf_model, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not isinstance(hidden, int):
        raise HeadsError(f"{owner}: cannot read the hidden size of {type(hf_model).__name__} from its config")
    param = next(hf_model.parameters())
    heads: list[nn.Module] = []
    if head_arch == "linear":
        heads = [ResBlockHead(hidden) for _ in range(num_heads)]
    else:
        layers = find_decoder_layers(hf_model)
        if not hasattr(find_base_model(hf_model), "rotary_emb"):
            raise HeadsError(f"{owner}: head_arch='transformer' needs the model's rotary position embeddings "
                             f"(`rotary_emb` on its trunk); {type(hf_model).__name__} has none. Use "
                             "head_arch='linear'.")
        n = len(layers)
        if init_layer is not None and not -n <= init_layer < n:
            raise HeadsError(f"{owner}: `init_layer` must index one of the model's {n} decoder layers "
                             f"(from {-n} to {n - 1}) or be null, got {init_layer}")
        cls = type(layers[0])
        for k in range(num_heads):
            try:
                head = cls(cfg, layer_idx=n + k)
            except TypeError as e:
                raise HeadsError(f"{owner}: cannot build a {cls.__name__}(config, layer_idx) head ({e}); use "
                                 "head_arch='linear'") from e
            if init_layer is not None:
                missing, unexpected = head.load_state_dict(_layer_weights(layers[init_layer]), strict=False)
                if missing:
                    raise HeadsError(f"{owner}: decoder layer {init_layer} lacks weights a head needs: {missing[:4]}")
            heads.append(head)
    config = {"num_heads": num_heads, "head_arch": head_arch, "init_layer": init_layer, "hidden_size": hidden}
    return MultiTokenHeadSet(heads, config).to(device=param.device, dtype=param.dtype)


class MultiTokenHeadSet(nn.Module):
    """The ``K`` heads and their config (``num_heads``, ``head_arch``, ``init_layer``, ``hidden_size``)."""

    def __init__(self, heads: list[nn.Module], config: Mapping[str, Any]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.config = dict(config)

    @property
    def head_arch(self) -> str:
        return str(self.config["head_arch"])

    def forward(self, hidden: torch.Tensor, hf_model: nn.Module | None = None,
                batch: Mapping[str, Any] | None = None) -> list[torch.Tensor]:
        """Every head's output ``[B, T, D]`` from the final hidden states ``hidden``. Decoder-layer heads read the
        positions (``batch["position_ids"]``, else ``0..T-1``) and padding (``batch["attention_mask"]``) of the
        batch and the rotary embeddings of ``hf_model``."""
        if self.head_arch == "linear":
            return [head(hidden) for head in self.heads]
        if hf_model is None:
            raise HeadsError("decoder-layer heads need the HF model (its rotary embeddings)")
        batch = batch or {}
        b, t, _ = hidden.shape
        pos = batch.get("position_ids")
        if pos is None:
            pos = torch.arange(t, device=hidden.device)[None].expand(b, t)
        pos = pos.to(hidden.device)
        trunk = find_base_model(hf_model)
        pe = trunk.rotary_emb(hidden, position_ids=pos)
        mask = causal_mask(hf_model, hidden, batch.get("attention_mask"), pos)
        outs = []
        for head in self.heads:
            out = head(hidden, attention_mask=mask, position_ids=pos, position_embeddings=pe)
            outs.append(out[0] if isinstance(out, tuple) else out)
        return outs


def causal_mask(hf_model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor | None,
                position_ids: torch.Tensor) -> Any:
    """The mask the model's own layers get for this input (``None`` where the attention is causal by itself)."""
    try:
        from transformers.masking_utils import create_causal_mask
    except ImportError:  # older transformers: sdpa / eager attention is causal without a mask (right padding)
        return None
    am = None if attention_mask is None else attention_mask.to(hidden.device)
    try:
        return create_causal_mask(config=hf_model.config, inputs_embeds=hidden, attention_mask=am, cache=None,
                                  position_ids=position_ids)
    except TypeError:  # the keyword was renamed (past_key_values in transformers 4.x)
        return create_causal_mask(config=hf_model.config, input_embeds=hidden, attention_mask=am,
                                  cache_position=torch.arange(hidden.shape[1], device=hidden.device),
                                  past_key_values=None, position_ids=position_ids)


def save_heads(heads: MultiTokenHeadSet, path: str, metadata: Mapping[str, Any] | None = None) -> str:
    """Write ``heads.safetensors`` and ``heads_config.json`` into the folder ``path``; returns ``path``."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()}
    save_file(state, os.path.join(path, WEIGHTS_FILE))
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({**heads.config, **dict(metadata or {})}, f, indent=2, sort_keys=True)
    return path


def read_heads(path: str, owner: str = "MultiTokenHeads") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(state_dict, config)`` of a head folder written by :func:`save_heads`."""
    from safetensors.torch import load_file

    weights, config = os.path.join(path, WEIGHTS_FILE), os.path.join(path, CONFIG_FILE)
    for f in (weights, config):
        if not os.path.isfile(f):
            raise HeadsError(f"{owner}: `heads_path` {path!r} has no {os.path.basename(f)} (a folder written by "
                             "save_heads)")
    with open(config) as fh:
        return load_file(weights), json.load(fh)


def load_heads(heads: MultiTokenHeadSet, path: str, owner: str = "MultiTokenHeads") -> None:
    """Load the weights saved at ``path`` into ``heads``; the saved head count, kind and width must match."""
    state, config = read_heads(path, owner)
    for key in ("num_heads", "head_arch", "hidden_size"):
        if config.get(key) != heads.config.get(key):
            raise HeadsError(f"{owner}: the heads at {path!r} have {key}={config.get(key)!r}, these have "
                             f"{key}={heads.config.get(key)!r}")
    ref = next(iter(heads.parameters()))
    heads.load_state_dict({k: v.to(device=ref.device, dtype=ref.dtype) for k, v in state.items()}, strict=True)
