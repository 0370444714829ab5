"""Objectives family: extra loss terms on the token-loss engine (One-Token Rollout, CAFT multi-token heads,
critical-token DPO, token relation distillation). Each subclasses :class:`lit_ft.callbacks._objective.ObjectiveCallback`
(or, where it owns extra modules, is a module mixin over :class:`lit_ft.core.loss.TokenLossHost`) and brings its own
normaliser; vocabulary-wide work goes through :func:`lit_ft.kernels.chunked_linear_loss`. (PANDA's distillation, an
objective too, belongs to the prompt family.)"""

from lit_ft.callbacks.objectives.critical_token_scoring import CriticalTokenScoring
from lit_ft.callbacks.objectives.multi_token_heads import MultiTokenHeads
from lit_ft.callbacks.objectives.one_token_rollout import OneTokenRollout
from lit_ft.callbacks.objectives.token_dpo import TokenDPO
from lit_ft.callbacks.objectives.token_relation_distillation import TokenRelationDistillation

__all__ = ["CriticalTokenScoring", "MultiTokenHeads", "OneTokenRollout", "TokenDPO", "TokenRelationDistillation"]
