"""LayerwiseLRDecay (lit_ft/callbacks/tensor_selection/layerwise_lr_decay.py): per-tensor lrs equal the hand-computed lr * decay ** (L - l), SGD updates scale with them,
weight-decay splits and optimizer state are kept, LR schedulers are re-mapped (or refused), tensors unfrozen later
move to their layer's group, resume rebuilds the same groups, plain and PEFT modules."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import FreezeLayers, LayerwiseLRDecay
from lit_ft.core.optim import verify_optimizer
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, tiny_config

L = 3  # layers of the test model
LR = 1e-2


def _trainer(callbacks, steps=2, **kw):
    return pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, **kw)


def _expected_multiplier(name, decay, tied_head="embeddings"):
    if ".embed_tokens." in name:
        return decay ** L
    if ".layers." in name:
        i = int(name.split(".layers.")[1].split(".")[0])
        return decay ** (L - 1 - i)
    return 1.0  # lm_head, final norm


def _lr_of(optimizer):
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


class LoraModule(pl.LightningModule):
    def __init__(self):
        super().__init__()
        import peft
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(tiny_config(num_hidden_layers=L))
        cfg.pop("model_type")
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg))
        self.model = peft.get_peft_model(hf, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def training_step(self, batch, batch_idx):
        return self.model(**{k: v for k, v in batch.items() if k != "sample_idx"}).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=LR, weight_decay=0.1)


def test_group_lrs_match_the_formula_and_keep_weight_decay_splits():
    module = CausalLMModule(model_config=tiny_config(num_hidden_layers=L), learning_rate=LR, weight_decay=0.1)
    cb = LayerwiseLRDecay(decay=0.5)
    trainer = _trainer([cb], steps=1)
    trainer.fit(module, datamodule=ListDataModule(2))
    opt = trainer.optimizers[0]
    where = _lr_of(opt)
    for n, p in module.named_parameters():
        g = where[id(p)]
        assert g["lr"] == pytest.approx(LR * _expected_multiplier(n, 0.5), rel=1e-12), n
        # CausalLMModule's own split: no decay for norms and embeddings
        no_decay = "norm" in n or "embed" in n
        assert g["weight_decay"] == (0.0 if no_decay else 0.1), n
        assert n in g["param_names"]
    verify_optimizer(opt, module)
    assert len(opt.param_groups) == 2 * L + 1  # (decay, no-decay) per layer level + embeddings; head/norm join top
    assert cb.layer_lrs(opt, module) == pytest.approx({"top": LR, "bottom": LR * 0.25, "embeddings": LR * 0.125})


def test_sgd_updates_scale_with_the_layer_lr_on_a_plain_module():
    module = PlainHFModule(lr=0.5)
    grads, before = {}, {n: p.detach().clone() for n, p in module.named_parameters()}

    class Grab(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.update({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})

    _trainer([LayerwiseLRDecay(decay=0.5), Grab()], steps=1).fit(module, datamodule=ListDataModule(1))
    for n, p in module.named_parameters():
        mult = 0.5 ** (2 - 1 - int(n.split(".layers.")[1].split(".")[0])) if ".layers." in n else (
            0.5 ** 2 if "embed_tokens" in n else 1.0)
        torch.testing.assert_close(p.detach(), before[n] - 0.5 * mult * grads[n], rtol=1e-6, atol=1e-7, msg=n)


def test_lambda_lr_scheduler_is_remapped_to_the_new_groups():
    module = CausalLMModule(model_config=tiny_config(num_hidden_layers=L), learning_rate=LR, warmup_steps=4)
    trainer = _trainer([LayerwiseLRDecay(decay=0.5)], steps=2)
    trainer.fit(module, datamodule=ListDataModule(2))
    opt, sched = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
    assert len(sched.lr_lambdas) == len(sched.base_lrs) == len(opt.param_groups) > 2
    assert sched.base_lrs == [g["initial_lr"] for g in opt.param_groups]
    factor = min(1.0, (2 + 1) / 4)  # the warm-up lambda after 2 scheduler steps
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(g["initial_lr"] * factor, rel=1e-12)
        assert g["initial_lr"] == pytest.approx(LR * g["llrd_multiplier"], rel=1e-12)


def test_unsupported_scheduler_and_wrong_callback_order_raise():
    class Custom(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            return [g["lr"] for g in self.optimizer.param_groups]

    class M(PlainHFModule):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.1)
            return {"optimizer": opt, "lr_scheduler": Custom(opt)}

    with pytest.raises(TypeError, match="cannot re-map the LR scheduler Custom"):
        _trainer([LayerwiseLRDecay()], steps=1).fit(M(), datamodule=ListDataModule(1))
    with pytest.raises(ValueError, match="must come after every parameter callback"):
        _trainer([LayerwiseLRDecay(), FreezeLayers(num_layers=1)], steps=1).fit(PlainHFModule(), datamodule=ListDataModule(1))


def test_tensors_unfrozen_later_join_their_layer_group_and_state_is_kept():
    module = CausalLMModule(model_config=tiny_config(num_hidden_layers=L), learning_rate=LR, weight_decay=0.1,
                            warmup_steps=2)
    seen = {}

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:  # one step after the unfreeze at the start of epoch 1
                opt = trainer.optimizers[0]
                params = dict(pl_module.named_parameters())
                where = _lr_of(opt)
                seen["layer0"] = where[id(params["model.model.layers.0.mlp.up_proj.weight"])]["initial_lr"]
                seen["embed"] = where[id(params["model.model.embed_tokens.weight"])]["initial_lr"]
                seen["steps"] = {n: float(opt.state[params[n]]["step"]) for n in
                                 ("model.model.layers.0.mlp.up_proj.weight", "model.model.layers.2.mlp.up_proj.weight")}
                verify_optimizer(opt, pl_module)
                sched = trainer.lr_scheduler_configs[0].scheduler
                seen["sched_ok"] = len(sched.lr_lambdas) == len(sched.base_lrs) == len(opt.param_groups)

    trainer = _trainer([FreezeLayers(num_layers=1, unfreeze_at_epoch=1), LayerwiseLRDecay(decay=0.5), Probe()], steps=4)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    assert seen["layer0"] == pytest.approx(LR * 0.25) and seen["embed"] == pytest.approx(LR * 0.125)
    # layer 0 joined with fresh state (1 step since), layer 2 kept its moments through both regroupings (3 steps)
    assert seen["steps"] == {"model.model.layers.0.mlp.up_proj.weight": 1.0, "model.model.layers.2.mlp.up_proj.weight": 3.0}
    assert seen["sched_ok"]


def test_resume_rebuilds_the_same_groups_and_equals_uninterrupted(tmp_path):
    r = fit_and_resume(
        lambda: CausalLMModule(model_config=tiny_config(num_hidden_layers=L), learning_rate=LR, weight_decay=0.1,
                               warmup_steps=3),
        lambda: [LayerwiseLRDecay(decay=0.7)], tmp_path)
    full, resumed = r.full, r.resumed
    assert_state_dicts_equal(full.state_dict(), resumed.state_dict())
    g_full, g_res = r.trainer_full.optimizers[0].param_groups, r.trainer_resumed.optimizers[0].param_groups
    assert [(g["param_names"], g["lr"], g["initial_lr"]) for g in g_full] == \
        [(g["param_names"], g["lr"], g["initial_lr"]) for g in g_res]
    s_full, s_res = r.trainer_full.optimizers[0].state, r.trainer_resumed.optimizers[0].state
    for p_full, p_res in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(s_full[p_full]["exp_avg_sq"], s_res[p_res]["exp_avg_sq"])


def test_peft_lora_tensors_get_their_layer_lr():
    torch.manual_seed(0)
    module = LoraModule()
    trainer = _trainer([LayerwiseLRDecay(decay=0.5)], steps=1)
    trainer.fit(module, datamodule=ListDataModule(1))
    where = _lr_of(trainer.optimizers[0])
    lora = [(n, p) for n, p in module.named_parameters() if "lora_" in n]
    assert lora
    for n, p in lora:
        assert where[id(p)]["lr"] == pytest.approx(LR * _expected_multiplier(n, 0.5)), n
    assert not any(id(p) in where for n, p in module.named_parameters() if "lora_" not in n)


def test_tied_head_follows_the_option():
    for tied_head, mult in (("embeddings", 0.5 ** 2), ("head", 1.0)):
        module = CausalLMModule(model_config=tiny_config(tie_word_embeddings=True), learning_rate=LR)
        trainer = _trainer([LayerwiseLRDecay(decay=0.5, tied_head=tied_head)], steps=1)
        with pytest.warns(UserWarning, match="tied tensor"):
            trainer.fit(module, datamodule=ListDataModule(1))
        assert _lr_of(trainer.optimizers[0])[id(module.model.lm_head.weight)]["lr"] == pytest.approx(LR * mult)

