"""LightningModules and mixins."""

from lit_ft.modules.causal_lm import CausalLMModule
from lit_ft.modules.classification import ClassificationModule
from lit_ft.modules.hf_loss_hook import install_token_loss_hook, remove_token_loss_hook
from lit_ft.modules.token_loss import TokenLossMixin, causal_lm_token_nll
from lit_ft.modules.verbalizer import VerbalizerClassificationModule

__all__ = [
    "CausalLMModule", "ClassificationModule", "TokenLossMixin", "causal_lm_token_nll",
    "install_token_loss_hook", "remove_token_loss_hook", "VerbalizerClassificationModule",
]
