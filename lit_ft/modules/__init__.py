"""LightningModules and mixins."""

from lit_ft.modules.black_box_prompt import BlackBoxPromptLearning
from lit_ft.modules.causal_lm import CausalLMModule
from lit_ft.modules.classification import ClassificationModule
from lit_ft.modules.preference import PreferenceModule
from lit_ft.modules.self_training import SelfTrainingModule
from lit_ft.modules.token_loss import TokenLossMixin
from lit_ft.modules.verbalizer import VerbalizerClassificationModule

__all__ = [
    "BlackBoxPromptLearning", "CausalLMModule", "ClassificationModule", "PreferenceModule", "SelfTrainingModule", "TokenLossMixin", "VerbalizerClassificationModule",
]
