"""Adapters: small trainable modules attached to named modules of a HF model, the life cycle every adapter technique
shares (``docs/architecture.md``, "Adapters").

* **Where.** A technique names its targets by *role* inside each decoder layer (``"attention_output"``,
  ``"mlp_output"``, ``"attention"``, ``"mlp"``, ``"query"``, ``"value"``: resolved per architecture by
  :data:`ROLE_CANDIDATES`) or by a module path relative to the layer (``"mlp.down_proj"``). :func:`resolve_targets`
  finds them in every decoder layer (through PEFT wrappers too) and fails with the layer's module names when one is
  missing.
* **How.** An :class:`Adapter` rewrites its target's output: ``y' = adapter(x, y)`` with ``x`` the target's input
  (the sublayer input, for parallel adapters) and ``y`` its output (the first element when the module returns a
  tuple). It runs in a forward hook, so the base model's modules, parameter names and state-dict keys are
  untouched, and ``generate()``, gradient checkpointing and PEFT wrappers work unchanged.
* **Whose.** The adapters of one technique are an :class:`AdapterSet`, registered as a submodule of the
  LightningModule under ``lit_ft_adapters[<name>]`` (:func:`register_adapters`): they move with ``.to()``, are in
  ``state_dict()`` (Lightning checkpoints, resume) and in ``parameters()`` (the optimizer).
* **Artifacts.** :func:`save_adapters` writes ``adapters.safetensors`` + ``adapter_config.json`` (the adapter tensors
  only, no base weights); :func:`load_adapters` rebuilds and attaches them to a model of the same layout.
* **Merge.** Where the adapter is a linear map of its target's output (LiST's linear adapter after a dense layer),
  :meth:`AdapterSet.merge` folds it into the target's weight and bias and removes the hook: the model then computes
  the same outputs with no adapter cost.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import nn

from lit_ft.core.host_modules import register_child, unregister_child
from lit_ft.core.introspect import find_decoder_layers

__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "HOST_ATTR", "ROLE_CANDIDATES", "Adapter", "AdapterError", "AdapterSet",
    "AdapterTarget", "load_adapters", "register_adapters", "resolve_targets", "save_adapters", "unregister_adapters",
]

HOST_ATTR = "lit_ft_adapters"
ADAPTER_WEIGHTS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"

#: role -> module paths relative to a decoder layer, tried in order (Llama/Mistral/Qwen/Gemma, GPT-NeoX, GPT-2,
#: OPT/BART, BERT/RoBERTa, Falcon, Phi)
ROLE_CANDIDATES: dict[str, tuple[str, ...]] = {
    "attention": ("self_attn", "attention", "attn", "self_attention"),
    "mlp": ("mlp", "feed_forward", "ffn"),
    "attention_output": ("self_attn.o_proj", "self_attn.out_proj", "self_attn.dense", "attention.dense",
                         "attention.output.dense", "attn.c_proj", "attn.out_proj", "self_attention.dense"),
    "mlp_output": ("mlp.down_proj", "mlp.fc2", "mlp.dense_4h_to_h", "mlp.c_proj", "feed_forward.w2", "fc2",
                   "output.dense", "mlp.w2"),
    "query": ("self_attn.q_proj", "attention.self.query", "attn.q_proj", "self_attn.query"),
    "value": ("self_attn.v_proj", "attention.self.value", "attn.v_proj", "self_attn.value"),
}


class AdapterError(ValueError):
    """An adapter cannot be built, attached, merged or loaded as asked."""


class AdapterTarget(tuple):
    """``(layer, path)``: the module at ``path`` inside decoder layer ``layer``; :attr:`key` names it in state dicts
    and artifacts (``layer3__mlp__down_proj``)."""

    def __new__(cls, layer: int, path: str) -> AdapterTarget:
        return super().__new__(cls, (int(layer), str(path)))

    @property
    def layer(self) -> int:
        return self[0]

    @property
    def path(self) -> str:
        return self[1]

    @property
    def key(self) -> str:
        return f"layer{self.layer}__" + self.path.replace(".", "__")


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def _module_names(layer: nn.Module, depth: int = 2) -> list[str]:
    return [n for n, _ in layer.named_modules() if n and n.count(".") < depth]


def resolve_targets(hf_model: nn.Module, targets: Sequence[str], owner: str = "adapters",
                    layers: Sequence[int] | None = None) -> dict[AdapterTarget, nn.Module]:
    """Every decoder layer's (or those in ``layers``) module for each of ``targets`` (roles or relative paths), in
    layer order. Raises :class:`AdapterError` naming the layer, the target, the paths tried and the layer's modules."""
    if isinstance(targets, str) or not targets:
        raise AdapterError(f"{owner}: targets must be a non-empty list of roles {sorted(ROLE_CANDIDATES)} or module "
                           f"paths inside a decoder layer, got {targets!r}")
    blocks = find_decoder_layers(hf_model)
    chosen = range(len(blocks)) if layers is None else layers
    out: dict[AdapterTarget, nn.Module] = {}
    for i in chosen:
        if not 0 <= int(i) < len(blocks):
            raise AdapterError(f"{owner}: layer {i} is out of range: the model has {len(blocks)} decoder layers")
        block = blocks[int(i)]
        for t in targets:
            candidates = ROLE_CANDIDATES.get(t, (t,))
            found = next(((c, m) for c in candidates if (m := _submodule(block, c)) is not None), None)
            if found is None:
                raise AdapterError(
                    f"{owner}: decoder layer {i} ({type(block).__name__}) has no module for target {t!r} (tried "
                    f"{list(candidates)}); its modules: {_module_names(block)}. Name the module by its path inside "
                    "the layer (e.g. 'mlp.down_proj')."
                )
            out[AdapterTarget(int(i), found[0])] = found[1]
    return out


class Adapter(nn.Module):
    """One adapter on one target module: :meth:`forward` maps the target's input ``x`` and output ``y`` to the new
    output. Subclasses set :attr:`mergeable` and implement :meth:`merge_into` when the map is exact to fold into the
    target, and :meth:`artifact_config` (constructor arguments: ``cls(**artifact_config())`` rebuilds it)."""

    mergeable: bool = False

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def merge_into(self, target: nn.Module) -> None:
        raise AdapterError(f"{type(self).__name__} cannot be merged into the base weights (it is not a linear map "
                           "of its target's output)")

    def artifact_config(self) -> dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} does not describe its constructor arguments")


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return None


class AdapterSet(nn.Module):
    """The adapters of one technique on one model, one per :class:`AdapterTarget`, run by forward hooks."""

    def __init__(self, adapters: Mapping[AdapterTarget, Adapter]) -> None:
        super().__init__()
        if not adapters:
            raise AdapterError("AdapterSet: no adapters given")
        self.targets: list[AdapterTarget] = list(adapters)
        self.adapters = nn.ModuleDict({t.key: a for t, a in adapters.items()})
        self.enabled = True
        self._handles: list[Any] = []
        # the model the hooks are on, kept out of nn.Module's registry: as a submodule it would enter this set's
        # state_dict (every base weight saved twice in checkpoints) and its parameter count
        self.__dict__["_model"] = None

    def adapter(self, target: AdapterTarget) -> Adapter:
        return self.adapters[target.key]  # type: ignore[return-value]

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, hf_model: nn.Module) -> None:
        """Hook every target of ``hf_model`` (its decoder layers must match the targets)."""
        if self._handles:
            raise AdapterError("AdapterSet: already attached; detach() first")
        blocks = find_decoder_layers(hf_model)
        for t in self.targets:
            module = _submodule(blocks[t.layer], t.path) if t.layer < len(blocks) else None
            if module is None:
                self.detach()
                raise AdapterError(f"AdapterSet: the model has no module {t.path!r} in decoder layer {t.layer}")
            self._handles.append(module.register_forward_hook(self._hook(self.adapter(t)), with_kwargs=True))
        self.__dict__["_model"] = hf_model

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.__dict__["_model"] = None

    def _hook(self, adapter: Adapter):  # noqa: ANN202
        def run(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            if not self.enabled:
                return None
            y = output[0] if isinstance(output, tuple) else output
            new = adapter(_first_tensor(args, kwargs), y)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return run

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the base model alone inside the block."""
        was, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = was

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every adapter into its target's weights and remove the hooks (the model keeps its outputs). Raises
        :class:`AdapterError` before changing anything when one adapter is not mergeable."""
        if self._model is None:
            raise AdapterError("AdapterSet.merge: the adapters are not attached to a model")
        refused = [t.key for t in self.targets if not self.adapter(t).mergeable]
        if refused:
            raise AdapterError(f"AdapterSet.merge: {type(self.adapter(self.targets[0])).__name__} adapters are not a "
                               f"linear map of their target's output and cannot be merged ({len(refused)} targets)")
        blocks = find_decoder_layers(self._model)
        for t in self.targets:
            self.adapter(t).merge_into(blocks[t.layer].get_submodule(t.path))
        self.detach()


# ------------------------------------------------------------------------------------------------------------------
# Registration on the LightningModule
# ------------------------------------------------------------------------------------------------------------------
def register_adapters(host: nn.Module, name: str, adapters: AdapterSet) -> None:
    """Make ``adapters`` a submodule of ``host`` (``host.lit_ft_adapters[name]``): in its ``state_dict()`` and
    ``parameters()``."""
    register_child(host, HOST_ATTR, name, adapters, AdapterError, "adapters")


def unregister_adapters(host: nn.Module, name: str) -> None:
    unregister_child(host, HOST_ATTR, name)


# ------------------------------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------------------------------
def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def save_adapters(adapters: AdapterSet, directory: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write ``adapters.safetensors`` (the adapter tensors, keyed ``<target key>.<tensor>``) and
    ``adapter_config.json`` (each target's layer, module path, adapter class and constructor arguments) into
    ``directory``."""
    from safetensors.torch import save_file

    from lit_ft import __version__

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"{k}.{n}": v.detach().cpu().contiguous() for k, a in adapters.adapters.items()
               for n, v in a.state_dict().items()}
    save_file(tensors, str(d / ADAPTER_WEIGHTS))
    cfg = {
        "targets": [{"layer": t.layer, "module": t.path, "class_path": _class_path(adapters.adapter(t)),
                     "init_args": adapters.adapter(t).artifact_config()} for t in adapters.targets],
        "metadata": dict(metadata or {}),
        "lit_ft_version": __version__,
    }
    (d / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return d


def load_adapters(model: nn.Module, directory: str | Path, attach: bool = True) -> AdapterSet:
    """Rebuild the adapters saved in ``directory`` and (by default) attach them to ``model`` (a HF model or a module
    holding one). They move to the model's device; their dtype stays float32 (outputs are cast to the model's)."""
    from safetensors.torch import load_file

    from lit_ft.core.introspect import find_hf_model

    d = Path(directory)
    f = d / ADAPTER_CONFIG
    if not f.is_file():
        raise AdapterError(f"{d} is not a lit_ft adapter artifact (no {ADAPTER_CONFIG}); save one with save_adapters()")
    cfg = json.loads(f.read_text())
    built: dict[AdapterTarget, Adapter] = {}
    for entry in cfg["targets"]:
        module_name, _, cls_name = entry["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), cls_name)
        built[AdapterTarget(entry["layer"], entry["module"])] = cls(**entry["init_args"])
    adapters = AdapterSet(built)
    state = load_file(str(d / ADAPTER_WEIGHTS))
    adapters.adapters.load_state_dict(state)
    hf = find_hf_model(model)
    adapters.to(device=next(hf.parameters()).device)
    if attach:
        adapters.attach(hf)
    return adapters
