"""FusedLoss: the fused linear cross-entropy for a plain ``return self.model(**batch).loss`` module (a utility, not a
paper technique: it changes memory and time, never the loss)."""

from __future__ import annotations

import lightning.pytorch as pl

from lit_ft.core.introspect import find_hf_model
from lit_ft.core.loss.fused_forward import ACCUMULATIONS, FusedLossPatch, patch_fused_loss
from lit_ft.core.validate import check_choice, check_int


class FusedLoss(pl.Callback):
    """Compute the HF model's loss with lit_ft's fused linear cross-entropy, without ``[N, V]`` logits.

    What Liger-Kernel's fused linear cross-entropy does by replacing an architecture's forward, done generically:
    at ``setup`` the module's HF causal LM (found with :func:`lit_ft.core.introspect.find_hf_model`, through PEFT) is
    patched with :func:`lit_ft.core.loss.fused_forward.patch_fused_loss`, at ``teardown`` restored. A forward with
    ``labels`` then runs the trunk, keeps one position's logits, and computes the loss from the final hidden states
    and the lm_head in token chunks (:func:`lit_ft.kernels.fused_linear_token_ce`) — the same value and gradients as
    the model's own loss. Token-selection callbacks and objectives attached at the ``hook`` level keep working: the
    loss goes through their pipeline from the hidden states (dropped tokens then skip the lm_head matmul). Models
    that transform their logits in a way the op does not apply (Granite's ``logits_scaling``, FalconH1's
    ``lm_head_multiplier``...) are refused at setup. For lit_ft's own ``CausalLMModule`` (level 3) it changes
    nothing: that module already uses the fused op.

    Args:
        chunk_size: tokens per chunk of the fused op; ``0`` (default) = automatic (chunks whose logits are about
            the size of the hidden states). An int >= 0.
        weight_grad_accumulation: how the lm_head gradient of a bf16/fp16 model is summed over chunks: ``"fp32"``
            (default, an fp32 accumulator) or ``"input"`` (in the weight's dtype, less memory). Same result in fp32.
    """

    def __init__(self, chunk_size: int = 0, weight_grad_accumulation: str = "fp32") -> None:
        owner = type(self).__name__
        self.chunk_size = check_int(owner, "chunk_size", chunk_size, minimum=0)
        self.weight_grad_accumulation = check_choice(owner, "weight_grad_accumulation", weight_grad_accumulation,
                                                     ACCUMULATIONS)
        self._patch: FusedLossPatch | None = None

    @property
    def patch(self) -> FusedLossPatch | None:
        """The active patch (between ``setup`` and ``teardown``), else ``None``."""
        return self._patch

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._patch is not None:  # setup without a teardown in between: keep the one patch
            return
        hf_model = find_hf_model(pl_module, require_lm_head=True)
        self._patch = patch_fused_loss(hf_model, chunk_size=self.chunk_size or None,
                                       weight_grad_accumulation=self.weight_grad_accumulation)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._patch is not None:
            self._patch.remove()
            self._patch = None
