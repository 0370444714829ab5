"""Issue 18 item 2: models whose forward transforms the logits after the lm_head under other config names (Granite's
``logits_scaling`` divides, FalconH1's ``lm_head_multiplier``, HyperCLOVA X's ``logits_scaling`` multiplies,
RecurrentGemma's ``logits_soft_cap``) got the wrong loss from lit_ft (16.17 vs HF's 6.06) in training and in every
reference / history / scoring NLL. Every causal LM of the installed transformers that builds from a tiny config is
compared with HF's own loss here: lit_ft's per-token NLL must give HF's loss, or lit_ft must refuse the model with a
clear error (:class:`lit_ft.core.introspect.UnsupportedLogitTransformError`)."""

from __future__ import annotations

import pytest
import torch

from lit_ft.core.introspect import (
    TRANSFORM_KEY,
    ModelLayoutError,
    UnsupportedLogitTransformError,
    causal_lm_parts,
)
from lit_ft.core.loss import causal_lm_token_nll, shift_targets, verify_logit_transforms
from lit_ft.core.loss.fused_forward import patch_fused_loss
from lit_ft.modules import CausalLMModule

V = 96
#: tiny sizes, set on a family's config only where the config has that attribute
_SHRINK = dict(
    vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
    d_model=32, n_inner=64, ffn_dim=64, num_layers=2, num_heads=4, moe_intermediate_size=32,
    shared_expert_intermediate_size=32, num_experts=4, num_local_experts=4, n_routed_experts=4,
    num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=8,
    mamba_expand=2, state_size=8, ssm_state_size=8, linear_num_key_heads=2, linear_num_value_heads=4,
    linear_key_head_dim=8, linear_value_head_dim=8, global_head_dim=8, kv_channels=8, rotary_dim=8,
    partial_rotary_factor=1.0, sliding_window=16, attention_window_size=16, block_size=16, lru_width=32,
    hidden_size_per_layer_input=8, vocab_size_per_layer_input=V, num_kv_shared_layers=0, laurel_rank=8,
    output_router_logits=False, use_cache=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
)
#: non-trivial values for the logit transforms a config carries (so that a transform that is ignored shows)
_TRANSFORMS = dict(logit_scale=0.5, logits_scaling=4.0, lm_head_multiplier=0.5, final_logit_softcapping=3.0,
                   logits_soft_cap=3.0)
_MAX_PARAMS = 30_000_000
#: families whose tiny config needs other sizes than _SHRINK (MiniCPM3: multi-head latent attention; dim_model_base
#: below hidden_size makes its logits_scaling (hidden_size / dim_model_base) bite)
_FAMILY = {
    "minicpm3": dict(vocab_size=V, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=4, max_position_embeddings=64, q_lora_rank=16, kv_lora_rank=16,
                     qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, dim_model_base=16, use_cache=False),
}


def _causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _tiny_model(model_type: str):
    """A tiny random model of ``model_type`` in eval mode, or ``pytest.skip`` with the reason it does not build."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        default = AutoConfig.for_model(model_type)
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"{model_type}: no default config ({type(err).__name__}: {err})"[:300])
    def has(key: str) -> bool:
        try:
            return hasattr(default, key)
        except Exception:  # noqa: BLE001 - per-layer (heterogeneous) configs refuse reading some global keys
            return False

    kwargs = _FAMILY.get(model_type) or {k: v for k, v in _SHRINK.items() if has(k)}
    for key in vars(default):
        if model_type in _FAMILY:
            break
        if key in _TRANSFORMS:
            kwargs[key] = _TRANSFORMS[key]
        elif TRANSFORM_KEY.search(key) and isinstance(getattr(default, key), (int, float)) \
                and not isinstance(getattr(default, key), bool):
            kwargs[key] = 2.0  # a transform lit_ft does not know: it must be refused, or not change the logits
    try:
        cfg = AutoConfig.for_model(model_type, **kwargs)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in meta.parameters())
        if n > _MAX_PARAMS:
            pytest.skip(f"{model_type}: {n / 1e6:.0f}M parameters at the tiny sizes (its config has other size keys)")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    except pytest.skip.Exception:
        raise
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"{model_type}: does not build from a tiny config ({type(err).__name__}: {err})"[:300])
    return model.eval()


def _batch(vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 7:9] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("model_type", _causal_lm_types())
def test_loss_equals_hf_or_the_model_is_refused(model_type):
    """issue 18 item 2: for every causal LM that builds tiny, lit_ft's per-token NLL (the one behind the level-3 loss
    and every reference / history / scoring NLL) averages to the causal LM loss of the model's own logits, or lit_ft
    refuses the model clearly."""
    model = _tiny_model(model_type)
    vocab = int(model.get_output_embeddings().weight.shape[0]) if model.get_output_embeddings() is not None else V
    batch = _batch(min(vocab, V))
    try:
        with torch.no_grad():
            out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"{model_type}: HF's own forward fails on token ids alone ({type(err).__name__}: {err})"[:300])
    logits = getattr(out, "logits", None)
    if logits is None or not torch.isfinite(logits).all():
        pytest.skip(f"{model_type}: HF returns no finite logits")
    # the causal LM loss of the model's own logits (HF's ForCausalLMLoss; computed here because a few families'
    # own `loss` differs in ways that are not logit transforms: BartForCausalLM does not shift its labels)
    hf_loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                                batch["labels"][:, 1:].flatten(), ignore_index=-100)
    try:
        parts = causal_lm_parts(model)
        verify_logit_transforms(parts)
    except UnsupportedLogitTransformError as err:
        assert type(model).__name__ in str(err) and "lit_ft" in str(err)
        return  # refused, with a message naming the model
    except ModelLayoutError as err:
        pytest.skip(f"{model_type}: lit_ft finds no trunk / lm_head ({err})"[:300])
    nll = causal_lm_token_nll(model, batch)
    targets = shift_targets(batch["labels"])
    ours = nll.sum() / (targets != -100).sum()
    torch.testing.assert_close(ours.float(), hf_loss.float(), rtol=2e-4, atol=2e-5,
                               msg=f"{model_type}: lit_ft's loss {ours.item():.5f} != HF's {hf_loss.item():.5f}")


def _granite_config(**kw) -> dict:
    return dict(model_type="granite", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, logits_scaling=8.0, **kw)


@pytest.mark.parametrize("config", [
    _granite_config(),
    dict(model_type="falcon_h1", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, lm_head_multiplier=0.25),
], ids=["granite", "falcon_h1"])
def test_causal_lm_module_trains_with_hfs_loss(config):
    """issue 18 item 2: CausalLMModule's training loss (level 3, fused op) equals HF's loss on the same model, and
    its gradient equals HF's (it was 16.17 vs 6.06 for Granite)."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=config)
    module.model.eval()  # dropout off for both
    batch = _batch(V, seed=1)
    hf = module.model(**batch)
    hf.loss.backward()
    g_hf = module.model.get_output_embeddings().weight.grad.clone()
    module.model.zero_grad(set_to_none=True)
    out = module.compute_token_loss(batch, module.model)
    out.loss.backward()
    torch.testing.assert_close(out.loss.detach(), hf.loss.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.model.get_output_embeddings().weight.grad, g_hf, rtol=1e-4, atol=1e-6)


def test_patch_fused_loss_supports_granite_and_uses_the_same_transforms():
    """issue 18 item 2: patch_fused_loss reads the transforms from the introspection (no list of its own): Granite
    is patched and gives HF's loss."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(_granite_config())
    cfg.pop("model_type")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("granite", **cfg)).eval()
    batch = _batch(V, seed=2)
    ref = model(**batch).loss
    with patch_fused_loss(model):
        got = model(**batch).loss
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_unknown_transforms_are_refused_everywhere():
    """issue 18 item 2: a logit transform lit_ft does not apply is refused by the introspection itself (so the
    level-3 loss, reference NLLs and the fused patch all refuse it), and a transform no config key names is caught
    by verify_logit_transforms (CausalLMModule runs it at construction)."""
    from helpers import tiny_hf_model

    model = tiny_hf_model()
    model.config.output_multiplier = 2.0
    with pytest.raises(UnsupportedLogitTransformError, match=r"`output_multiplier`=2\.0"):
        causal_lm_parts(model)
    with pytest.raises(UnsupportedLogitTransformError, match="output_multiplier"):
        causal_lm_token_nll(model, _batch(V))
    model.config.output_multiplier = 1.0
    causal_lm_parts(model)  # a factor of 1 changes nothing: accepted
    model.config.logits_scaling = 3.0  # llama does not use it: which way it would act is unknown
    with pytest.raises(UnsupportedLogitTransformError, match="logits_scaling"):
        causal_lm_parts(model)
    del model.config.logits_scaling
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 2.0)
    with pytest.raises(UnsupportedLogitTransformError, match="transforms its logits"):
        verify_logit_transforms(causal_lm_parts(model))
