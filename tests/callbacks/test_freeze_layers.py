"""FreezeLayers: embeddings + lowest layers frozen bit-exactly under AdamW weight decay, the tied head warning,
gradual unfreezing with fresh optimizer state, composition with other parameter callbacks, resume after the
unfreeze, plain and PEFT modules, 2-rank DDP with an unfreeze."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import FreezeLayers
from lit_ft.callbacks._param_plan import param_plans_for
from lit_ft.core.optim import verify_optimizer
from lit_ft.core.params import ParamPlan, ParamPlanConflict
from lit_ft.modules import CausalLMModule

from helpers import (
    ListDataModule, PlainHFModule, PlanCallback, assert_state_dicts_equal, fit_and_resume, random_batch,
    snapshot_params, tiny_config,
)
from helpers import LoraModule

_Plan = PlanCallback
_snap = snapshot_params


def PeftLora():
    return LoraModule(seed=None)


def _trainer(callbacks, steps=3, **kw):
    return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, **kw)


def _lower(n):
    return n.startswith(("model.model.embed_tokens.", "model.model.layers.0."))


def test_embeddings_and_lower_layers_bit_identical_under_adamw_weight_decay():
    module = CausalLMModule(model_config=tiny_config(num_hidden_layers=3), learning_rate=1e-2, weight_decay=0.5)
    cb = FreezeLayers(num_layers=1)
    before = _snap(module)
    trainer = _trainer([cb])
    trainer.fit(module, datamodule=ListDataModule(n_batches=3))
    after = dict(module.named_parameters())
    assert cb.frozen_names and all(_lower(n) for n in cb.frozen_names)
    assert "model.model.embed_tokens.weight" in cb.frozen_names
    for n, p in after.items():
        if _lower(n):
            assert torch.equal(p, before[n]), n
            assert not p.requires_grad, n
        else:
            assert not torch.equal(p, before[n]), n  # every other tensor trained (layers 1-2, norm, lm_head)
    verify_optimizer(trainer.optimizers[0], module, param_plans_for(module).composed)
    in_opt = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert not any(id(after[n]) in in_opt for n in cb.frozen_names)
    assert 0 < cb.trainable_fraction() < 1
    assert cb.frozen_numel == sum(after[n].numel() for n in cb.frozen_names)


def test_keep_embeddings_trainable_and_tied_head_warning():
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    before = _snap(module)
    _trainer([FreezeLayers(num_layers=1, freeze_embeddings=False)], steps=2).fit(module, datamodule=ListDataModule(3))
    assert not torch.equal(module.model.model.embed_tokens.weight, before["model.model.embed_tokens.weight"])
    assert torch.equal(module.model.model.layers[0].mlp.up_proj.weight, before["model.model.layers.0.mlp.up_proj.weight"])

    tied = CausalLMModule(model_config=tiny_config(tie_word_embeddings=True), learning_rate=1e-2)
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
    head = tied.model.lm_head.weight.detach().clone()
    cb = FreezeLayers(num_layers=0)
    with pytest.warns(UserWarning, match="tied tensor"):
        _trainer([cb], steps=2).fit(tied, datamodule=ListDataModule(3))
    assert cb.tied_embeddings is True
    assert torch.equal(tied.model.lm_head.weight, head)  # the output layer is the frozen embedding


def test_unfreeze_at_epoch_adds_tensors_with_fresh_state_and_keeps_the_others():
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1, warmup_steps=2)
    cb = FreezeLayers(num_layers=1, unfreeze_at_epoch=1)
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:  # first batch of epoch 1, right after the unfreeze
                opt = trainer.optimizers[0]
                params = dict(pl_module.named_parameters())
                seen["layer0_state"] = opt.state.get(params["model.model.layers.0.mlp.up_proj.weight"])
                seen["layer1_step"] = float(opt.state[params["model.model.layers.1.mlp.up_proj.weight"]]["step"])
                seen["params"] = _snap(pl_module)
                verify_optimizer(opt, pl_module, param_plans_for(pl_module).composed)

    init = _snap(module)
    trainer = _trainer([cb, Probe()], steps=4)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    assert cb.unfrozen
    assert not seen["layer0_state"]  # newly trainable: empty optimizer state
    assert seen["layer1_step"] == 2.0  # kept tensors kept theirs
    for n in cb.frozen_names:
        assert torch.equal(seen["params"][n], init[n]), n  # frozen during epoch 0
        assert not torch.equal(dict(module.named_parameters())[n], init[n]), n  # trained after the unfreeze
    verify_optimizer(trainer.optimizers[0], module)
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert len(sched.base_lrs) == len(trainer.optimizers[0].param_groups)


def test_composes_by_intersection_and_conflicts_name_both():
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    before = _snap(module)
    other = _Plan(lambda m: ParamPlan.freeze(m, ["model.lm_head.weight"], owner="HeadFreezer"))
    _trainer([FreezeLayers(num_layers=1), other], steps=2).fit(module, datamodule=ListDataModule(3))
    after = dict(module.named_parameters())
    for n in after:
        frozen = _lower(n) or n == "model.lm_head.weight"
        assert torch.equal(after[n], before[n]) == frozen, n

    module = CausalLMModule(model_config=tiny_config())
    needs = _Plan(lambda m: ParamPlan.trainable_only(m, ["model.model.layers.0.*"], owner="NeedsLayer0", required=True))
    with pytest.raises(ParamPlanConflict, match="(?s)(FreezeLayers.*NeedsLayer0|NeedsLayer0.*FreezeLayers)"):
        _trainer([FreezeLayers(num_layers=1), needs], steps=1).fit(module, datamodule=ListDataModule(1))


@pytest.mark.parametrize("llrd", [False, True], ids=["alone", "with_llrd"])
def test_resume_after_the_unfreeze_equals_uninterrupted(tmp_path, llrd):
    from lit_ft.callbacks import LayerwiseLRDecay

    r = fit_and_resume(
        lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1, warmup_steps=3),
        lambda: [FreezeLayers(num_layers=1, unfreeze_at_epoch=1)] + ([LayerwiseLRDecay(decay=0.5)] if llrd else []),
        tmp_path, max_steps=6,
        ckpt_name="epoch=1-step=4.ckpt",  # saved after the unfreeze at the start of epoch 1
    )
    cb_full, cb_res, trainer = r.callbacks_full[0], r.callbacks_resumed[0], r.trainer_resumed
    saved = torch.load(r.ckpt, weights_only=False)["callbacks"][cb_full.state_key]
    assert saved["unfrozen"] is True and set(saved) == {"unfrozen", "lit_ft_resume_args"}  # + the arguments (resume)
    assert cb_res.unfrozen
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    verify_optimizer(trainer.optimizers[0], r.resumed)
    if llrd:  # the unfrozen layer trains at its decayed lr in the resumed run too
        g = next(g for g in trainer.optimizers[0].param_groups if "model.model.layers.0.mlp.up_proj.weight" in g["param_names"])
        assert g["initial_lr"] == pytest.approx(1e-2 * 0.5)


def test_plain_module_and_peft_lora():
    plain = PlainHFModule()
    before = _snap(plain)
    _trainer([FreezeLayers(num_layers=1)], steps=2).fit(plain, datamodule=ListDataModule(3))
    after = dict(plain.named_parameters())
    for n in after:
        assert torch.equal(after[n], before[n]) == _lower(n), n

    torch.manual_seed(0)
    lora = PeftLora()
    before = _snap(lora)
    cb = FreezeLayers(num_layers=1, freeze_embeddings=True)
    _trainer([cb], steps=3).fit(lora, datamodule=ListDataModule(3))
    after = dict(lora.named_parameters())
    lora_names = [n for n in after if "lora_" in n]
    assert any(".layers.0." in n for n in cb.frozen_names if "lora_" in n)
    for n in lora_names:
        if ".layers.0." in n:
            assert torch.equal(after[n], before[n]) and not after[n].requires_grad, n  # lower-layer adapters frozen
        elif "lora_B" in n:
            assert not torch.equal(after[n], before[n]), n
    for n in after:
        if "lora_" not in n:
            assert torch.equal(after[n], before[n]), n  # PEFT's frozen base stays frozen


def test_freezing_nothing_is_refused():
    with pytest.raises(ValueError, match="freezes nothing"):
        FreezeLayers(num_layers=0, freeze_embeddings=False)


def test_bad_layer_count_and_nothing_left_to_train():
    module = CausalLMModule(model_config=tiny_config())
    with pytest.raises(ValueError, match=r"num_layers`=3 exceeds the model's 2 layers"):
        _trainer([FreezeLayers(num_layers=3)], steps=1).fit(module, datamodule=ListDataModule(1))
    module = CausalLMModule(model_config=tiny_config())
    head_only = _Plan(lambda m: ParamPlan.freeze(m, ["model.lm_head.weight", "model.model.norm.weight"], owner="X"))
    with pytest.raises(ValueError, match="leaves no trainable parameter"):
        _trainer([head_only, FreezeLayers(num_layers=2)], steps=1).fit(module, datamodule=ListDataModule(1))


# -- 2-rank DDP: the unfrozen tensors are not in DDP's reducer, FreezeLayers averages their gradients ------------
class _SaveRank(pl.Callback):
    def __init__(self, path):
        self.path = path

    def on_train_end(self, trainer, pl_module):
        torch.save({k: v.detach().cpu() for k, v in pl_module.state_dict().items()}, f"{self.path}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_stay_identical_through_the_unfreeze(tmp_path):
    from lit_ft.callbacks import LayerwiseLRDecay

    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    init = {k: v.clone() for k, v in module.state_dict().items()}
    batches = [random_batch(4, 16, seed=s) for s in range(4)]  # the distributed sampler gives each rank different ones
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp_spawn", devices=2, max_epochs=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[FreezeLayers(num_layers=1, unfreeze_at_epoch=1), LayerwiseLRDecay(decay=0.5),
                                    _SaveRank(tmp_path)], use_distributed_sampler=True)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert not torch.equal(r0["model.model.layers.0.mlp.up_proj.weight"], init["model.model.layers.0.mlp.up_proj.weight"])
