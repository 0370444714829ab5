"""Prompt injection: the contract every prompt technique shares (docs/architecture.md, "Prompts").

A prompt technique is a :class:`PromptSource` (an ``nn.Module`` holding its trainable tensors). A
:class:`PromptInjector` puts it into a Hugging Face model with two hooks on the decoder trunk (``find_base_model``:
``LlamaModel``, also inside PEFT wrappers), so *every* way of running the model sees the prompt — ``model(**batch)``,
lit_ft's fused-loss path (which calls the trunk directly), ``generate()``:

* **pre-hook** (prefill: no cache, or an empty one):
  - ``kind = "embeddings"``: the source's ``n`` virtual-token embeddings are prepended to the input embeddings;
  - ``kind = "prefix"``: the source's per-layer key/value prefixes are written into the cache (a ``DynamicCache`` is
    created when the caller passed none; it is used even with ``use_cache=False``);
  - both: ``attention_mask`` gets ``n`` leading ones; the real tokens' ``position_ids`` are shifted by ``n``
    (the prompt occupies positions ``0..n-1``, as when PEFT runs without explicit positions); a source may also
    transform the input embeddings (DePT's position-indexed low-rank update).
  Decode steps (a cache that already holds the prompt): the mask is extended and the positions shifted the same way.
* **post-hook**: for ``"embeddings"`` the ``n`` prompt positions are removed from the trunk's outputs
  (``last_hidden_state`` and every entry of ``hidden_states``), so logits, hidden states, ``labels`` and every lit_ft
  token callback stay aligned with the user's tokens. This replaces PEFT's "pad ``labels`` with -100": the loss over
  the user's labels is the same (tests compare with PEFT), without lm_head work on virtual positions and without
  changing the length the user's code sees. A source with ``keep_prompt_outputs = True`` (CPT, whose loss covers its
  context's labels) keeps them; its callback then prepends the matching labels to the batch.

Prompts are small artifacts independent of the base weights: :func:`save_prompt` writes ``prompt.safetensors`` +
``prompt_config.json``; :func:`load_prompt` rebuilds the source; :func:`attach_prompt` installs one on any HF model
(outside Lightning too), e.g. for ``generate()``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_ft.core.host_modules import register_child, unregister_child
from lit_ft.core.introspect import ModelLayoutError, find_base_model, find_hf_model, find_input_embeddings
from lit_ft.core.layer_hooks import ORDER_REWRITE, register_trunk_hook, register_trunk_pre_hook

PROMPT_WEIGHTS = "prompt.safetensors"
PROMPT_CONFIG = "prompt_config.json"
#: attribute of the HF model holding its installed :class:`PromptInjector`
INJECTOR_ATTR = "_lit_ft_prompt_injector"
#: attribute of a cache object: how many prompt positions it holds (set when the injector filled it)
_CACHE_MARK = "_lit_ft_prompt_len"
#: attribute of a host module (LightningModule or HF model) holding the installed sources
HOST_ATTR = "lit_ft_prompts"


class PromptError(ValueError):
    """A prompt cannot be built or installed as asked (bad arguments, unsupported model or inputs)."""


# ------------------------------------------------------------------------------------------------------------------
# Model geometry
# ------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelGeometry:
    """What a prompt source needs to know about the model it is built for."""

    hidden_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def model_geometry(hf_model: nn.Module) -> ModelGeometry:
    """Hidden size, layer count and key/value geometry from ``hf_model.config`` (decoder-only transformers)."""
    cfg = getattr(hf_model, "config", None)
    if cfg is None:
        raise PromptError(f"{type(hf_model).__name__} has no `config`; prompt techniques need a Hugging Face model.")
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    hidden = getattr(cfg, "hidden_size", None)
    layers = getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "num_attention_heads", None)
    if hidden is None or layers is None or heads is None:
        raise PromptError(
            f"{type(hf_model).__name__}: its config lacks hidden_size / num_hidden_layers / num_attention_heads; "
            "prompt techniques support decoder transformers with standard configs."
        )
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    emb = find_input_embeddings(hf_model)
    return ModelGeometry(int(hidden), int(layers), int(kv), int(head_dim), int(emb.weight.shape[0]))


# ------------------------------------------------------------------------------------------------------------------
# Sources
# ------------------------------------------------------------------------------------------------------------------
@dataclass
class PromptInputs:
    """What a source sees when the prompt is built (prefill), all ``[B, T]``.

    ``position_ids``: the real tokens' own positions (before the shift by the prompt length). ``context``: extra
    per-batch tensors a callback handed to the injector (e.g. IAPT's ``instruction_mask``), cleared after use.
    """

    input_ids: torch.Tensor | None
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    inputs_embeds: torch.Tensor
    context: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.attention_mask.shape[0]


class PromptSource(nn.Module):
    """Base class of a prompt technique's module.

    Subclasses set ``kind`` and ``num_virtual_tokens`` and implement :meth:`prompt_embeddings` (``"embeddings"``)
    or :meth:`prefix_key_values` (``"prefix"``). Optional: :meth:`transform_input_embeddings` (DePT),
    :meth:`on_install` / :meth:`on_remove` (extra hooks, IAPT), :meth:`artifact_config` (constructor arguments for
    :func:`save_prompt`; the class must be constructible as ``cls(geometry, **artifact_config())``).
    """

    kind: str = "embeddings"
    keep_prompt_outputs: bool = False

    def __init__(self, geometry: ModelGeometry, num_virtual_tokens: int) -> None:
        super().__init__()
        if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
            raise PromptError(f"{type(self).__name__}: num_virtual_tokens must be an int >= 1, got {num_virtual_tokens!r}")
        self.geometry = geometry
        self.num_virtual_tokens = num_virtual_tokens

    # -- what gets injected -------------------------------------------------------------------------------------
    def prompt_embeddings(self, inputs: PromptInputs) -> torch.Tensor:
        """``[n, D]`` (shared by the batch; broadcast without a copy) or ``[B, n, D]``."""
        raise NotImplementedError(f"{type(self).__name__} is a '{self.kind}' source")

    def prefix_key_values(self, inputs: PromptInputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``[1 or B, num_kv_heads, n, head_dim]``."""
        raise NotImplementedError(f"{type(self).__name__} is a '{self.kind}' source")

    def transform_input_embeddings(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None, position_ids: torch.Tensor,
        embedding: nn.Module,
    ) -> torch.Tensor | None:
        """Input embeddings of the real tokens, or ``None`` to leave the model's own (``embedding(input_ids)``).
        Called at prefill and at every decode step; ``position_ids`` are the tokens' own positions."""
        return None

    def peft_export(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]] | None:
        """``(peft_type, tensors, extra config)`` of the same prompt as a HF PEFT adapter, or ``None`` (default)
        where PEFT has no module that computes what this source does. See :mod:`lit_ft.core.prompt_peft`."""
        return None

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def on_install(self, injector: PromptInjector) -> None:
        """Called when the source becomes active in ``injector`` (register extra hooks here)."""

    def on_remove(self, injector: PromptInjector) -> None:
        """Undo :meth:`on_install`."""

    def artifact_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (besides ``geometry``) that rebuild this source's shapes."""
        return {"num_virtual_tokens": self.num_virtual_tokens}


def expand_prompt(prompt: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[n, D]`` -> ``[B, n, D]`` as a view; ``[B, n, D]`` checked and returned."""
    if prompt.dim() == 2:
        return prompt.unsqueeze(0).expand(batch_size, -1, -1)
    if prompt.dim() == 3 and prompt.shape[0] in (1, batch_size):
        return prompt.expand(batch_size, -1, -1)
    raise PromptError(f"prompt embeddings must be [n, D] or [B, n, D] with B={batch_size}, got {tuple(prompt.shape)}")


# ------------------------------------------------------------------------------------------------------------------
# The injector
# ------------------------------------------------------------------------------------------------------------------
def _cache_len(cache: Any) -> int:
    if cache is None:
        return 0
    try:
        return int(cache.get_seq_length())
    except Exception:  # noqa: BLE001 - legacy tuple caches
        return int(cache[0][0].shape[-2]) if len(cache) else 0


def _new_cache(hf_model: nn.Module) -> Any:
    from transformers import DynamicCache

    try:
        return DynamicCache(config=hf_model.config)
    except TypeError:  # older transformers
        return DynamicCache()


class PromptInjector:
    """Runs a :class:`PromptSource` inside a Hugging Face model (see the module docstring for the mechanics).

    One injector per HF model (:func:`injector_for`); the active source can be swapped temporarily with
    :meth:`using` (PANDA's teacher prompt) or switched off with :meth:`disabled` (ProMoT's evaluation without the
    prompt). Per-batch tensors for the next prefill go in with :meth:`set_context`.
    """

    def __init__(self, hf_model: nn.Module) -> None:
        self.hf_model = hf_model
        self.base = find_base_model(hf_model)
        try:
            self.embedding = find_input_embeddings(hf_model)
        except (ModelLayoutError, AttributeError, NotImplementedError) as e:
            raise PromptError(
                f"{type(hf_model).__name__} has no input-embedding layer (get_input_embeddings): prompt techniques "
                f"prepend or derive prompts from the input embeddings ({e})."
            ) from None
        params = inspect.signature(self.base.forward).parameters
        self.cache_key = "cache" if "cache" in params else "past_key_values"
        self._arg_names = [n for n in params if n not in ("self", "args", "kwargs")]
        self.source: PromptSource | None = None
        self.enabled = True
        self._context: dict[str, torch.Tensor] = {}
        self._strip: list[int] = []
        self._prefill: list[PromptInputs | None] = []  # per nested trunk call: its PromptInputs at prefill
        self._handles: list[Any] = []
        self.calls = 0  # prefills that carried the prompt (tests, logs)
        try:
            from lit_ft.core.introspect import find_decoder_layers

            self._layers = list(find_decoder_layers(hf_model))
        except (ModelLayoutError, AttributeError, TypeError):
            self._layers = []

    # -- installation ----------------------------------------------------------------------------------------------
    def activate(self, source: PromptSource | None) -> None:
        """Make ``source`` the active prompt (``None``: none); hooks are registered on first use."""
        if source is not None and not isinstance(source, PromptSource):
            raise TypeError(f"source must be a PromptSource, got {type(source).__name__}")
        if self.source is not None and self.source is not source:
            self.source.on_remove(self)
        if not self._handles:
            # on the trunk's ordered hook owner (lit_ft.core.layer_hooks), in the rewrite band
            self._handles = [
                register_trunk_pre_hook(self.base, lambda _i, m, a, k: self._pre_hook(m, a, k), order=ORDER_REWRITE),
                register_trunk_hook(self.base, lambda _i, m, a, k, out: self._post_hook(m, a, k, out),
                                    order=ORDER_REWRITE),
            ]
        prev, self.source = self.source, source
        if source is not None and source is not prev:
            source.on_install(self)

    def remove(self) -> None:
        """Deactivate the source and remove the hooks (the model runs as before)."""
        if self.source is not None:
            self.source.on_remove(self)
        self.source = None
        for h in self._handles:
            h.remove()
        self._handles = []
        self.hf_model.__dict__.pop(INJECTOR_ATTR, None)

    @contextmanager
    def using(self, source: PromptSource | None) -> Iterator[None]:
        """Run with ``source`` active instead of the installed one (``None`` = no prompt)."""
        prev = self.source
        self.activate(source)
        try:
            yield
        finally:
            self.activate(prev)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the bare model (the prompt is not injected)."""
        prev, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = prev

    def set_context(self, **tensors: torch.Tensor) -> None:
        """Per-batch tensors the active source reads at the next prefill (``PromptInputs.context``)."""
        self._context = dict(tensors)

    @property
    def prefill_inputs(self) -> PromptInputs | None:
        """While the trunk runs a prefill with the prompt: its :class:`PromptInputs` (for hooks a source registered
        in :meth:`PromptSource.on_install`, e.g. per-layer prompts computed from that layer's input); else ``None``."""
        return self._prefill[-1] if self._prefill else None

    @property
    def active(self) -> bool:
        return self.enabled and self.source is not None

    # -- hooks -------------------------------------------------------------------------------------------------
    def _kwargs(self, args: tuple, kwargs: dict) -> dict:
        kw = dict(kwargs)
        for name, value in zip(self._arg_names, args):
            kw[name] = value
        if "past_key_values" in kw and self.cache_key != "past_key_values":
            kw[self.cache_key] = kw.pop("past_key_values")
        return kw

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if not self.active:
            self._strip.append(0)
            self._prefill.append(None)
            return None
        src = self.source
        assert src is not None
        kw = self._kwargs(args, kwargs)
        input_ids, embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if (input_ids is None) == (embeds is None):
            self._strip.append(0)
            self._prefill.append(None)
            return None  # let the model raise its own error
        ref = input_ids if input_ids is not None else embeds
        B, T = ref.shape[0], ref.shape[1]
        device = ref.device
        n = src.num_virtual_tokens
        cache = kw.get(self.cache_key)
        past = _cache_len(cache)
        prefill = past == 0
        if not prefill and getattr(cache, _CACHE_MARK, None) != n:
            raise PromptError(
                "a prompt is active but the model was given a cache that was not built with it (or with a prompt of "
                "another length); start generation from the prompt-free inputs so the prompt is injected at prefill, "
                "or run with `injector.disabled()`."
            )
        mask = kw.get("attention_mask")
        given_pos = kw.get("position_ids")
        if (mask is None and prefill and isinstance(given_pos, torch.Tensor) and given_pos.dim() == 2
                and given_pos.shape[1] > 1 and bool((given_pos[:, 1:] <= given_pos[:, :-1]).any())):
            # position resets without a mask = padding-free packing (lit_ft.data.packing): the prompt would be
            # prepended to the row once, and the examples after the first would not see it
            raise PromptError(
                "prompt techniques do not accept packed batches (SFTDataModule(packing=True) puts several examples "
                "in one row; their position_ids restart): a prompt is prepended per row, so only the first example "
                "would see it. Turn packing off for prompt techniques."
            )
        real_past = 0 if prefill else past - n
        if mask is None:
            mask = torch.ones(B, real_past + T, dtype=torch.long, device=device)
        elif mask.dim() != 2:
            raise PromptError(
                f"prompt techniques extend a 2-D attention_mask [batch, seq]; got a {mask.dim()}-D mask. Pass the "
                "padding mask and let the model build the causal mask."
            )
        limit = getattr(getattr(self.hf_model, "config", None), "max_position_embeddings", None)
        if limit is not None and n + real_past + T > limit:
            raise PromptError(
                f"the prompt ({n} virtual tokens) plus the input ({real_past + T} tokens) is longer than the model's "
                f"context (max_position_embeddings={limit}); shorten the inputs or use fewer virtual tokens."
            )
        pos = kw.get("position_ids")
        if pos is None:
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -T:]
        elif pos.dim() != 2:
            raise PromptError(f"prompt techniques need 2-D position_ids [batch, seq], got {tuple(pos.shape)}")
        new_embeds = src.transform_input_embeddings(input_ids, embeds, pos, self.embedding)
        if new_embeds is not None:
            embeds, input_ids = new_embeds, None
        ones = torch.ones(B, n, dtype=mask.dtype, device=mask.device)
        kw["attention_mask"] = torch.cat([ones, mask], dim=1)
        shifted = pos + n
        strip = 0
        inputs = None
        if prefill:
            if embeds is None:
                embeds = self.embedding(input_ids)
            inputs = PromptInputs(input_ids if input_ids is not None else kw.get("input_ids"), mask, pos, embeds,
                                  self._context)
            if src.kind == "embeddings":
                prompt = expand_prompt(src.prompt_embeddings(inputs), B).to(embeds.dtype)
                embeds = torch.cat([prompt, embeds], dim=1)
                shifted = torch.cat([torch.arange(n, device=device).expand(pos.shape[0], n), shifted], dim=1)
                input_ids = None
                strip = 0 if src.keep_prompt_outputs else n
                if cache is not None:
                    setattr(cache, _CACHE_MARK, n)
            elif src.kind == "prefix":
                if torch.is_grad_enabled() and any(
                    getattr(m, "gradient_checkpointing", False) and m.training for m in self._layers
                ):
                    raise PromptError(
                        f"{type(src).__name__} puts its prefix in the attention cache, and gradient checkpointing "
                        "makes every decoder layer drop the cache in training (the prefix would be silently ignored). "
                        "Turn gradient checkpointing off, or use an input-embedding prompt (PromptTuning, DePT, EPT)."
                    )
                if cache is None:
                    cache = _new_cache(self.hf_model)
                for layer, (k, v) in enumerate(src.prefix_key_values(inputs)):
                    k = k.expand(B, -1, -1, -1).to(embeds.dtype)
                    v = v.expand(B, -1, -1, -1).to(embeds.dtype)
                    cache.update(k, v, layer)
                setattr(cache, _CACHE_MARK, n)
                kw[self.cache_key] = cache
            else:
                raise PromptError(f"{type(src).__name__}.kind must be 'embeddings' or 'prefix', got {src.kind!r}")
            self._context = {}
            self.calls += 1
        if input_ids is None:
            kw["input_ids"], kw["inputs_embeds"] = None, embeds
        kw["position_ids"] = shifted
        self._strip.append(strip)
        self._prefill.append(inputs)
        return (), kw

    def _post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        n = self._strip.pop() if self._strip else 0
        if self._prefill:
            self._prefill.pop()
        if not n:
            return output
        if isinstance(output, tuple):
            return (output[0][:, n:], *output[1:])
        output["last_hidden_state"] = output.last_hidden_state[:, n:]
        hs = getattr(output, "hidden_states", None)
        if hs is not None:
            output["hidden_states"] = tuple(h[:, n:] for h in hs)
        return output


def injector_for(hf_model: nn.Module, create: bool = True) -> PromptInjector | None:
    """The :class:`PromptInjector` of ``hf_model`` (created on first use)."""
    inj = hf_model.__dict__.get(INJECTOR_ATTR)
    if inj is None and create:
        inj = PromptInjector(hf_model)
        hf_model.__dict__[INJECTOR_ATTR] = inj
    return inj


def register_source(host: nn.Module, name: str, source: PromptSource) -> None:
    """Make ``source`` a submodule of ``host`` (under ``host.lit_ft_prompts[name]``) so it moves with ``.to()``, is
    saved in ``host.state_dict()`` (Lightning checkpoints) and its tensors are ``host.parameters()``."""
    register_child(host, HOST_ATTR, name, source, PromptError, "a prompt")


def unregister_source(host: nn.Module, name: str) -> None:
    unregister_child(host, HOST_ATTR, name)


def claim_injector(hf_model: nn.Module, owner: str, mine: PromptSource | None = None,
                   hint: str = "use one prompt technique per model.") -> PromptInjector:
    """The model's injector for ``owner``; :class:`PromptError` when the model cannot take a prompt or another
    technique's prompt (not ``mine``) is active there."""
    try:
        inj = injector_for(hf_model)
    except PromptError as e:
        raise PromptError(f"{owner}: {e}") from None
    assert inj is not None
    if inj.source is not None and inj.source is not mine:
        raise PromptError(f"{owner}: the model already runs the prompt of another technique "
                          f"({type(inj.source).__name__}); {hint}")
    return inj


def install_source(host: nn.Module, name: str, source: PromptSource, injector: PromptInjector,
                   hf_model: nn.Module) -> None:
    """Move ``source`` to the model's device, register it on ``host`` and make it the injector's active prompt."""
    source.to(device=next(hf_model.parameters()).device)
    register_source(host, name, source)
    injector.activate(source)


def uninstall_source(host: nn.Module | None, name: str, injector: PromptInjector | None) -> None:
    """Deactivate the injector's prompt and take the source off ``host``."""
    if injector is not None:
        injector.activate(None)
    if host is not None:
        unregister_source(host, name)


# ------------------------------------------------------------------------------------------------------------------
# Shared initialisation helpers
# ------------------------------------------------------------------------------------------------------------------
def init_token_ids(
    how: str, n: int, vocab_size: int, tokenizer: Any = None, text: str | None = None, generator: torch.Generator | None = None,
    owner: str = "prompt",
) -> torch.Tensor | None:
    """Token ids whose embeddings initialise ``n`` prompt rows (PEFT's TEXT / SAMPLE_VOCAB), or ``None`` for
    ``how="random"``. ``"text"``: ``text`` tokenised without special tokens, repeated or cut to ``n``."""
    if how == "random":
        return None
    if how == "vocab":
        return torch.randint(0, vocab_size, (n,), generator=generator)
    if how != "text":
        raise PromptError(f"{owner}: init must be 'text', 'vocab' or 'random', got {how!r}")
    if not text:
        raise PromptError(f"{owner}: init='text' needs a non-empty init_text")
    if tokenizer is None:
        raise PromptError(
            f"{owner}: init='text' needs a tokenizer: pass `tokenizer` (a local folder or lit_ft asset name) or use "
            "a DataModule with a `.tokenizer` attribute (lit_ft's SFT/classification DataModules have one)."
        )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    unk = getattr(tokenizer, "unk_token_id", None)
    if not ids:
        raise PromptError(f"{owner}: init_text {text!r} tokenises to nothing")
    if unk is not None and unk in ids:
        pieces = [t for t, i in zip(tokenizer.convert_ids_to_tokens(ids), ids) if i == unk]
        raise PromptError(f"{owner}: init_text {text!r} has tokens unknown to the tokenizer ({pieces}); rephrase it")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise PromptError(f"{owner}: init_text token ids {bad[:4]} are outside the model's vocabulary ({vocab_size})")
    reps = math.ceil(n / len(ids))
    return torch.tensor((ids * reps)[:n], dtype=torch.long)


def load_tokenizer(name_or_path: str) -> Any:
    """A tokenizer from a local folder or a lit_ft asset name."""
    from transformers import AutoTokenizer

    from lit_ft.assets import resolve

    return AutoTokenizer.from_pretrained(resolve(name_or_path))


# ------------------------------------------------------------------------------------------------------------------
# Artifacts
# ------------------------------------------------------------------------------------------------------------------
def _class_path(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def save_prompt(source: PromptSource, directory: str | Path, metadata: Mapping[str, Any] | None = None,
                peft: bool = True) -> Path:
    """Write ``source`` as ``prompt.safetensors`` + ``prompt_config.json`` in ``directory`` (created). The base
    model's weights are not included; ``metadata`` (e.g. the base model's name) is stored in the JSON. A source
    PEFT can run (its :meth:`PromptSource.peft_export`) is also written as a PEFT adapter in the same folder
    (``adapter_config.json`` + ``adapter_model.safetensors``; ``metadata["base_model"]`` becomes
    ``base_model_name_or_path``) unless ``peft=False`` (a technique whose trained state is more than the prompt:
    a PEFT adapter of the prompt alone would not reproduce it)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in source.state_dict().items()}
    save_file(tensors, str(d / PROMPT_WEIGHTS))
    g = source.geometry
    cfg = {
        "class_path": _class_path(source),
        "init_args": source.artifact_config(),
        "geometry": {"hidden_size": g.hidden_size, "num_layers": g.num_layers, "num_kv_heads": g.num_kv_heads,
                     "head_dim": g.head_dim, "vocab_size": g.vocab_size},
        "kind": source.kind,
        "num_virtual_tokens": source.num_virtual_tokens,
        "metadata": dict(metadata or {}),
    }
    from lit_ft import __version__

    cfg["lit_ft_version"] = __version__
    (d / PROMPT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    exported = source.peft_export() if peft else None
    if exported is not None:  # the same prompt, loadable by PeftModel.from_pretrained (core/prompt_peft.py)
        from lit_ft.core.prompt_peft import write_peft_adapter

        peft_type, peft_tensors, extra = exported
        write_peft_adapter(peft_type, peft_tensors, source.num_virtual_tokens, d,
                           base_model=str((metadata or {}).get("base_model", "")), extra=extra)
    return d


def read_prompt_config(directory: str | Path) -> dict[str, Any]:
    d = Path(directory)
    f = d / PROMPT_CONFIG
    if not f.is_file():
        raise PromptError(f"{d} is not a lit_ft prompt artifact (no {PROMPT_CONFIG}); save one with save_prompt()")
    return json.loads(f.read_text())


def load_prompt(directory: str | Path, hf_model: nn.Module | None = None) -> PromptSource:
    """Rebuild the source saved in ``directory``. With ``hf_model``, its geometry must match the saved one."""
    from safetensors.torch import load_file

    cfg = read_prompt_config(directory)
    module_name, _, cls_name = cfg["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), cls_name)
    geometry = ModelGeometry(**cfg["geometry"])
    if hf_model is not None:
        mine = model_geometry(find_hf_model(hf_model))
        if mine != geometry:
            raise PromptError(f"the prompt in {directory} was trained for {geometry}, but this model is {mine}")
    source = cls(geometry, **cfg["init_args"])
    state = load_file(str(Path(directory) / PROMPT_WEIGHTS))
    source.load_state_dict(state)
    return source


def attach_prompt(model: nn.Module, prompt: str | Path | PromptSource, host: nn.Module | None = None,
                  name: str = "prompt") -> PromptInjector:
    """Install a prompt (an artifact folder or a source) on ``model`` (an HF model, or a module containing one) and
    return its injector; ``generate()`` and ``forward()`` then run with the prompt. The source becomes a submodule
    of ``host`` (default: the HF model) and moves to the model's device and dtype."""
    hf = find_hf_model(model)
    source = load_prompt(prompt, hf) if not isinstance(prompt, PromptSource) else prompt
    p = next(hf.parameters())
    source.to(device=p.device)
    register_source(host if host is not None else hf, name, source)
    inj = injector_for(hf)
    assert inj is not None
    inj.activate(source)
    return inj


def detach_prompt(model: nn.Module, host: nn.Module | None = None, name: str = "prompt") -> None:
    """Remove what :func:`attach_prompt` installed."""
    hf = find_hf_model(model)
    inj = injector_for(hf, create=False)
    if inj is not None:
        inj.remove()
    unregister_source(host if host is not None else hf, name)
