"""Find the parts of a Hugging Face model inside any LightningModule, and name their parameters.

Techniques must work whether the user's module stores the model as ``self.model``, ``self.net``, inside a PEFT
wrapper, or elsewhere. These helpers search and, when they fail, say what they searched. Parameter plans are keyed
by the LightningModule's own ``named_parameters()`` names (``model.model.layers.0.mlp.down_proj.weight`` for lit_ft's
CausalLMModule, ``model.base_model.model.model.layers...`` under PEFT): techniques find modules by structure and
translate them to names by object identity with :func:`param_names_by_id` / :func:`module_param_names`, so that no
prefix is ever hard-coded.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

_ATTR_NAMES = ("model", "hf_model", "net", "backbone", "llm", "lm", "transformer")
_NORM_NAMES = ("norm", "final_layernorm", "ln_f", "final_layer_norm", "norm_f", "layer_norm")
_LAYER_PATHS = ("layers", "h", "blocks", "decoder.layers", "encoder.layer", "encoder.layers", "layer")


class ModelLayoutError(LookupError):
    """A model part could not be found; the message lists what was searched."""


def param_names_by_id(root: nn.Module) -> dict[int, str]:
    """``id(parameter) -> name`` for every parameter of ``root``, in ``root.named_parameters()`` order (tied tensors:
    their first, canonical name)."""
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


def _is_hf_model(m: object) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(m, PreTrainedModel)


def find_hf_model(module: nn.Module, require_lm_head: bool = False) -> nn.Module:
    """Return the Hugging Face ``PreTrainedModel`` inside ``module`` (``module`` itself if it is one).

    Looks at the usual attribute names first, then breadth-first through submodules; PEFT wrappers are looked
    through to the innermost transformers model (the one whose ``loss_function`` is called). With
    ``require_lm_head`` only models with output embeddings (causal / masked LMs) qualify.
    """
    def ok(m: object) -> bool:
        if not _is_hf_model(m):
            return False
        if type(m).__module__.startswith("peft"):
            return False  # look through PEFT wrappers to the model they wrap
        return not require_lm_head or m.get_output_embeddings() is not None  # type: ignore[union-attr]

    if ok(module):
        return module
    for name in _ATTR_NAMES:
        m = getattr(module, name, None)
        if isinstance(m, nn.Module):
            found = _bfs(m, ok)
            if found is not None:
                return found
    found = _bfs(module, ok)
    if found is not None:
        return found
    what = "a transformers PreTrainedModel" + (" with an lm_head (get_output_embeddings())" if require_lm_head else "")
    raise ModelLayoutError(
        f"Could not find {what} inside {type(module).__name__}: searched attributes {list(_ATTR_NAMES)} and then "
        "every submodule breadth-first. lit_ft techniques need a Hugging Face transformers model somewhere in your "
        "LightningModule (e.g. self.model = AutoModelForCausalLM.from_pretrained(...))."
    )


def _bfs(root: nn.Module, pred) -> nn.Module | None:  # noqa: ANN001
    queue: deque[nn.Module] = deque([root])
    seen: set[int] = set()
    while queue:
        m = queue.popleft()
        if id(m) in seen:
            continue
        seen.add(id(m))
        if pred(m):
            return m
        queue.extend(m.children())
    return None


def find_base_model(hf_model: nn.Module) -> nn.Module:
    """The trunk that returns final hidden states (``model.model`` for Llama, ``transformer`` for GPT-2...)."""
    base = getattr(hf_model, "base_model", None)
    if isinstance(base, nn.Module) and base is not hf_model:
        return base
    for name in ("model", "transformer", "gpt_neox", "decoder"):
        m = getattr(hf_model, name, None)
        if isinstance(m, nn.Module):
            return m
    raise ModelLayoutError(
        f"Could not find the base (trunk) model of {type(hf_model).__name__}: tried .base_model, .model, "
        ".transformer, .gpt_neox, .decoder"
    )


def find_input_embeddings(hf_model: nn.Module) -> nn.Module:
    emb = hf_model.get_input_embeddings() if hasattr(hf_model, "get_input_embeddings") else None
    if emb is None:
        raise ModelLayoutError(f"{type(hf_model).__name__}.get_input_embeddings() returned nothing")
    return emb


def find_lm_head(hf_model: nn.Module) -> nn.Module:
    head = hf_model.get_output_embeddings() if hasattr(hf_model, "get_output_embeddings") else None
    if head is None or not hasattr(head, "weight"):
        raise ModelLayoutError(
            f"{type(hf_model).__name__} has no lm_head: get_output_embeddings() returned {head!r}. "
            "Token-level losses need a causal LM (AutoModelForCausalLM)."
        )
    return head


def lm_head_is_tied(hf_model: nn.Module) -> bool:
    return find_lm_head(hf_model).weight is find_input_embeddings(hf_model).weight


def find_final_norm(hf_model: nn.Module) -> nn.Module:
    base = find_base_model(hf_model)
    for name in _NORM_NAMES:
        m = getattr(base, name, None)
        if isinstance(m, nn.Module):
            return m
    raise ModelLayoutError(f"No final norm on {type(base).__name__}: tried attributes {list(_NORM_NAMES)}")


def find_decoder_layers(hf_model: nn.Module) -> nn.ModuleList:
    """The ``nn.ModuleList`` of transformer blocks (decoder layers, or encoder layers for encoders)."""
    roots = [find_base_model(hf_model), hf_model]
    for root in roots:
        for path in _LAYER_PATHS:
            m: object = root
            for part in path.split("."):
                m = getattr(m, part, None)
                if m is None:
                    break
            if isinstance(m, nn.ModuleList) and len(m) > 0:
                return m
    raise ModelLayoutError(
        f"No decoder/encoder layer list found in {type(hf_model).__name__}: tried {list(_LAYER_PATHS)} on the base "
        "model and the model"
    )


@dataclass
class CausalLMParts:
    """The pieces a token loss needs: the trunk, the lm_head and the logit transforms from the config."""

    hf_model: nn.Module
    base: nn.Module
    lm_head: nn.Module
    logit_softcap: float | None
    logit_scale: float | None

    @property
    def weight(self) -> torch.Tensor:
        return self.lm_head.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.lm_head, "bias", None)


def causal_lm_parts(hf_model: nn.Module) -> CausalLMParts:
    cfg = getattr(hf_model, "config", None)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    return CausalLMParts(
        hf_model=hf_model,
        base=find_base_model(hf_model),
        lm_head=find_lm_head(hf_model),
        logit_softcap=float(softcap) if softcap else None,
        logit_scale=float(scale) if scale not in (None, 1.0) else None,
    )
