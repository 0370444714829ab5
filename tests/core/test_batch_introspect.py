import pytest
from torch import nn

from lit_ft.core import (
    BatchKeyError,
    ModelLayoutError,
    causal_lm_parts,
    find_decoder_layers,
    find_final_norm,
    find_hf_model,
    find_input_embeddings,
    find_lm_head,
    lm_head_is_tied,
    require_keys,
)

from helpers import PlainHFModule, tiny_config


def test_require_keys_names_missing_key_and_provider():
    with pytest.raises(BatchKeyError) as e:
        require_keys({"input_ids": 1}, ("input_ids", "labels", "sample_idx"), who="MyTechnique")
    msg = str(e.value)
    assert "MyTechnique" in msg and "'labels'" in msg and "'sample_idx'" in msg
    assert "SFTDataModule" in msg  # says what provides it
    with pytest.raises(TypeError, match="dict-like"):
        require_keys([1, 2], ("labels",), who="X")


def test_find_parts_in_a_user_module():
    m = PlainHFModule()
    hf = find_hf_model(m, require_lm_head=True)
    assert hf is m.model
    assert find_input_embeddings(hf) is hf.model.embed_tokens
    assert find_lm_head(hf) is hf.lm_head
    assert find_final_norm(hf) is hf.model.norm
    assert len(find_decoder_layers(hf)) == 2
    assert not lm_head_is_tied(hf)
    parts = causal_lm_parts(hf)
    assert parts.base is hf.model and parts.weight is hf.lm_head.weight and parts.logit_softcap is None


def test_tied_lm_head_detected():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_config(tie_word_embeddings=True))
    cfg.pop("model_type")
    hf = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg))
    assert lm_head_is_tied(hf)


def test_hf_model_found_under_other_names_and_nested():
    m = PlainHFModule()
    wrapper = nn.Module()
    wrapper.inner = nn.Sequential(nn.Linear(2, 2), m.model)
    assert find_hf_model(wrapper) is m.model


def test_unknown_layout_error_names_what_was_searched():
    with pytest.raises(ModelLayoutError) as e:
        find_hf_model(nn.Sequential(nn.Linear(2, 2)), require_lm_head=True)
    assert "searched attributes" in str(e.value) and "model" in str(e.value)
    with pytest.raises(ModelLayoutError, match="tried"):
        find_decoder_layers(nn.Linear(2, 2))
