"""ReinitTopLayers: the top layers get exactly the seeded N(0, std) draws / norm identity / zero biases, lower layers
are untouched, the draws do not depend on the global RNG (so every DDP rank agrees), the re-init happens once
(resume equals the uninterrupted run, a second fit does not re-init), element-mask snapshots of other callbacks
are refreshed, plain and PEFT modules."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_ft.callbacks import FreezeLayers, ReinitTopLayers
from lit_ft.callbacks._param_plan import ParamPlanCallback
from lit_ft.callbacks.param_reset.reinit_top_layers import norm_unit_value
from lit_ft.core.introspect import find_decoder_layers
from lit_ft.core.params import ParamPlan
from lit_ft.modules import CausalLMModule

from helpers import (
    ListDataModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, snapshot_params, tiny_config,
)

_snap = snapshot_params


def _trainer(callbacks, steps=2, **kw):
    return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, **kw)


def _perturb(module):
    with torch.no_grad():  # stand-in for pretrained weights: zero biases / unit norms would hide a re-init
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def _module(**cfg):
    return _perturb(CausalLMModule(model_config=tiny_config(attention_bias=True, mlp_bias=True, **cfg),
                                   learning_rate=1e-2, weight_decay=0.1))


def _top(n, L=2):
    return f".layers.{L - 1}." in n


def test_values_are_the_seeded_draws_norm_identity_and_zero_bias():
    module = _module(initializer_range=0.05)
    before = _snap(module)
    cb = ReinitTopLayers(seed=7)
    cb.reinitialize(module)
    assert cb.std_used == 0.05  # the config's initializer_range
    gen = torch.Generator().manual_seed(7)
    top = find_decoder_layers(module.model)[-1]
    for m in top.modules():  # hand reference: one generator, Linear weights in module order
        if isinstance(m, nn.Linear):
            expected = torch.empty(m.weight.shape).normal_(0.0, 0.05, generator=gen)
            assert torch.equal(m.weight, expected)
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    after = dict(module.named_parameters())
    for n, p in after.items():
        if _top(n) and "norm" in n:
            assert torch.equal(p, torch.ones_like(p)), n
        if not _top(n):
            assert torch.equal(p, before[n]), n  # lower layers, embeddings, head untouched
    assert set(cb.reinitialized_names) == {n for n in after if _top(n)}
    big = torch.cat([p.flatten() for n, p in after.items() if _top(n) and p.dim() == 2])
    assert abs(big.std().item() - 0.05) < 0.005


def test_draws_ignore_the_global_rng_and_follow_the_seed():
    torch.manual_seed(0)
    a, b, c = _module(), _module(), _module()
    torch.manual_seed(1)
    ReinitTopLayers(seed=3).reinitialize(a)
    torch.manual_seed(2)  # another "rank" with another global RNG state
    ReinitTopLayers(seed=3).reinitialize(b)
    ReinitTopLayers(seed=4).reinitialize(c)
    w = "model.model.layers.1.mlp.up_proj.weight"
    pa, pb, pc = (dict(m.named_parameters())[w] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


def test_norm_unit_value_follows_the_model_init():
    from transformers import AutoConfig, AutoModelForCausalLM

    llama = CausalLMModule(model_config=tiny_config()).model
    assert norm_unit_value(llama, find_decoder_layers(llama)[0].input_layernorm) == 1.0
    gemma = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=384))
    assert norm_unit_value(gemma, find_decoder_layers(gemma)[0].input_layernorm) == 0.0  # x * (1 + w)


def test_trainer_reinit_once_then_training_and_second_fit_does_not_reinit():
    module = _module()
    init = _snap(module)
    starts = []

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(_snap(pl_module))

    cb = ReinitTopLayers()
    trainer = _trainer([cb, AtStart()], steps=2)
    trainer.fit(module, datamodule=ListDataModule(2))
    s0 = starts[0]
    for n in init:
        assert torch.equal(s0[n], init[n]) != _top(n), n  # only the top layer was re-initialised
    assert cb.done and cb.reinit_count == 1
    end_first = _snap(module)
    trainer2 = _trainer([cb, AtStart()], steps=2)
    trainer2.fit(module, datamodule=ListDataModule(2))
    for n in end_first:
        assert torch.equal(starts[1][n], end_first[n]), n  # done: no second re-init
    assert cb.reinit_count == 1


def test_resume_equals_uninterrupted_and_the_reinit_happened_once(tmp_path):
    starts = []

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(_snap(pl_module))

    r = fit_and_resume(_module, lambda: [ReinitTopLayers(seed=5), AtStart()], tmp_path)
    cb_full, cb_res = r.callbacks_full[0], r.callbacks_resumed[0]
    ckpt = torch.load(r.ckpt, weights_only=False)
    assert ckpt["callbacks"][cb_full.state_key]["done"] is True
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    # the resumed run trains from the checkpoint's weights (re-initialised once, then trained 2 steps), not a new re-init
    for n, p in starts[1].items():
        assert torch.equal(p, ckpt["state_dict"][n]), n
    assert cb_full.reinit_count == 1 and cb_res.reinit_count == 0 and cb_res.done


def test_element_mask_snapshots_of_earlier_callbacks_are_refreshed():
    module = _module()
    w = "model.model.layers.1.mlp.up_proj.weight"
    mask = torch.rand(dict(module.named_parameters())[w].shape) < 0.5

    class Masker(ParamPlanCallback):
        technique_name = "masker"

        def build_plan(self, trainer, pl_module):
            return ParamPlan.from_masks({w: mask}, owner="Masker", model=pl_module)

    starts = []

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            starts.append(_snap(pl_module))

    _trainer([Masker(), ReinitTopLayers(), AtStart()], steps=2).fit(module, datamodule=ListDataModule(2))
    p = dict(module.named_parameters())[w]
    assert torch.equal(p[~mask], starts[0][w][~mask])  # masked-out entries keep their re-initialised values
    assert not torch.equal(p[mask], starts[0][w][mask])


def test_composes_with_freeze_layers_plain_module_and_peft():
    module = _module(num_hidden_layers=3)
    init = _snap(module)
    _trainer([ReinitTopLayers(), FreezeLayers(num_layers=1)], steps=2).fit(module, datamodule=ListDataModule(2))
    after = dict(module.named_parameters())
    assert all(torch.equal(after[n], init[n]) for n in after if ".layers.0." in n or "embed" in n)
    assert all(not torch.equal(after[n], init[n]) for n in after if ".layers.2." in n)

    plain = PlainHFModule()
    init = _snap(plain)
    cb = ReinitTopLayers()
    _trainer([cb], steps=1).fit(plain, datamodule=ListDataModule(1))
    assert cb.reinitialized_names and all(".layers.1." in n for n in cb.reinitialized_names)

    import peft
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_config())
    cfg.pop("model_type")
    for include_frozen in (False, True):
        torch.manual_seed(0)
        lora = peft.get_peft_model(AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg)),
                                   peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        holder = nn.Module()
        holder.model = lora
        _perturb(holder)
        before = _snap(holder)
        cb = ReinitTopLayers(include_frozen=include_frozen)
        cb.reinitialize(holder)
        for n, p in holder.named_parameters():
            changed = not torch.equal(p, before[n])
            if ".layers.1." not in n:
                assert not changed, n
            elif "lora_" in n:
                assert changed, n  # the adapter tensors of the top layer
            else:
                assert changed == include_frozen, n  # PEFT's frozen base weights and norms only with include_frozen


def test_too_many_layers_and_all_frozen_raise():
    with pytest.raises(ValueError, match=r"num_layers`=3 exceeds the model's 2 layers"):
        ReinitTopLayers(num_layers=3).reinitialize(_module())
    module = _module()
    for p in module.model.model.layers[1].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="include_frozen=True"):
        ReinitTopLayers().reinitialize(module)


class _SaveRank(pl.Callback):
    def __init__(self, path):
        self.path = path

    def setup(self, trainer, pl_module, stage):  # after ReinitTopLayers.setup, before DDP broadcasts rank 0's weights
        torch.save({n: p.detach().clone() for n, p in pl_module.named_parameters()}, f"{self.path}/rank{trainer.global_rank}.pt")


class _RankSeeded(ReinitTopLayers):
    def setup(self, trainer, pl_module, stage):
        torch.manual_seed(100 + trainer.global_rank)  # different global RNG on each rank
        super().setup(trainer, pl_module, stage)


@pytest.mark.slow
def test_ddp_ranks_reinit_identically(tmp_path):
    import copy

    module = _module()
    expected = copy.deepcopy(module)
    ReinitTopLayers().reinitialize(expected)
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_steps=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[_RankSeeded(), _SaveRank(tmp_path)])
    trainer.fit(module, datamodule=ListDataModule(2))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for n, p in expected.named_parameters():
        assert torch.equal(r0[n], p.detach()) and torch.equal(r1[n], p.detach()), n
