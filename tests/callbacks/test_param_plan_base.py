"""The shared base of parameter techniques: composition with the user's choices, conflicts, masks enforced
through AdamW weight decay, mid-run plan changes keep the optimizer consistent."""

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks._param_plan import param_plans_for
from lit_ft.core.optim import verify_optimizer
from lit_ft.core.params import ParamPlan, ParamPlanConflict
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, PlanCallback, assert_state_dicts_equal, fit_and_resume, tiny_config

_Plan = PlanCallback


def _fit(module, callbacks, steps=3):
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, limit_val_batches=0)
    trainer.fit(module, datamodule=ListDataModule(n_batches=3))
    return trainer


def test_two_plans_intersect_and_masks_survive_adamw_weight_decay():
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.5)
    module.model.model.embed_tokens.weight.requires_grad_(False)  # the user's own choice is kept
    mask = torch.rand_like(module.model.lm_head.weight) < 0.3
    a = _Plan(lambda m: ParamPlan.freeze(m, ["model.model.layers.0.*"], owner="A"), "A")
    b = _Plan(lambda m: ParamPlan.from_masks({"model.lm_head.weight": mask}, owner="B", model=m), "B")
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    _fit(module, [a, b])
    after = dict(module.named_parameters())
    for n, p in after.items():
        if n.startswith("model.model.layers.0.") or n == "model.model.embed_tokens.weight":
            assert torch.equal(p, before[n]), n
    lm = after["model.lm_head.weight"]
    assert torch.equal(lm[~mask], before["model.lm_head.weight"][~mask])  # weight decay did not move them
    assert not torch.equal(lm[mask], before["model.lm_head.weight"][mask])
    assert not torch.equal(after["model.model.layers.1.mlp.up_proj.weight"], before["model.model.layers.1.mlp.up_proj.weight"])


def test_conflict_between_callbacks_raises_naming_both():
    module = CausalLMModule(model_config=tiny_config())
    a = _Plan(lambda m: ParamPlan.freeze(m, ["model.lm_head.weight"], owner="Freezer"), "A")
    b = _Plan(lambda m: ParamPlan.trainable_only(m, ["model.lm_head.weight"], owner="NeedsHead", required=True), "B")
    with pytest.raises(ParamPlanConflict, match="(?s)(Freezer.*NeedsHead|NeedsHead.*Freezer)"):
        _fit(module, [a, b], steps=1)


def test_update_plan_mid_run_rebuilds_optimizer_by_name():
    class Switch(_Plan):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                self.report = self.update_plan(
                    trainer, pl_module, ParamPlan.trainable_only(pl_module, ["model.lm_head.weight"], owner="S2"))

    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    cb = Switch(lambda m: ParamPlan.freeze(m, ["model.lm_head.weight"], owner="S1"), "S")
    trainer = pl.Trainer(max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[cb], limit_val_batches=0)
    snap = {}

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 2:
                snap.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer.callbacks.append(Snap())
    trainer.fit(module, datamodule=ListDataModule(n_batches=4))
    opt = trainer.optimizers[0]
    verify_optimizer(opt, module, param_plans_for(module).composed)  # no missing / frozen / duplicate tensors
    assert "model.lm_head.weight" in cb.report.added and cb.report.removed
    assert not torch.equal(module.model.lm_head.weight, snap["model.lm_head.weight"])  # newly trainable: updated
    assert torch.equal(module.model.model.norm.weight, snap["model.model.norm.weight"])  # newly frozen: still


def test_trainable_fraction_is_read_from_the_composed_plan_when_logged():
    module = CausalLMModule(model_config=tiny_config())
    a = _Plan(lambda m: ParamPlan.freeze(m, ["model.lm_head.weight"], owner="A"), "A")
    b = _Plan(lambda m: None, "B")  # no plan at setup
    trainer = _fit(module, [a, b], steps=1)
    before = a.trainable_fraction()
    assert 0 < before < 1 and b.trainable_fraction() == before
    b.update_plan(trainer, module, ParamPlan.freeze(module, ["model.model.layers.0.*"], owner="B"))
    assert a.trainable_fraction() == b.trainable_fraction() < before  # A sees B's later change


def test_optimizer_layout_is_checkpointed_and_reapplied_on_resume(tmp_path):
    from lit_ft.core.optim import optimizer_layout

    class Switch(_Plan):  # mid-run: the head thaws and joins the end of its group (history-dependent order)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1 and self.key in param_plans_for(pl_module).plans:
                self.update_plan(trainer, pl_module, None)

        def on_fit_start(self, trainer, pl_module):
            if trainer.ckpt_path:  # resumed after the switch: restore the plan, then the base the layout
                self.update_plan(trainer, pl_module, None)
            super().on_fit_start(trainer, pl_module)

    r = fit_and_resume(
        lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1),
        lambda: [Switch(lambda m: ParamPlan.freeze(m, ["model.model.layers.0.mlp.up_proj.weight"], owner="S"), "S")],
        tmp_path)
    ckpt = torch.load(r.ckpt, weights_only=True)
    saved = ckpt["lit_ft_param_plans"]["optimizer_layout"][0]
    up = "model.model.layers.0.mlp.up_proj.weight"
    assert next(g for g in saved if up in g)[-1] == up  # appended by the mid-run rebuild, not in model order
    assert optimizer_layout(r.trainer_resumed.optimizers[0], r.resumed) == \
        optimizer_layout(r.trainer_full.optimizers[0], r.full)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())


def test_tensors_thawed_mid_run_follow_the_modules_no_decay_patterns():
    class Thaw(_Plan):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                self.update_plan(trainer, pl_module, None)

    emb, up = "model.model.embed_tokens.weight", "model.model.layers.0.mlp.up_proj.weight"
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    assert param_plans_for(module).no_decay_patterns == tuple(module.no_decay_patterns)
    cb = Thaw(lambda m: ParamPlan.freeze(m, [emb, up], owner="T"), "T")
    trainer = _fit(module, [cb], steps=2)
    wd = {n: g["weight_decay"] for g in trainer.optimizers[0].param_groups for n in g["param_names"]}
    assert wd[emb] == 0.0 and wd[up] == 0.1  # embeddings are excluded by CausalLMModule, as in configure_optimizers
