"""The user-facing level-3 mixin: the causal-LM loss from final hidden states + lm_head through the fused op.

The engine lives in :mod:`lit_ft.core.loss` (:class:`~lit_ft.core.loss.level3.TokenLossHost`); this class is the
name users put in their bases.
"""

from __future__ import annotations

from lit_ft.core.loss.level3 import TokenLossHost, TokenLossOutput

__all__ = ["TokenLossMixin", "TokenLossOutput"]


class TokenLossMixin(TokenLossHost):
    """LightningModule mixin: the causal-LM loss through the fused linear-CE op, with lit_ft's token scorers and
    objectives.

    Use it before ``LightningModule`` in the bases (``class M(TokenLossMixin, L.LightningModule)``) and call
    :meth:`compute_token_loss` in ``training_step`` / ``validation_step``. Registered token scorers (lit_ft
    callbacks such as :class:`lit_ft.callbacks.ExcessLossSelection`) and objectives attach to this module
    automatically; dropped tokens skip the lm_head matmul and no ``[N, V]`` logits tensor is built.

    Class attributes you may override: ``token_loss_impl`` (``"auto" | "torch" | "triton"``, the fused op's
    dispatch), ``token_loss_weight_grad_accumulation`` (``"fp32" | "input"``: how the op sums the lm_head gradient
    over token chunks for bf16/fp16 models, see :func:`lit_ft.kernels.fused_linear_token_ce`) and
    :meth:`token_loss_model` (which HF model to use; default: the one :func:`lit_ft.core.find_hf_model` finds).
    If you override ``on_train_batch_start`` or ``on_before_optimizer_step``, call ``super()`` (the engine counts the
    accumulation window's normalisers there).
    """
