"""Find the parts of a Hugging Face model inside any LightningModule, and name their parameters.

Techniques must work whether the user's module stores the model as ``self.model``, ``self.net``, inside a PEFT
wrapper, or elsewhere. These helpers search and, when they fail, say what they searched. Parameter plans are keyed
by the LightningModule's own ``named_parameters()`` names (``model.model.layers.0.mlp.down_proj.weight`` for lit_ft's
CausalLMModule, ``model.base_model.model.model.layers...`` under PEFT): techniques find modules by structure and
translate them to names by object identity with :func:`param_names_by_id` / :func:`module_param_names`, so that no
prefix is ever hard-coded.
"""

from __future__ import annotations

import re
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


class UnsupportedLogitTransformError(ValueError):
    """The model transforms its logits after the lm_head in a way lit_ft's token loss does not reproduce."""


#: model types whose ``config.logits_scaling`` divides the logits (IBM Granite: ``logits / logits_scaling``;
#: MiniCPM3 divides the hidden states before its bias-free lm_head, the same thing)
DIVIDING_LOGITS_SCALING = frozenset({"granite", "granite_swa", "granitemoe", "granitemoe_swa", "granitemoeshared",
                                     "granitemoehybrid", "minicpm3"})
#: model types whose ``config.logits_scaling`` multiplies them (HyperCLOVA X: ``lm_head(h) * logits_scaling``)
MULTIPLYING_LOGITS_SCALING = frozenset({"hyperclovax"})
#: model types whose forward multiplies the logits by ``lm_head_multiplier`` (FalconH1)
LM_HEAD_MULTIPLIER_USERS = frozenset({"falcon_h1"})
#: model types whose forward multiplies the logits by ``logit_scale`` (MPT's config has the key, its HF forward
#: does not use it)
LOGIT_SCALE_USERS = frozenset({"cohere", "cohere2", "cohere2_moe", "cohere_compass", "cohere_compass_text"})
#: model types whose forward soft-caps the logits with ``logits_soft_cap``
LOGITS_SOFT_CAP_USERS = frozenset({"recurrent_gemma"})
#: supported keys whose meaning depends on the model type: set on another model type they are refused (read with
#: getattr, so a key that is a config property (MiniCPM3's logits_scaling) counts too)
_TYPED_KEYS = {"logits_scaling": DIVIDING_LOGITS_SCALING | MULTIPLYING_LOGITS_SCALING,
               "lm_head_multiplier": LM_HEAD_MULTIPLIER_USERS, "logit_scale": LOGIT_SCALE_USERS,
               "logits_soft_cap": LOGITS_SOFT_CAP_USERS}
#: top-level config keys of logit transforms the token loss applies (see :func:`logit_transforms`)
SUPPORTED_TRANSFORM_KEYS = frozenset({"final_logit_softcapping", "logits_soft_cap", "logit_scale", "logits_scaling",
                                      "lm_head_multiplier"})
#: a config key naming a transform of the output logits (``attn_logit_softcapping`` acts inside attention: not one)
TRANSFORM_KEY = re.compile(r"^(final_)?(logits?|lm_head|output)_(.*_)?(multiplier|scaling|scale|softcap|softcapping|"
                           r"soft_cap)$")
#: sub-configs a multimodal / composite model keeps its language model's settings in (not read here)
SUBCONFIGS = ("text_config", "language_config", "llm_config", "decoder_config")


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _config_items(config: object) -> list[tuple[str, object]]:
    """The config's public attributes (``vars``: no deep copy per call, unlike ``to_dict``)."""
    return [(k, v) for k, v in vars(config).items() if not k.startswith("_")]


def logit_transforms(hf_model: nn.Module) -> tuple[float | None, float | None]:
    """``(logit_scale, logit_softcap)`` of a causal LM: the transforms its forward applies to ``lm_head(hidden)``,
    in the fused op's form ``z -> c · tanh(s · z / c)`` (``None`` = off). The one place lit_ft knows them (the level-3
    loss, reference / history / teacher NLLs and :func:`lit_ft.core.loss.fused_forward.patch_fused_loss` all read
    them from here). Found in transformers 5.25's causal LMs (tests/reliability/test_logit_transforms.py compares
    the loss with HF's for every ``*ForCausalLM`` that builds from a tiny config):

    * ``logit_scale`` (Cohere, Cohere2, Cohere2-MoE, Cohere-Compass): ``z · logit_scale``;
    * ``logits_scaling``: Granite (all variants) and MiniCPM3 divide, ``z / logits_scaling``; HyperCLOVA X
      multiplies;
    * ``lm_head_multiplier`` (FalconH1, read from the trunk's attribute its forward uses): ``z · multiplier``;
    * ``final_logit_softcapping`` (Gemma 2/3/3n/4, Nanochat, Inkling 2, ...) and ``logits_soft_cap``
      (RecurrentGemma): the soft-cap ``c · tanh(z / c)``, after the scale.

    Raises:
        UnsupportedLogitTransformError: the config names another transform of the logits (see
            :func:`unsupported_logit_transforms`).
    """
    cfg = getattr(hf_model, "config", None)
    refused = unsupported_logit_transforms(cfg)
    if refused:
        raise UnsupportedLogitTransformError(
            f"lit_ft: {type(hf_model).__name__} transforms its logits in a way lit_ft's token loss does not apply: "
            + "; ".join(refused) + ". Supported: " + ", ".join(sorted(SUPPORTED_TRANSFORM_KEYS)) + " (as "
            "lit_ft.core.introspect.logit_transforms documents); train this model with its own loss "
            "(return self.model(**batch).loss) without lit_ft's token techniques."
        )
    if cfg is None:
        return None, None
    model_type = str(getattr(cfg, "model_type", "") or "")
    scale = 1.0
    value = _number(getattr(cfg, "logit_scale", None)) if model_type in LOGIT_SCALE_USERS else None
    if value is not None:
        scale *= value
    value = _number(getattr(cfg, "logits_scaling", None))
    if value is not None and value != 1.0:  # (a model type not listed was refused above)
        scale = scale / value if model_type in DIVIDING_LOGITS_SCALING else scale * value
    if model_type in LM_HEAD_MULTIPLIER_USERS:  # FalconH1 multiplies by the trunk's copy of the config value
        base = getattr(hf_model, "model", None)
        value = _number(getattr(base, "lm_head_multiplier", getattr(cfg, "lm_head_multiplier", None)))
        if value is not None:
            scale *= value
    cap = _number(getattr(cfg, "final_logit_softcapping", None))
    if model_type in LOGITS_SOFT_CAP_USERS:
        cap = cap or _number(getattr(cfg, "logits_soft_cap", None))
    return (None if scale == 1.0 else scale), (cap or None)


def unsupported_logit_transforms(config: object) -> list[str]:
    """What in ``config`` transforms the logits in a way :func:`logit_transforms` does not apply (empty when
    nothing): a key matching :data:`TRANSFORM_KEY` that is not supported (or ``logits_scaling`` of a model type whose
    direction is not known), with a value other than ``None`` / 0 / 1, or a supported transform set only on a
    sub-config (``text_config``, ...), which is not read."""
    if config is None:
        return []
    found = []
    model_type = str(getattr(config, "model_type", "") or "")
    for key, users in _TYPED_KEYS.items():
        try:
            value = getattr(config, key, None)
        except Exception:  # noqa: BLE001 - a config property that cannot be computed: not a transform we apply
            value = None
        if _number(value) not in (None, 0.0, 1.0) and model_type not in users:
            found.append(f"`{key}`={value!r} (model type {model_type!r}: whether and how its forward applies it to "
                         "the logits is not known)")
    for key, value in _config_items(config):
        if not TRANSFORM_KEY.search(key) or _number(value) in (None, 0.0, 1.0) or key in _TYPED_KEYS:
            continue
        if key not in SUPPORTED_TRANSFORM_KEYS:
            found.append(f"`{key}`={value!r} (the model transforms its logits with it after the lm_head)")
    unpadded = _number(getattr(config, "unpadded_vocab_size", None))
    vocab = _number(getattr(config, "vocab_size", None))
    if unpadded is not None and vocab is not None and unpadded < vocab:  # Inkling: logits cut to the unpadded vocab
        found.append(f"`unpadded_vocab_size`={int(unpadded)} < `vocab_size`={int(vocab)} (the model drops the "
                     "lm_head's padding rows from its logits)")
    for sub_name in SUBCONFIGS:
        sub = getattr(config, sub_name, None)
        if sub is None or sub is config or not hasattr(sub, "__dict__"):
            continue
        for key, value in _config_items(sub):
            if TRANSFORM_KEY.search(key) and _number(value) not in (None, 0.0, 1.0) \
                    and _number(getattr(config, key, None)) in (None, 0.0, 1.0):
                found.append(f"`{sub_name}.{key}`={value!r} (set on a sub-config, which "
                             "lit_ft.core.introspect.causal_lm_parts does not read)")
    return found


@dataclass
class CausalLMParts:
    """The pieces a token loss needs: the trunk, the lm_head and the logit transforms (:func:`logit_transforms`)."""

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
    """The trunk, lm_head and logit transforms of a causal LM.

    Raises:
        UnsupportedLogitTransformError: the model transforms its logits in a way lit_ft does not apply.
        ModelLayoutError: no trunk or lm_head was found.
    """
    scale, softcap = logit_transforms(hf_model)
    return CausalLMParts(
        hf_model=hf_model,
        base=find_base_model(hf_model),
        lm_head=find_lm_head(hf_model),
        logit_softcap=softcap,
        logit_scale=scale,
    )
