"""lit_ft.core.frozen.FrozenModel: building from a copy / a folder / a factory, freezing, checkpoint round trip,
EMA updates, errors."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from lit_ft.core.frozen import FrozenModel
from lit_ft.core.introspect import ModelLayoutError
from lit_ft.testing import tiny_llama_config

from helpers import PlainHFModule, assert_state_dicts_equal, tiny_hf_model


def _assert_frozen(model, dtype=torch.float32):
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert all(p.dtype == dtype for p in model.parameters())


def test_copy_is_frozen_hook_free_and_cast():
    trained = tiny_hf_model(train=True)
    trained.model.layers[0].register_forward_pre_hook(lambda m, a: None)
    trained.__dict__["_lit_ft_marker"] = object()  # what lit_ft's loss hook leaves on a model
    holder = FrozenModel(owner="Test", dtype="bfloat16")
    frozen = holder.build(trained)
    assert holder.model is frozen and frozen is not trained
    _assert_frozen(frozen, torch.bfloat16)
    assert not frozen.model.layers[0]._forward_pre_hooks and "_lit_ft_marker" not in frozen.__dict__
    for (n, p), q in zip(trained.named_parameters(), frozen.parameters()):
        assert torch.equal(p.detach().to(torch.bfloat16), q), n
    assert trained.training and all(p.requires_grad for p in trained.parameters())  # the original is untouched


def test_factory_and_folder_sources(tmp_path):
    trained = tiny_hf_model(seed=0)
    other = tiny_hf_model(seed=1)
    seen = []
    holder = FrozenModel(lambda m: seen.append(m) or other, owner="Test")
    assert holder.build(trained) is other and seen == [trained]
    _assert_frozen(other)

    other.save_pretrained(tmp_path / "ref")
    loaded = FrozenModel(str(tmp_path / "ref"), owner="Test").build(trained)
    _assert_frozen(loaded)
    assert_state_dicts_equal(loaded.state_dict(), other.state_dict())

    cfg = dict(tiny_llama_config(vocab_size=500))
    cfg.pop("model_type")
    AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg)).save_pretrained(tmp_path / "wide")
    with pytest.raises(ValueError, match="Test: model .* has vocab_size 500 but the trained model has 384"):
        FrozenModel(str(tmp_path / "wide"), owner="Test").build(trained)


def test_ensure_builds_once_from_the_lightning_module():
    module = PlainHFModule()
    holder = FrozenModel(owner="Test")
    first = holder.ensure(module)
    assert holder.ensure(module) is first
    assert_state_dicts_equal(first.state_dict(), module.model.state_dict())
    with pytest.raises(ModelLayoutError):
        FrozenModel(owner="Test").ensure(torch.nn.Linear(2, 2))


def test_checkpoint_round_trip_keeps_the_frozen_weights_of_the_first_run():
    trained = tiny_hf_model(seed=0)
    holder = FrozenModel(owner="Test")
    holder.build(trained)
    saved = holder.state_dict()
    assert saved is not None and all(t.device.type == "cpu" for t in saved.values())
    initial = {k: v.clone() for k, v in saved.items()}
    with torch.no_grad():  # training moves the weights; the saved copy must not follow
        for p in holder.model.parameters():
            p.add_(1.0)
    assert_state_dicts_equal(saved, initial)

    moved = tiny_hf_model(seed=1)  # a resumed run: the trained weights are no longer the initial ones
    resumed = FrozenModel(owner="Test")
    resumed.load_state_dict(initial)
    assert resumed.state_dict() is initial  # a loaded, not yet built state is saved again as is
    assert_state_dicts_equal(resumed.build(moved).state_dict(), initial)

    # a model loaded from a folder (or a factory) is rebuilt from its source: nothing persisted unless asked
    assert FrozenModel(lambda m: tiny_hf_model(seed=2), owner="Test").state_dict() is None
    by_factory = FrozenModel(lambda m: tiny_hf_model(seed=2), owner="Test")
    by_factory.build(trained)
    assert by_factory.state_dict() is None
    kept = FrozenModel(lambda m: tiny_hf_model(seed=2), owner="Test", persist=True)
    kept.build(trained)
    assert kept.state_dict() is not None


def test_update_is_the_ema_of_the_trained_weights():
    trained = tiny_hf_model(seed=0)
    holder = FrozenModel(owner="Test")
    start = {k: v.clone() for k, v in holder.build(trained).state_dict().items()}
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(3.0)
    holder.update(trained, decay=0.25)
    now = dict(trained.named_parameters())
    for n, p in holder.model.named_parameters():
        torch.testing.assert_close(p, 0.25 * start[n] + 0.75 * now[n].detach(), msg=n)
    holder.update(trained)  # decay 0: the trained weights
    for n, p in holder.model.named_parameters():
        assert torch.equal(p, now[n].detach()), n
    assert not any(p.requires_grad for p in holder.model.parameters())

    with pytest.raises(ValueError, match="Test: decay must be in \\[0, 1\\], got 1.5"):
        holder.update(trained, decay=1.5)
    with pytest.raises(RuntimeError, match="Test: frozen-model parameter 'model.embed_tokens.weight' has no "):
        holder.update(torch.nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="before it was built"):
        FrozenModel(owner="Test").update(trained)


def test_on_device_and_offload():
    trained = tiny_hf_model(seed=0)
    with pytest.raises(RuntimeError, match="Test: the frozen model is used before it was built"):
        with FrozenModel(owner="Test").on(torch.device("cpu")):
            pass
    holder = FrozenModel(owner="Test", offload=True)
    model = holder.build(trained)
    assert next(model.parameters()).device.type == "cpu"
    with holder.on(torch.device("cpu")) as m:
        assert m is model


@pytest.mark.parametrize("kw, match", [
    (dict(dtype="int8"), "Test: dtype must be one of \\['bfloat16', 'float16', 'float32'\\], got 'int8'"),
    (dict(source=""), "Test: the frozen model's source must be None"),
    (dict(source=3), "Test: the frozen model's source must be None"),
])
def test_bad_arguments_name_the_owner_argument_and_allowed_values(kw, match):
    with pytest.raises(ValueError, match=match):
        FrozenModel(owner="Test", **kw)


def test_frozen_model_property_reads_and_injects_the_holders_model():
    from torch import nn

    from lit_ft.core.frozen import FrozenModel, frozen_model_property

    class Technique:
        reference_model = frozen_model_property("_ref", "the reference")

        def __init__(self):
            self._ref = FrozenModel(None, owner="Technique")

    t = Technique()
    assert t.reference_model is None and Technique.reference_model.__doc__ == "the reference"
    m = nn.Linear(2, 2)
    t.reference_model = m
    assert t._ref.model is m and t.reference_model is m
