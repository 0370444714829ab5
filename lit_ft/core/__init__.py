"""The contracts every technique shares (no technique logic here): batch keys, token weights, parameter plans, the
optimizer service, model introspection."""

from lit_ft.core.batch import IGNORE_INDEX, KEY_PROVIDERS, BatchKeyError, check_token_tensor, require_keys
from lit_ft.core.introspect import (
    CausalLMParts,
    ModelLayoutError,
    causal_lm_parts,
    find_base_model,
    find_decoder_layers,
    find_final_norm,
    find_hf_model,
    find_input_embeddings,
    find_lm_head,
    lm_head_is_tied,
)
from lit_ft.core.optim import (
    assign_group_hparams,
    build_param_groups,
    optimizer_snapshot,
    rebuild_param_groups,
    reset_optimizer_state,
    sync_schedulers,
)
from lit_ft.core.params import ParamPlan, ParamPlanConflict, apply_plan, compose
from lit_ft.core.loss import (
    TokenDecision,
    TokenPipeline,
    TokenScorer,
    TokenScores,
    compose_decisions,
    global_topk_mask,
    shift_targets,
    token_pipeline_for,
)

__all__ = [
    "IGNORE_INDEX", "KEY_PROVIDERS", "BatchKeyError", "check_token_tensor", "require_keys",
    "CausalLMParts", "ModelLayoutError", "causal_lm_parts", "find_base_model", "find_decoder_layers",
    "find_final_norm", "find_hf_model", "find_input_embeddings", "find_lm_head", "lm_head_is_tied",
    "ParamPlan", "ParamPlanConflict", "apply_plan", "build_param_groups", "compose", "rebuild_param_groups",
    "reset_optimizer_state", "assign_group_hparams", "optimizer_snapshot", "sync_schedulers",
    "TokenDecision", "TokenPipeline", "TokenScorer", "TokenScores", "compose_decisions", "global_topk_mask",
    "shift_targets", "token_pipeline_for",
]
