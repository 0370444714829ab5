"""The fused token loss for a plain HF causal LM: ``model(**batch).loss`` without the ``[N, V]`` logits.

A user module that does ``return self.model(**batch).loss`` lets the HF model build its logits ``[B, T, V]`` (and
their fp32 copy and gradient inside ``ForCausalLMLoss``) — for a small model with a large vocabulary the biggest
tensors of the step. Liger-Kernel offers a fused linear cross-entropy by replacing each architecture's forward;
:func:`patch_fused_loss` does it generically for every family :mod:`lit_ft.core.introspect` understands, by wrapping
the *instance's* ``forward``:

1. a call without ``labels`` / ``shift_labels`` goes to the original forward unchanged (generation, evaluation
   of logits, ...);
2. with labels, the labels are popped, the trunk's output (final hidden states after the final norm, what the
   lm_head sees) is captured by a trunk hook (:func:`lit_ft.core.layer_hooks.register_trunk_hook`, ordered after
   the prompt injector, so prompt positions are already stripped), and the original forward runs with
   ``logits_to_keep=1`` when its signature accepts it, so only one position's logits are built;
3. the loss is :func:`lit_ft.kernels.fused_linear_token_ce` of the hidden states and the lm_head weight (bias,
   the logit scale and soft-cap from :func:`~lit_ft.core.introspect.causal_lm_parts`), with HF's
   semantics: unshifted labels shifted inside (``-100`` ignored), ``mean`` over supervised tokens, or the sum
   divided by ``num_items_in_batch`` when given (HF's gradient-accumulation normaliser); an MoE model's router
   auxiliary loss is added the way its forward adds it (``router_aux_loss_coef · aux_loss``);
4. when a lit_ft level-2 loss hook is installed (token-selection callbacks / objectives attached to a plain module,
   :mod:`lit_ft.core.loss.hf_hook`), the loss goes through that hook's :class:`~lit_ft.core.loss.pipeline.TokenPipeline`
   from the hidden states instead — :func:`lit_ft.core.loss.level3.token_loss_from_hidden`, the level-3 code — so
   selection, weights, objectives and the window normalisation are kept, and dropped tokens skip the lm_head matmul.

The returned output is the model's own (same class), with ``loss`` set. Its ``logits`` hold **only the last
position** ``[B, 1, V]`` when ``logits_to_keep`` was applied (the full ``[B, T, V]`` for a model whose forward has no
``logits_to_keep``: such a model is patched with a warning, since it saves nothing but the loss's fp32 copy).

Refusals (at patch time, :class:`FusedLossUnsupportedError`): a config carrying a transform of the logits the op does
not apply — the supported ones (Cohere's ``logit_scale``, Granite's ``logits_scaling`` (divides), HyperCLOVA X's
``logits_scaling`` (multiplies), FalconH1's ``lm_head_multiplier``, the soft-caps ``final_logit_softcapping`` /
``logits_soft_cap``) are mapped onto the op's ``logit_scale`` / ``logit_softcap`` by
:func:`lit_ft.core.introspect.logit_transforms`, the one place that knows them; any other ``*_multiplier`` /
``*scaling`` / ``*scale`` / ``*softcap`` on the logits / lm_head / output, a logit transform set only on a sub-config
(``text_config``) which introspection does not read, a ``z_loss_coefficient`` (Bamba adds a z-loss on the logits).
As a guard for transforms no config names, the first labelled call also compares the model's own last-position
logits with the lm_head applied to the captured hidden state and raises on a mismatch.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX
from lit_ft.core.introspect import (
    SUBCONFIGS,
    CausalLMParts,
    UnsupportedLogitTransformError,
    causal_lm_parts,
    unsupported_logit_transforms,
)
from lit_ft.core.layer_hooks import register_trunk_hook
from lit_ft.core.loss.hf_hook import installed_hook
from lit_ft.core.loss.level3 import _ensure_flop_formulas, token_loss_from_hidden
from lit_ft.core.loss.primitives import head_logits_error, shift_targets

__all__ = ["FusedLossPatch", "FusedLossUnsupportedError", "patch_fused_loss", "unpatch_fused_loss", "fused_patch_of",
           "ACCUMULATIONS", "ORDER_CAPTURE"]

_ATTR = "_lit_ft_fused_loss_patch"
ACCUMULATIONS = ("fp32", "input")
#: trunk-hook order of the hidden-state capture: after every band of lit_ft.core.layer_hooks (the prompt injector
#: strips its positions at ORDER_REWRITE), so the capture sees exactly what the model's lm_head sees
ORDER_CAPTURE = 10_000


class FusedLossUnsupportedError(UnsupportedLogitTransformError):
    """The model transforms its logits (or adds a loss term) in a way the fused op does not reproduce."""


def _refusals(config: Any) -> list[str]:
    """What in ``config`` the fused op cannot apply (empty when everything is supported): the logit transforms
    :mod:`lit_ft.core.introspect` does not know (the one list of them, shared with the level-3 loss), and a z-loss
    the model adds to its loss (Bamba), on the config or a sub-config."""
    if config is None:
        return []
    found = []
    for sub_name in ("", *SUBCONFIGS):
        sub = getattr(config, sub_name, None) if sub_name else config
        if sub is None or (sub_name and sub is config):
            continue
        value = getattr(sub, "z_loss_coefficient", None)
        if value:
            name = f"{sub_name}.z_loss_coefficient" if sub_name else "z_loss_coefficient"
            found.append(f"`{name}`={value!r} (the model adds a z-loss on its logits to the loss)")
    return found + unsupported_logit_transforms(config)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins / C functions
        return False


class FusedLossPatch:
    """The state of one patched model (returned by :func:`patch_fused_loss`); also a context manager that unpatches
    on exit. Attributes: ``hf_model``, ``parts`` (:class:`~lit_ft.core.introspect.CausalLMParts`), ``chunk_size``,
    ``weight_grad_accumulation``, ``keeps_one_logit`` (the forward accepts ``logits_to_keep``), ``calls`` (labelled
    calls that went through the fused op)."""

    def __init__(self, hf_model: nn.Module, parts: CausalLMParts, chunk_size: int | None,
                 weight_grad_accumulation: str) -> None:
        self.hf_model = hf_model
        self.parts = parts
        self.chunk_size = chunk_size
        self.weight_grad_accumulation = weight_grad_accumulation
        #: the instance-level ``forward`` that was there before (another wrapper), restored by unpatch; ``None``:
        #: the class's forward (unpatch deletes the instance attribute)
        self._previous_forward = hf_model.__dict__.get("forward")
        self._original = hf_model.forward  # bound: the class's forward, or the previous wrapper
        self.keeps_one_logit = _accepts(self._original, "logits_to_keep")
        self.calls = 0
        self._verified = False
        self._captured: list[torch.Tensor] | None = None  # armed (a list) only inside a labelled call
        self._handle = register_trunk_hook(parts.base, self._capture, order=ORDER_CAPTURE)
        self.active = True

    # -- the hook and the wrapper -------------------------------------------------------------------------------------
    def _capture(self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._captured is not None and not self._captured:  # the outer trunk call only
            hidden = output[0] if isinstance(output, tuple) else getattr(output, "last_hidden_state", None)
            if hidden is None:
                hidden = output[0]
            self._captured.append(hidden)
        return None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The patched ``forward`` (installed on the instance, wrapped to keep the original's signature)."""
        if args:  # positional arguments: name them, so that labels given positionally are found too
            bound = inspect.signature(self._original).bind_partial(*args, **kwargs)
            kwargs = {}
            for name, value in bound.arguments.items():
                param = bound.signature.parameters[name]
                if param.kind is inspect.Parameter.VAR_KEYWORD:
                    kwargs.update(value)
                elif param.kind is inspect.Parameter.VAR_POSITIONAL:  # pragma: no cover - HF forwards have none
                    return self._original(*args, **kwargs)
                else:
                    kwargs[name] = value
        labels = kwargs.pop("labels", None)
        shift_labels = kwargs.pop("shift_labels", None)
        if labels is None and shift_labels is None:
            return self._original(**kwargs)
        num_items = kwargs.pop("num_items_in_batch", None)
        users_keep = "logits_to_keep" in kwargs  # the caller chose the positions: keep them, verify on another call
        if self.keeps_one_logit and not users_keep:
            kwargs["logits_to_keep"] = 1
        self._captured = []
        try:
            outputs = self._original(**kwargs)
            captured = self._captured
        finally:
            self._captured = None
        if not captured:
            raise RuntimeError(
                f"lit_ft fused loss: the trunk {type(self.parts.base).__name__} of {type(self.hf_model).__name__} "
                "did not run during the forward, so no hidden states were captured"
            )
        hidden = captured[0]
        logits = outputs.logits if hasattr(outputs, "logits") else outputs[0]
        if not self._verified and not users_keep:
            self._verify(hidden, logits)
        loss = self._loss(hidden, labels, shift_labels, num_items)
        aux = getattr(outputs, "aux_loss", None)
        coef = getattr(self.hf_model, "router_aux_loss_coef", None)
        if aux is not None and coef is not None:  # what an MoE forward adds when it gets labels
            loss = loss + coef * aux.to(loss.device)
        self.calls += 1
        if isinstance(outputs, tuple):
            return (loss, *outputs)
        return type(outputs)(**{"loss": loss, **{k: v for k, v in outputs.items() if k != "loss"}})

    def _loss(self, hidden: torch.Tensor, labels: torch.Tensor | None, shift_labels: torch.Tensor | None,
              num_items: Any) -> torch.Tensor:
        _ensure_flop_formulas()  # FlopCounterMode (lit_ft.core.flops) then counts the fused lm_head, as at level 3
        targets = shift_labels if shift_labels is not None else shift_targets(labels, IGNORE_INDEX)
        targets = targets.to(hidden.device)
        hook = installed_hook(self.hf_model)
        if hook is not None:  # lit_ft's token pipeline owns the loss: level-3 code from the hidden states
            hook.note_num_items_in_batch(num_items)
            pipeline = hook.pipeline
            batch = pipeline.current_batch or {}
            training = torch.is_grad_enabled() and hidden.requires_grad
            return token_loss_from_hidden(
                pipeline, self.parts, hidden, targets, batch, training=training,
                accumulate=hook.accumulate_grad_batches, world_size=hook.world_size,
                count_batch=batch or {"labels": labels if labels is not None else _unshift(targets)},
                weight_grad_accumulation=self.weight_grad_accumulation, chunk_size=self.chunk_size,
            ).loss
        from lit_ft.kernels import fused_linear_token_ce

        normalizer = None
        if num_items is not None:  # HF: reduction="sum" then / num_items_in_batch
            normalizer = torch.as_tensor(num_items).to(device=hidden.device)
        B, T, D = hidden.shape
        return fused_linear_token_ce(
            hidden.reshape(B * T, D), self.parts.weight, targets.reshape(B * T), bias=self.parts.bias,
            reduction="mean", normalizer=normalizer, logit_softcap=self.parts.logit_softcap,
            logit_scale=self.parts.logit_scale, chunk_size=self.chunk_size,
            weight_grad_accumulation=self.weight_grad_accumulation,
        )

    @torch.no_grad()
    def _verify(self, hidden: torch.Tensor, logits: torch.Tensor) -> None:
        """Once: the model's own last-position logits must equal the lm_head (+ the transforms the op applies) of
        the captured last hidden state — catches a logit transform no config key names."""
        theirs = logits[:, -1].float()
        ours, err, agree = head_logits_error(self.parts, hidden[:, -1], theirs)
        if theirs.shape != ours.shape:
            raise FusedLossUnsupportedError(
                f"lit_ft fused loss: {type(self.hf_model).__name__}'s logits have shape {tuple(logits.shape)}, not "
                f"[B, *, V={ours.shape[-1]}] from its lm_head; the fused loss cannot stand in for its loss"
            )
        if not agree:
            self.remove()
            raise FusedLossUnsupportedError(
                f"lit_ft fused loss: {type(self.hf_model).__name__} transforms its logits after the lm_head in a way "
                f"lit_ft does not know (max |difference| {err:.3g} between its logits and lm_head(hidden) with "
                f"logit_scale={self.parts.logit_scale}, logit_softcap={self.parts.logit_softcap}); unpatched. "
                "Train it without the fused loss."
            )
        self._verified = True

    # -- life cycle -----------------------------------------------------------------------------------------------
    def remove(self) -> None:
        """Restore the original ``forward`` and remove the trunk hook (idempotent)."""
        if not self.active:
            return
        self.active = False
        self._handle.remove()
        if self._previous_forward is None:
            self.hf_model.__dict__.pop("forward", None)
        else:
            self.hf_model.__dict__["forward"] = self._previous_forward
        if self.hf_model.__dict__.get(_ATTR) is self:
            del self.hf_model.__dict__[_ATTR]

    def __enter__(self) -> FusedLossPatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def _unshift(targets: torch.Tensor) -> torch.Tensor:
    """Labels whose shifted targets are ``targets`` (only their count matters: the normaliser's fallback)."""
    return F.pad(targets, (1, 0), value=IGNORE_INDEX)[..., :-1]


def fused_patch_of(hf_model: nn.Module) -> FusedLossPatch | None:
    """The active :class:`FusedLossPatch` of ``hf_model``, or ``None``."""
    return hf_model.__dict__.get(_ATTR)


def patch_fused_loss(hf_model: nn.Module, *, chunk_size: int | None = None,
                     weight_grad_accumulation: str = "fp32") -> FusedLossPatch:
    """Make ``hf_model(..., labels=...)`` compute its loss with the fused linear cross-entropy (no ``[N, V]`` logits).

    Liger-Kernel-style fused linear cross-entropy (the lm_head projection and the per-token CE in token chunks, see
    :func:`lit_ft.kernels.fused_linear_token_ce`), installed on one model instance for any causal LM whose trunk,
    lm_head and logit transforms :func:`lit_ft.core.introspect.causal_lm_parts` finds. See the module docstring for
    what the patched forward does and returns (``outputs.logits`` holds only the last position ``[B, 1, V]``).

    Args:
        hf_model: a transformers causal LM (the innermost one under PEFT: the one whose forward builds the logits).
        chunk_size: tokens per chunk of the op (``None``: chunks whose logits are about the size of the hidden
            states); an int >= 1.
        weight_grad_accumulation: ``"fp32"`` (an fp32 accumulator for the lm_head gradient of bf16/fp16 models) or
            ``"input"`` (accumulate in the weight's dtype); identical for fp32 models.

    Returns:
        The :class:`FusedLossPatch` (``.remove()`` or :func:`unpatch_fused_loss` restores the model; also a context
        manager).

    Raises:
        RuntimeError: ``hf_model`` is already patched (unpatch it first).
        FusedLossUnsupportedError: its config carries a logit transform or loss term the op does not apply.
        ValueError: a bad ``chunk_size`` / ``weight_grad_accumulation``.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"patch_fused_loss: `chunk_size` must be an int >= 1 or None (= automatic), got "
                         f"{chunk_size!r}")
    if weight_grad_accumulation not in ACCUMULATIONS:
        raise ValueError(f"patch_fused_loss: `weight_grad_accumulation` must be one of {ACCUMULATIONS}, got "
                         f"{weight_grad_accumulation!r}")
    if fused_patch_of(hf_model) is not None:
        raise RuntimeError(f"patch_fused_loss: {type(hf_model).__name__} is already patched; call "
                           "unpatch_fused_loss(model) first")
    refused = _refusals(getattr(hf_model, "config", None))
    if refused:
        raise FusedLossUnsupportedError(
            f"patch_fused_loss: {type(hf_model).__name__} cannot use the fused loss: its config has "
            + "; ".join(refused) + ". The fused op applies the logit transforms lit_ft.core.introspect."
            "logit_transforms lists (a logit scale and a soft-cap)."
        )
    parts = causal_lm_parts(hf_model)
    patch = FusedLossPatch(hf_model, parts, chunk_size, weight_grad_accumulation)
    if not patch.keeps_one_logit:
        warnings.warn(
            f"patch_fused_loss: {type(hf_model).__name__}.forward has no `logits_to_keep`: it still builds its full "
            "[B, T, V] logits (only the loss's own fp32 copy and gradient are saved)", stacklevel=2
        )
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return patch.forward(*args, **kwargs)

    functools.update_wrapper(wrapper, patch._original)  # same name, docstring and signature (generate() reads it)
    hf_model.__dict__["forward"] = wrapper
    hf_model.__dict__[_ATTR] = patch
    return patch


def unpatch_fused_loss(hf_model: nn.Module) -> bool:
    """Undo :func:`patch_fused_loss` on ``hf_model``; returns whether it was patched."""
    patch = fused_patch_of(hf_model)
    if patch is None:
        return False
    patch.remove()
    return True
