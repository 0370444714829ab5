"""LinearAdapters (LiST) and the shared adapter life cycle (lit_ft.core.adapters, callbacks/_adapter.py): outputs at
zero init, exact merge (Linear and GPT-2's Conv1D), a frozen backbone that stays bit-identical under AdamW with
weight decay, save -> load, checkpoint -> resume, plain / PEFT / classification modules, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_ft.callbacks import LinearAdapters
from lit_ft.callbacks.adapters.linear import LinearAdapter
from lit_ft.core.adapters import (
    AdapterError,
    AdapterSet,
    AdapterTarget,
    load_adapters,
    resolve_targets,
    save_adapters,
)
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


def _adapters(model, init="list", std=0.02, seed=0, targets=("attention_output", "mlp_output"), r=8):
    g = torch.Generator().manual_seed(seed)
    built = {}
    for t, m in resolve_targets(model, list(targets)).items():
        a = LinearAdapter(m.out_features, r, std, init)
        a.reset(g)
        built[t] = a
    return AdapterSet(built)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_targets_resolve_per_architecture_and_name_what_is_missing():
    model = tiny_hf_model()
    found = resolve_targets(model, ["attention_output", "mlp_output"])
    assert [t.path for t in found] == ["self_attn.o_proj", "mlp.down_proj"] * 2
    assert [t.layer for t in found] == [0, 0, 1, 1] and found[AdapterTarget(1, "mlp.down_proj")] is \
        model.model.layers[1].mlp.down_proj
    assert list(resolve_targets(model, ["mlp.up_proj"], layers=[1])) == [AdapterTarget(1, "mlp.up_proj")]
    with pytest.raises(AdapterError, match=r"decoder layer 0 \(LlamaDecoderLayer\) has no module for target "
                                           r"'mlp.fc9'.*its modules: \[.*'mlp.down_proj'"):
        resolve_targets(model, ["mlp.fc9"])
    with pytest.raises(AdapterError, match="layer 5 is out of range: the model has 2 decoder layers"):
        resolve_targets(model, ["mlp"], layers=[5])


def test_identity_init_leaves_outputs_identical_and_list_init_moves_them():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    before = _logits(model, ids)
    zero = _adapters(model, init="identity")
    zero.attach(model)
    assert torch.equal(_logits(model, ids), before)
    zero.detach()
    list_init = _adapters(model, init="list")
    list_init.attach(model)
    moved = _logits(model, ids)
    assert (moved - before).abs().max() > 1e-4
    with list_init.disabled():
        assert torch.equal(_logits(model, ids), before)
    list_init.detach()
    assert torch.equal(_logits(model, ids), before)


def test_linear_adapter_math_and_exact_merge():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    adapters = _adapters(model, std=0.2, r=4)
    down = model.model.layers[0].mlp.down_proj
    x = torch.randn(3, down.in_features)
    a = adapters.adapter(AdapterTarget(0, "mlp.down_proj"))
    y = down(x)
    torch.testing.assert_close(a(x, y), y + y @ a.w1 @ a.w2)  # y + y W1 W2
    adapters.attach(model)
    with_adapters = _logits(model, ids)
    adapters.merge()
    assert not adapters.attached
    torch.testing.assert_close(_logits(model, ids), with_adapters, rtol=1e-5, atol=1e-5)


def test_merge_into_gpt2_conv1d_is_exact():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)).eval()
    found = resolve_targets(model, ["attention_output", "mlp_output"])
    assert [t.path for t in found] == ["attn.c_proj", "mlp.c_proj"] * 2
    g = torch.Generator().manual_seed(1)
    built = {}
    for t, m in found.items():
        built[t] = LinearAdapter(m.weight.shape[1], 4, 0.2)
        built[t].reset(g)
    adapters = AdapterSet(built)
    adapters.attach(model)
    ids = torch.randint(0, 64, (2, 7))
    with_adapters = _logits(model, ids)
    adapters.merge()
    torch.testing.assert_close(_logits(model, ids), with_adapters, rtol=1e-5, atol=1e-5)


def test_save_load_gives_the_same_outputs(tmp_path):
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    adapters = _adapters(model, std=0.1)
    adapters.attach(model)
    want = _logits(model, ids)
    save_adapters(adapters, tmp_path, metadata={"base_model": "tiny"})
    assert {p.name for p in tmp_path.iterdir()} == {"adapters.safetensors", "adapter_config.json"}
    fresh = tiny_hf_model().eval()
    loaded = load_adapters(fresh, tmp_path)
    assert loaded.attached
    assert torch.equal(_logits(fresh, ids), want)
    with pytest.raises(AdapterError, match="is not a lit_ft adapter artifact"):
        load_adapters(fresh, tmp_path / "nowhere")


def test_trainer_trains_only_the_adapters_backbone_bit_identical_under_weight_decay(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = LinearAdapters(bottleneck=4, save_dir="adapters")
    quiet_trainer([cb], max_steps=3, default_root_dir=str(tmp_path)).fit(module, datamodule=ListDataModule(n_batches=3))
    for n, p in module.named_parameters():
        if n.startswith("lit_ft_adapters."):
            continue
        assert torch.equal(p, base[n]), f"backbone tensor {n} moved"
    owned = cb.owned_param_names(module)
    assert len(owned) == 8 and all(n.startswith("lit_ft_adapters.linear_adapters.adapters.layer") for n in owned)
    # the trained adapters reload onto a fresh copy of the base and give the trained model's outputs
    fresh = CausalLMModule(model_config=tiny_config())
    fresh.load_state_dict({n: v for n, v in base.items()})
    load_adapters(fresh.model, tmp_path / "adapters")
    ids = random_batch(2, 9)["input_ids"]
    torch.testing.assert_close(_logits(fresh.model.eval(), ids), _logits(module.model.eval(), ids))
    # merged: the same outputs, no adapters left on the module
    want = _logits(module.model, ids)
    cb.merge()
    assert not hasattr(module, "lit_ft_adapters")
    torch.testing.assert_close(_logits(module.model, ids), want, rtol=1e-5, atol=1e-5)


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    assert_resume_equals_uninterrupted(lambda: LinearAdapters(bottleneck=4, learning_rate=5e-3), tmp_path)


def test_drop_in_on_plain_and_peft_modules():
    assert_plain_module_backbone_untouched(lambda: LinearAdapters(bottleneck=4))
    cb = fit_on_peft_lora(lambda: LinearAdapters(bottleneck=4))
    assert len(cb.adapters.targets) == 4  # found through the PEFT wrapper
    assert all(p.grad is not None or not p.requires_grad for p in cb.adapters.parameters())


def test_classification_head_trains_with_the_adapters(tmp_path):
    from lit_ft.modules import ClassificationModule
    from tests.contract.cases import ClassificationData, classification_module

    module = classification_module()
    cb = LinearAdapters(bottleneck=4)
    quiet_trainer([cb], max_steps=1).fit(module, datamodule=ClassificationData())
    head = cb.extra_trainable(module)
    assert head and all(".score." in n or ".classifier." in n for n in head)
    assert isinstance(module, ClassificationModule)
    assert LinearAdapters(bottleneck=4, train_task_head=False).extra_trainable(module) == []


@pytest.mark.parametrize("kwargs, match", [
    ({"bottleneck": 0}, "`bottleneck` must be an int >= 1"),
    ({"targets": []}, "`targets` must be a non-empty list"),
    ({"init": "zeros"}, "`init` must be one of"),
    ({"init_std": -1.0}, "`init_std`"),
    ({"learning_rate": 0.0}, "`learning_rate`"),
    ({"train_task_head": "yes"}, "`train_task_head` must be true or false"),
    ({"seed": -1}, "`seed`"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearAdapters(**kwargs)


def test_unknown_target_fails_at_setup_naming_it():
    with pytest.raises(AdapterError, match="LinearAdapters: decoder layer 0 .* no module for target 'mlp.nope'"):
        quiet_trainer([LinearAdapters(targets=["mlp.nope"])], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=1))


def test_merge_refuses_adapters_that_are_not_linear():
    from lit_ft.core.adapters import Adapter

    class Relu(Adapter):
        def forward(self, x, y):
            return y + torch.relu(y)

    model = tiny_hf_model()
    s = AdapterSet({t: Relu() for t in resolve_targets(model, ["mlp_output"])})
    s.attach(model)
    with pytest.raises(AdapterError, match="not a linear map of their target's output and cannot be merged"):
        s.merge()
    assert s.attached  # nothing changed
    copy.deepcopy(model)  # still a plain model


def test_attached_set_holds_only_the_adapter_tensors():
    model = tiny_hf_model()
    s = _adapters(model, r=4)
    keys = set(s.state_dict())
    s.attach(model)
    assert set(s.state_dict()) == keys and len(keys) == 8  # the model is not a submodule of the set
    assert sum(p.numel() for p in s.parameters()) == 4 * 2 * 4 * model.config.hidden_size


def test_parameter_picture_shows_only_the_adapters_trainable(tmp_path):
    """The adapters family draws the parameter family's map (ParamPlanCallback): the backbone cells at 0, the
    adapter tensors (outside the HF model: the "extra" row) fully trainable."""
    module = CausalLMModule(model_config=tiny_config())
    cb = LinearAdapters(bottleneck=4, picture_every_n_steps=1)
    quiet_trainer([cb], max_steps=1, default_root_dir=str(tmp_path)).fit(module, datamodule=ListDataModule(n_batches=1))
    table = cb.last_param_map
    assert table is not None and cb.last_picture is not None and cb.last_picture.endswith("param_map_step1.png")
    assert table.trainable == set(cb.owned_param_names(module))
    assert all(table.share(r, k) == 0.0 for (r, k) in table.cells if r != "extra")
    assert {table.share(r, k) for (r, k) in table.cells if r == "extra"} == {1.0}
