"""BottleneckAdapters (Houlsby / Pfeiffer): placement per configuration, the adapter's math against a reference written
here, identity init leaves outputs identical, merge refused, a frozen backbone bit-identical under AdamW with weight
decay, save -> load, checkpoint -> resume, plain / PEFT / classification / verbalizer modules, clear errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_ft.callbacks import BottleneckAdapters
from lit_ft.callbacks.adapters.bottleneck import BottleneckAdapter
from lit_ft.core.adapters import AdapterError, AdapterSet, AdapterTarget, load_adapters, save_adapters
from lit_ft.modules import CausalLMModule
from tests.callbacks.adapter_checks import (
    assert_plain_module_backbone_untouched,
    assert_resume_equals_uninterrupted,
    fit_on_peft_lora,
)
from tests.helpers import (
    ListDataModule,
    quiet_trainer,
    random_batch,
    tiny_config,
    tiny_hf_model,
)


def _built(model, cb: BottleneckAdapters) -> AdapterSet:
    return cb.build_adapters(None, None, model)  # build_adapters reads only the HF model


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _reference(y, a: BottleneckAdapter, act):
    """Houlsby's adapter written out: h + f(h W_down + b_down) W_up + b_up (float64)."""
    h = y.double()
    out = act(h @ a.down.double() + a.down_bias.double()) @ a.up.double() + a.up_bias.double()
    return h + out if a.residual else out


def test_configs_place_the_adapters_and_size_the_bottleneck():
    model = tiny_hf_model()
    hidden = model.config.hidden_size
    pf = _built(model, BottleneckAdapters())
    assert [t.path for t in pf.targets] == ["mlp.down_proj"] * 2  # Pfeiffer: after the FFN only
    ho = _built(model, BottleneckAdapters(config="houlsby", reduction_factor=4))
    assert [t.path for t in ho.targets] == ["self_attn.o_proj", "mlp.down_proj"] * 2  # Houlsby: after both
    a = ho.adapter(AdapterTarget(0, "mlp.down_proj"))
    assert a.down.shape == (hidden, hidden // 4) and a.up.shape == (hidden // 4, hidden)
    assert _built(model, BottleneckAdapters(bottleneck=3)).adapter(AdapterTarget(1, "mlp.down_proj")).bottleneck == 3
    assert BottleneckAdapters(reduction_factor=10_000).bottleneck_size(hidden) == 1
    # targets override the configuration's placement; a whole sublayer keeps the hidden size
    whole = _built(model, BottleneckAdapters(targets=["mlp"], bottleneck=2))
    assert [t.path for t in whole.targets] == ["mlp", "mlp"] and whole.adapter(AdapterTarget(0, "mlp")).width == hidden


@pytest.mark.parametrize("act_name, act", [("relu", F.relu), ("gelu", F.gelu), ("swish", F.silu),
                                           ("tanh", torch.tanh)])
@pytest.mark.parametrize("residual", [True, False])
def test_adapter_math_matches_the_reference(act_name, act, residual):
    a = BottleneckAdapter(12, 3, act_name, residual, "bert")
    a.reset(torch.Generator().manual_seed(0))
    with torch.no_grad():
        a.down_bias.normal_()
        a.up_bias.normal_()
    y = torch.randn(2, 5, 12)
    torch.testing.assert_close(a(None, y).double(), _reference(y, a, act), rtol=1e-5, atol=1e-6)
    # bfloat16 outputs stay bfloat16 (the adapter computes in float32)
    assert a(None, y.bfloat16()).dtype == torch.bfloat16


def test_inits_follow_their_conventions():
    g = torch.Generator().manual_seed(0)
    bert, houlsby, ident = (BottleneckAdapter(64, 32, init=i) for i in ("bert", "houlsby", "identity"))
    for a in (bert, houlsby, ident):
        a.reset(g)
        assert not a.down_bias.any() and not a.up_bias.any()
    assert 0.015 < bert.down.std() < 0.025 and 0.015 < bert.up.std() < 0.025
    assert houlsby.down.abs().max() <= 0.02 and houlsby.up.abs().max() <= 0.02 and houlsby.up.std() > 0.005
    assert not ident.up.any() and ident.down.std() > 0.01


def test_identity_init_leaves_outputs_identical_and_near_identity_inits_barely_move_them():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    before = _logits(model, ids)
    for init in ("identity", "bert", "houlsby"):
        s = _built(model, BottleneckAdapters(config="houlsby", init=init, bottleneck=4))
        s.attach(model)
        after = _logits(model, ids)
        if init == "identity":
            assert torch.equal(after, before)
        else:  # near-identity: moved, but little
            assert 0 < (after - before).abs().max() < 0.05 * before.abs().max()
        with s.disabled():
            assert torch.equal(_logits(model, ids), before)
        s.detach()
    assert torch.equal(_logits(model, ids), before)


def test_merge_is_refused_clearly():
    module = CausalLMModule(model_config=tiny_config())
    cb = BottleneckAdapters(bottleneck=4)
    quiet_trainer([cb], max_steps=1).fit(module, datamodule=ListDataModule(n_batches=1))
    with pytest.raises(AdapterError, match=r"BottleneckAdapters: bottleneck adapters cannot be merged into the base weights \(the relu "
                                           "between the projections makes them non-linear"):
        cb.merge()
    assert cb.adapters.attached  # nothing changed
    with pytest.raises(AdapterError, match="not a linear map of their target's output and cannot be merged"):
        cb.adapters.merge()
    assert cb.adapters.attached


def test_save_load_gives_the_same_outputs(tmp_path):
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    s = _built(model, BottleneckAdapters(config="houlsby", bottleneck=4, non_linearity="swish", seed=3))
    s.attach(model)
    want = _logits(model, ids)
    save_adapters(s, tmp_path)
    fresh = tiny_hf_model().eval()
    loaded = load_adapters(fresh, tmp_path)
    assert loaded.adapter(AdapterTarget(0, "self_attn.o_proj")).non_linearity == "swish"
    assert torch.equal(_logits(fresh, ids), want)


def test_trainer_trains_only_the_adapters_backbone_bit_identical_under_weight_decay(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = BottleneckAdapters(config="houlsby", bottleneck=4, save_dir="adapters")
    quiet_trainer([cb], max_steps=3, default_root_dir=str(tmp_path)).fit(module, datamodule=ListDataModule(n_batches=3))
    for n, p in module.named_parameters():
        if not n.startswith("lit_ft_adapters."):
            assert torch.equal(p, base[n]), f"backbone tensor {n} moved"
    owned = cb.owned_param_names(module)
    assert len(owned) == 16 and all(n.startswith("lit_ft_adapters.bottleneck_adapters.adapters.layer") for n in owned)
    start = _built(tiny_hf_model(), BottleneckAdapters(config="houlsby", bottleneck=4))
    assert any(not torch.equal(p, start.state_dict()[n]) for n, p in cb.adapters.state_dict().items())  # they trained
    fresh = CausalLMModule(model_config=tiny_config())
    fresh.load_state_dict(base)
    load_adapters(fresh.model, tmp_path / "adapters")
    ids = random_batch(2, 9)["input_ids"]
    torch.testing.assert_close(_logits(fresh.model.eval(), ids), _logits(module.model.eval(), ids))


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    assert_resume_equals_uninterrupted(lambda: BottleneckAdapters(bottleneck=4, learning_rate=5e-3), tmp_path,
                                       key=lambda k: k.startswith("lit_ft_adapters.bottleneck_adapters."))


def test_drop_in_on_plain_and_peft_modules():
    assert_plain_module_backbone_untouched(lambda: BottleneckAdapters(bottleneck=4))
    cb = fit_on_peft_lora(lambda: BottleneckAdapters(config="houlsby", bottleneck=4))
    assert len(cb.adapters.targets) == 4  # found through the PEFT wrapper
    assert all(p.grad is not None for p in cb.adapters.adapters.parameters())


def test_classification_head_trains_with_the_adapters():
    from tests.contract.cases import ClassificationData, classification_module

    module = classification_module()
    cb = BottleneckAdapters(bottleneck=4)
    quiet_trainer([cb], max_steps=1).fit(module, datamodule=ClassificationData())
    head = cb.extra_trainable(module)
    assert head and all(".score." in n or ".classifier." in n for n in head)


def test_trains_the_verbalizer_module_with_a_frozen_backbone(tmp_path, tiny_tokenizer_path):
    from lit_ft.data import ClassificationDataModule
    from lit_ft.modules import VerbalizerClassificationModule
    from lit_ft.testing import write_tiny_classification_jsonl

    train = write_tiny_classification_jsonl(tmp_path / "train.jsonl", n=8)
    val = write_tiny_classification_jsonl(tmp_path / "val.jsonl", n=4, seed=1)
    dm = ClassificationDataModule(data=train, val_data=val, tokenizer=tiny_tokenizer_path, batch_size=4,
                                  template="Item: {text} Answer:", patterns=["Item: {text} Answer:", "Q: {text}"])
    torch.manual_seed(0)
    module = VerbalizerClassificationModule(model_config=tiny_config(), label_words=[["books"], ["apples"]],
                                            learning_rate=1e-2, weight_decay=0.1)
    base = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    cb = BottleneckAdapters(bottleneck=4)
    t = quiet_trainer([cb], max_steps=2)
    t.fit(module, datamodule=dm)
    assert all(torch.equal(p, base[n]) for n, p in module.model.named_parameters())
    preds = torch.cat(t.predict(module, datamodule=dm))  # the pattern ensemble, through the adapters
    assert preds.shape == (4,)


@pytest.mark.parametrize("kwargs, match", [
    ({"config": "lora"}, r"`config` must be one of \('houlsby', 'pfeiffer'\)"),
    ({"reduction_factor": 0}, "`reduction_factor` must be an int >= 1"),
    ({"bottleneck": 0}, "`bottleneck` must be an int >= 1"),
    ({"non_linearity": "sigmoid"}, "`non_linearity` must be one of"),
    ({"init": "zeros"}, "`init` must be one of"),
    ({"residual": "yes"}, "`residual` must be true or false"),
    ({"init": "identity", "residual": False}, "`init='identity'` needs `residual=true`"),
    ({"targets": []}, "`targets` must be a non-empty list"),
    ({"learning_rate": 0.0}, "`learning_rate`"),
    ({"train_task_head": "yes"}, "`train_task_head` must be true or false"),
    ({"seed": -1}, "`seed`"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BottleneckAdapters(**kwargs)


def test_unknown_target_fails_at_setup_naming_it():
    with pytest.raises(AdapterError, match="BottleneckAdapters: decoder layer 0 .* no module for target 'mlp.nope'"):
        quiet_trainer([BottleneckAdapters(targets=["mlp.nope"])], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=1))


def test_second_instance_is_refused():
    with pytest.raises(AdapterError, match="already has bottleneck_adapters adapters"):
        quiet_trainer([BottleneckAdapters(bottleneck=4), BottleneckAdapters(bottleneck=4)], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=1))

