"""The token-loss engine: one place for everything a token-level technique or an extra loss term plugs into.

- :mod:`~lit_ft.core.loss.primitives` — target shift, final hidden states, per-token NLL/entropy/LSE, logits at rows
- :mod:`~lit_ft.core.loss.scoring` / :mod:`~lit_ft.core.loss.selection` — the scorer contract and top-k helpers
- :mod:`~lit_ft.core.loss.objectives` — the objective contract (a loss sum and its own normaliser)
- :mod:`~lit_ft.core.loss.window` / :mod:`~lit_ft.core.loss.pipeline` — counting normalisers ahead, combining terms
- :mod:`~lit_ft.core.loss.hf_hook` (level 2), :mod:`~lit_ft.core.loss.level3` (level 3)
- :mod:`~lit_ft.core.loss.attach` — :func:`attach` / :func:`detach`, the one way onto the engine
"""

from lit_ft.core.loss.attach import INTEGRATIONS, Attachment, attach, detach, resolve_level
from lit_ft.core.loss.hf_hook import TokenWeightedLoss, install_token_loss_hook, installed_hook, remove_token_loss_hook
from lit_ft.core.loss.level3 import TokenLossHost, TokenLossOutput
from lit_ft.core.loss.objectives import Objective, ObjectiveInputs
from lit_ft.core.loss.pipeline import TOKEN_TERM, TokenPipeline, token_pipeline_for
from lit_ft.core.loss.primitives import (
    MODEL_INPUT_KEYS,
    TOKEN_QUANTITIES,
    TokenStats,
    apply_logit_transforms,
    batch_token_weights,
    causal_lm_token_nll,
    final_hidden_states,
    logits_at,
    model_inputs,
    shift_targets,
    stats_from_logits,
    supervised_count,
    token_stats,
    verify_logit_transforms,
)
from lit_ft.core.loss.scoring import TokenDecision, TokenScorer, TokenScores, compose_decisions
from lit_ft.core.loss.selection import (
    dist_ready,
    gather_varlen,
    global_topk_mask,
    per_response_min_max,
    per_response_topk_mask,
)

__all__ = [
    "INTEGRATIONS", "Attachment", "attach", "detach", "resolve_level",
    "TokenWeightedLoss", "install_token_loss_hook", "installed_hook", "remove_token_loss_hook",
    "TokenLossHost", "TokenLossOutput", "Objective", "ObjectiveInputs", "TOKEN_TERM", "TokenPipeline",
    "token_pipeline_for", "MODEL_INPUT_KEYS", "TOKEN_QUANTITIES", "TokenStats", "apply_logit_transforms",
    "batch_token_weights", "causal_lm_token_nll", "final_hidden_states", "logits_at", "model_inputs",
    "shift_targets", "stats_from_logits", "supervised_count", "token_stats", "TokenDecision", "TokenScorer",
    "TokenScores", "compose_decisions", "dist_ready", "gather_varlen", "global_topk_mask", "per_response_min_max",
    "per_response_topk_mask", "verify_logit_transforms",
]
