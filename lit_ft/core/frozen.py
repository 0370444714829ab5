"""Frozen auxiliary models (references, history models, teachers) shared by techniques: :class:`FrozenModel` owns
one such model's life cycle (build, device, checkpoint, EMA updates); the functions below build and freeze them.

A frozen copy must not drag along what other callbacks attached to the live model (forward hooks, the lit_ft loss
hook and its pipeline): a plain ``deepcopy`` would copy those callbacks and their own models too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HOOK_DICTS = (
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
)


def _copy_without_hooks(hf_model: nn.Module) -> nn.Module:
    memo: dict[int, Any] = {}
    dropped: list[tuple[str, str]] = []
    for mname, m in hf_model.named_modules():
        for attr in _HOOK_DICTS:
            d = m.__dict__.get(attr)
            if d:
                memo[id(d)] = type(d)()
        for key, value in list(m.__dict__.items()):
            if key.startswith("_lit_ft") or (key == "_loss_function" and type(value).__module__.startswith("lit_ft")):
                memo[id(value)] = None
                dropped.append((mname, key))
    out = copy.deepcopy(hf_model, memo)
    modules = dict(out.named_modules())
    for mname, key in dropped:
        modules[mname].__dict__.pop(key, None)
    return out


def freeze(model: nn.Module, dtype: str = "float32", device: str | torch.device | None = None) -> nn.Module:
    """``model`` in eval mode, no gradients, cast to ``dtype`` (a key of :data:`DTYPES`), optionally moved."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model = model.to(dtype=DTYPES[dtype]).eval()
    if device is not None:
        model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def frozen_copy(hf_model: nn.Module, dtype: str = "float32", device: str | torch.device | None = None) -> nn.Module:
    """A frozen deep copy of ``hf_model`` without the hooks other callbacks put on it."""
    return freeze(_copy_without_hooks(hf_model), dtype, device)


def load_frozen_causal_lm(name_or_path: str, like: nn.Module, who: str, dtype: str = "float32") -> nn.Module:
    """Load a frozen causal LM from a local folder or ``lit_ft.assets`` name; it must share ``like``'s vocabulary
    (the error names ``who`` — the technique asking — and both vocab sizes)."""
    from transformers import AutoModelForCausalLM

    from lit_ft.assets import resolve

    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path))
    if model.config.vocab_size != like.config.vocab_size:
        raise ValueError(
            f"{who}: model {name_or_path!r} has vocab_size {model.config.vocab_size} but the trained model has "
            f"{like.config.vocab_size}; they must share a tokenizer"
        )
    return freeze(model, dtype)


#: ``FrozenModel(source=...)``: a factory building the frozen model from the trained HF model
ModelFactory = Callable[[nn.Module], nn.Module]


class FrozenModel:
    """One frozen auxiliary model owned by a callback (a Rho-1 reference, an ssToken history model, a teacher, a DPO
    reference policy), with the life cycle they all need.

    - **Lazy build** (:meth:`ensure` / :meth:`build`) from ``source``: ``None`` = a hook-free copy of the trained
      model (:func:`frozen_copy`: "the weights when training starts"); a string = a local HF folder or a
      ``lit_ft.assets`` name loaded as a causal LM that must share the trained model's vocabulary; a callable =
      a factory ``(trained_hf_model) -> nn.Module``. Whatever the source, the result is in eval mode, has
      ``requires_grad=False`` and is cast to ``dtype``.
    - **Device**: :meth:`on` moves it to the device of the batch it scores (it follows the LightningModule); with
      ``offload`` it lives in CPU memory and visits that device only for the ``with`` block.
    - **Checkpoint**: :meth:`state_dict` / :meth:`load_state_dict` carry its weights (``persist``; default: only for
      a copy of the trained model, which a resumed run could not re-create: by then the trained weights moved),
      so a resumed run keeps the same frozen weights. A state loaded before the build is applied at the build.
    - **Updates** (history / EMA models): :meth:`update` moves its weights toward the trained model's
      (``θ ← decay·θ + (1 − decay)·θ_trained``, matched by name).

    Args:
        source: see above.
        owner: the technique, named in errors (``"ExcessLossSelection"``).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        offload: keep the model on the CPU between uses.
        persist: store the weights in :meth:`state_dict` (``None`` = only when ``source`` is ``None``).
        require_lm_head: the trained model found by :meth:`ensure` must have output embeddings (a causal LM).
    """

    def __init__(self, source: str | ModelFactory | None = None, *, owner: str, dtype: str = "float32",
                 offload: bool = False, persist: bool | None = None, require_lm_head: bool = True) -> None:
        if source is not None and not callable(source) and not (isinstance(source, str) and source):
            raise ValueError(f"{owner}: the frozen model's source must be None (a copy of the trained model), a "
                             f"local folder / lit_ft asset name, or a factory callable, got {source!r}")
        if dtype not in DTYPES:
            raise ValueError(f"{owner}: dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.source = source
        self.owner = owner
        self.dtype = dtype
        self.offload = bool(offload)
        self.persist = source is None if persist is None else bool(persist)
        self.require_lm_head = require_lm_head
        self._model: nn.Module | None = None
        self._pending_state: dict[str, torch.Tensor] | None = None
        self._pairs: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (frozen, trained) tensors for update()
        self._pairs_of: int | None = None  # id() of the trained model the pairs belong to

    # -- building ------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module | None:
        """The frozen model (``None`` before the build)."""
        return self._model

    @model.setter
    def model(self, model: nn.Module | None) -> None:
        # used as is (tests inject a model of their own; it is not frozen in place, it may belong to another module)
        self._model = model
        self._pairs = None

    def build(self, trained: nn.Module) -> nn.Module:
        """Build the frozen model now (replacing any built one) from ``trained``, the HF model being trained."""
        device = "cpu" if self.offload else None
        if self.source is None:
            model = frozen_copy(trained, self.dtype, device)
        elif isinstance(self.source, str):
            model = load_frozen_causal_lm(self.source, trained, self.owner, self.dtype)
        else:
            model = freeze(self.source(trained), self.dtype)
        if device is not None:
            model = model.to(device)
        if self._pending_state is not None:
            model.load_state_dict(self._pending_state)
            self._pending_state = None
        self.model = model
        return model

    def ensure(self, pl_module: nn.Module) -> nn.Module:
        """The frozen model, built from the HF model inside ``pl_module`` on first use."""
        if self._model is None:
            from lit_ft.core.introspect import find_hf_model

            self.build(find_hf_model(pl_module, require_lm_head=self.require_lm_head))
        assert self._model is not None
        return self._model

    # -- device --------------------------------------------------------------------------------------------------
    @contextmanager
    def on(self, device: torch.device) -> Iterator[nn.Module]:
        """The built model on ``device`` for the ``with`` block (moved there for good, or — with ``offload`` —
        moved back to the CPU afterwards)."""
        model = self._model
        if model is None:
            raise RuntimeError(f"{self.owner}: the frozen model is used before it was built (call ensure() first)")
        if next(model.parameters()).device == torch.device(device):
            yield model
            return
        model.to(device)
        if not self.offload:
            self._pairs = None  # the tensors moved: re-pair at the next update
            yield model
            return
        try:
            yield model
        finally:
            model.to("cpu")

    # -- updates (history / EMA models) --------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, trained: nn.Module, decay: float = 0.0) -> None:
        """``θ ← decay·θ + (1 − decay)·θ_trained`` for every parameter (and floating-point buffer) of the frozen
        model, matched by name with ``trained``; ``decay=0`` copies the trained weights. A parameter without a
        counterpart in ``trained`` is an error."""
        if self._model is None:
            raise RuntimeError(f"{self.owner}: the frozen model is updated before it was built")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"{self.owner}: decay must be in [0, 1], got {decay!r}")
        if self._pairs is None or self._pairs_of != id(trained):
            self._pairs = self._pair_with(trained)
            self._pairs_of = id(trained)
        weight = 1.0 - float(decay)
        by_key: dict[tuple, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for mine, theirs in self._pairs:
            lists = by_key.setdefault((mine.device, mine.dtype), ([], []))
            lists[0].append(mine)
            lists[1].append(theirs.detach().to(mine.device, mine.dtype))
        for mine_list, theirs_list in by_key.values():
            torch._foreach_lerp_(mine_list, theirs_list, weight)

    def _pair_with(self, trained: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
        assert self._model is not None
        params = dict(trained.named_parameters())
        buffers = dict(trained.named_buffers())
        pairs = []
        for name, p in self._model.named_parameters():
            if name not in params:
                raise RuntimeError(f"{self.owner}: frozen-model parameter {name!r} has no counterpart in the trained "
                                   "model")
            pairs.append((p, params[name]))
        for name, b in self._model.named_buffers():
            if name in buffers and b.is_floating_point():
                pairs.append((b, buffers[name]))
        return pairs

    def release(self) -> None:
        """Forget the pairing with the trained model's tensors (at teardown: do not keep them alive)."""
        self._pairs = None
        self._pairs_of = None

    # -- checkpoint ----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """The frozen weights to store in the owner's checkpoint (CPU copies), or ``None`` when they are not
        persisted (``persist=False``: rebuilt from ``source``) or not built (and none were loaded)."""
        if not self.persist:
            return None
        if self._model is None:
            return self._pending_state
        return {k: v.detach().cpu().clone() for k, v in self._model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor] | None) -> None:
        """Restore weights from :meth:`state_dict` (now, or at the build if the model is not built yet)."""
        if state is None:
            return
        if self._model is not None:
            self._model.load_state_dict(state)
        else:
            self._pending_state = state


def frozen_model_property(holder: str, doc: str) -> property:
    """A read/write property exposing the model of the :class:`FrozenModel` stored at attribute ``holder`` (what a
    technique shows as ``reference_model`` / ``history_model``; tests inject a model through it)."""

    def get(self: object) -> nn.Module | None:
        return getattr(self, holder).model

    def set_(self: object, model: nn.Module | None) -> None:
        getattr(self, holder).model = model

    return property(get, set_, doc=doc)
