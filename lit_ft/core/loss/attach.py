"""One way onto the token-loss engine for every scorer, objective and batch-weight producer: :func:`attach` picks the
integration level, registers the participant on the module's pipeline and installs the HF loss hook when needed;
:func:`detach` undoes it.

Levels (docs/architecture.md, "Integration levels"): ``"mixin"`` (level 3) for modules that are a :class:`~lit_ft.core.loss.level3.TokenLossHost`
(lit_ft's ``CausalLMModule``, or yours with ``TokenLossMixin``), ``"hook"`` (level 2) for any module whose HF causal
LM computes the loss (``return self.model(**batch).loss``), ``"batch"`` (level 1) for techniques that edit the
batch before the forward instead. ``"auto"`` picks ``mixin`` for a host, else ``hook``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from lit_ft.core.introspect import find_hf_model
from lit_ft.core.loss.batch_order import check_batch_order
from lit_ft.core.loss.hf_hook import install_token_loss_hook, remove_token_loss_hook
from lit_ft.core.loss.level3 import TokenLossHost
from lit_ft.core.loss.objectives import Objective
from lit_ft.core.loss.pipeline import TokenPipeline, token_pipeline_for
from lit_ft.core.loss.scoring import TokenScorer

INTEGRATIONS = ("auto", "mixin", "hook", "batch")


@dataclass
class Attachment:
    """Where a participant sits: its ``level``, the module's ``pipeline`` (``None`` at level ``"batch"``) and the HF
    model whose ``loss_function`` was hooked (level ``"hook"``)."""

    level: str
    pipeline: TokenPipeline | None = None
    hooked_model: nn.Module | None = None

    def begin_batch(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        """Call at ``on_train_batch_start``: binds the batch, counts the window's normalisers at its start."""
        if self.pipeline is not None:
            self.pipeline.begin_micro_batch(trainer, pl_module, batch, batch_idx)

    def bind(self, batch: Any) -> None:
        """Call at evaluation batch starts: the hook reads the batch's other keys from here."""
        if self.pipeline is not None:
            self.pipeline.current_batch = batch

    def end_window(self) -> None:
        """Call at ``on_before_optimizer_step``."""
        if self.pipeline is not None:
            self.pipeline.end_window()


def resolve_level(pl_module: Any, integration: str, who: str, allowed: tuple[str, ...] = INTEGRATIONS) -> str:
    if integration not in allowed:
        raise ValueError(f"{who}: integration must be one of {allowed}, got {integration!r}")
    level = integration
    if level == "auto":
        level = "mixin" if isinstance(pl_module, TokenLossHost) else "hook"
    if level == "mixin" and not isinstance(pl_module, TokenLossHost):
        raise TypeError(
            f"{who}(integration='mixin') needs a module that subclasses lit_ft.modules.TokenLossMixin; "
            f"{type(pl_module).__name__} does not. Use integration='auto'."
        )
    return level


def attach(trainer: Any, pl_module: Any, participant: Any, integration: str = "auto", who: str | None = None,
           allowed: tuple[str, ...] = INTEGRATIONS) -> Attachment:
    """Attach ``participant`` (a :class:`TokenScorer`, an :class:`Objective`, or any object that only needs the
    engine to run, e.g. a producer of ``batch["token_weights"]``) to ``pl_module``'s token loss."""
    who = who or type(participant).__name__
    level = resolve_level(pl_module, integration, who, allowed)
    _say_level(who, level, integration, pl_module)
    # batch editors before the readers of what they edit (lit_ft.core.loss.batch_order): one check for every
    # participant, so a misordered pair fails at setup with the fix, not later inside the loss
    check_batch_order(getattr(trainer, "callbacks", None) or ())
    if level == "batch":
        return Attachment("batch")
    pipe = token_pipeline_for(pl_module)
    assert pipe is not None
    if isinstance(participant, TokenScorer):
        pipe.register(participant)
    if isinstance(participant, Objective):
        pipe.register_objective(participant)
    if participant not in pipe.holders:
        pipe.holders.append(participant)
    hooked = None
    if level == "hook":
        hooked = find_hf_model(pl_module, require_lm_head=True)
        hook = install_token_loss_hook(hooked, pipe)
        # read live at every loss, not copied now: GradientAccumulationScheduler changes it between epochs
        hook.bind_trainer(trainer)
    return Attachment(level, pipe, hooked)


_LEVEL_WORDS = {
    "mixin": "level 3 (the module's token loss: fused, no [N, V] logits)",
    "hook": "level 2 (the HF model's loss_function, for a module that returns model(**batch).loss)",
    "batch": "level 1 (edits the batch only)",
}


def _say_level(who: str, level: str, integration: str, pl_module: Any) -> None:
    """One info line per attachment: which integration level the technique runs at, and why (users of a plain
    module otherwise cannot tell whether the fused path is in use)."""
    from lightning.pytorch.utilities import rank_zero_info

    how = "chosen for" if integration == "auto" else "as configured (integration=" + repr(integration) + ") on"
    rank_zero_info(f"{who}: {_LEVEL_WORDS.get(level, level)}, {how} {type(pl_module).__name__}")


def detach(attachment: Attachment | None, participant: Any) -> None:
    """Unregister ``participant``; the HF loss hook goes when its last participant does."""
    if attachment is None or attachment.pipeline is None:
        return
    pipe = attachment.pipeline
    if isinstance(participant, TokenScorer):
        pipe.unregister(participant)
    if isinstance(participant, Objective):
        pipe.unregister_objective(participant)
    if participant in pipe.holders:
        pipe.holders.remove(participant)
    if attachment.hooked_model is not None and not pipe.holders:
        remove_token_loss_hook(attachment.hooked_model)
