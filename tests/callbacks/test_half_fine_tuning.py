"""HalfFineTuning (HFT): the per-layer, per-category half selection; frozen tensors bit-identical through AdamW
weight decay; optimizer state at every stage switch (moments kept or reset on thaw); reset to the pre-trained values;
composition and conflicts with another parameter callback; checkpoint -> resume equality; plain, PEFT and DDP runs."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy

from lit_ft.callbacks import HalfFineTuning
from lit_ft.callbacks._param_plan import ParamPlanCallback, param_plans_for
from lit_ft.core.optim import verify_optimizer
from lit_ft.core.params import ParamPlan, ParamPlanConflict
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, PlainHFModule, tiny_config
from helpers import LoraModule


def _trainer(callbacks, steps, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_steps=steps, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                      limit_val_batches=0, **kw)


def _module(layers=2, **kw):
    kw.setdefault("learning_rate", 1e-2)
    kw.setdefault("weight_decay", 0.5)
    return CausalLMModule(model_config=tiny_config(num_hidden_layers=layers), **kw)


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class Probe(pl.Callback):
    """Records, per global step, the parameters and optimizer state at batch start (placed before or after HFT) and
    the parameters after the step; checks the optimizer against the composed plan after every change."""

    def __init__(self, hft=None):
        self.hft = hft
        self.start, self.end, self.state, self.grad, self.sel = {}, {}, {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        s = trainer.global_step
        self.start[s] = _params(pl_module)
        self.grad[s] = {n for n, p in pl_module.named_parameters() if p.requires_grad}
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.state[s] = {names[id(p)]: {k: v.clone() for k, v in st.items()} for p, st in opt.state.items() if st}
        if self.hft is not None:
            verify_optimizer(opt, pl_module, param_plans_for(pl_module).composed)
            self.sel[s] = (self.hft.stage, list(self.hft.selection))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end[trainer.global_step - 1] = _params(pl_module)


# -- arguments ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reselect="steps"), "stage_steps"), (dict(stage_steps=10), "stage_steps.*reselect"),
        (dict(reselect="steps", stage_steps=0), "stage_steps"),
    ],
)
def test_reselect_and_stage_steps_go_together(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        HalfFineTuning(**kwargs)


def test_plain_ddp_without_find_unused_parameters_is_refused():
    cb = HalfFineTuning()
    trainer = pl.Trainer(accelerator="cpu", strategy="ddp", devices=2, logger=False)
    with pytest.raises(ValueError, match="find_unused_parameters"):
        cb._check_strategy(trainer)
    # element masks freeze nothing inside the layers: with the tensors outside them training too, no unused ones
    HalfFineTuning(granularity="parameter", train_non_layer=True)._check_strategy(trainer)
    frozen_outside = HalfFineTuning(granularity="parameter")  # the default freezes embeddings / lm_head / final norm
    frozen_outside.discover(_module())
    with pytest.raises(ValueError, match="find_unused_parameters"):
        frozen_outside._check_strategy(trainer)


# -- the selection --------------------------------------------------------------------------------------------------

def test_matrix_selection_halves_every_category_of_every_layer():
    cb = HalfFineTuning(seed=7)
    module = _module(layers=4)
    units = cb.discover(module)
    cats = {(u.layer, u.category) for u in units}
    assert {c for _, c in cats} == {"self_attn", "mlp", "norm"}
    assert cb.non_layer == ["model.model.embed_tokens.weight", "model.model.norm.weight", "model.lm_head.weight"]
    again = HalfFineTuning(seed=7)
    again.discover(module)
    ffn_counts, seen = [], set()
    for stage in range(60):
        sel = cb.select(stage)
        assert sel == again.select(stage)  # a function of (seed, stage) only
        seen.add(tuple(sel))
        for layer in range(4):
            chosen = [s.split(":")[1] for s in sel if s.startswith(f"{layer}:")]
            assert sum(c.startswith("self_attn.") for c in chosen) == 2  # 2 of {q, k, v, o}
            assert sum(c.endswith("layernorm") for c in chosen) == 1  # 1 of the 2 norms
            n_ffn = sum(c.startswith("mlp.") for c in chosen)
            assert n_ffn in (1, 2)  # 1.5 of {gate, up, down}, stochastically rounded
            ffn_counts.append(n_ffn)
    assert len(seen) == 60  # a new half every stage
    assert 1.35 < sum(ffn_counts) / len(ffn_counts) < 1.65
    other_seed = HalfFineTuning(seed=8)
    other_seed.discover(module)
    assert other_seed.select(0) != cb.select(0)


def test_layer_and_parameter_granularity():
    module = _module(layers=4)
    cb = HalfFineTuning(granularity="layer", seed=1)
    cb.discover(module)
    for stage in range(5):
        layers = {int(s.split(":")[0]) for s in cb.select(stage)}
        assert len(layers) == 2
        assert sum(s.startswith(f"{next(iter(layers))}:") for s in cb.select(stage)) == 9  # the whole layer
    cb = HalfFineTuning(granularity="parameter", ratio=0.25, seed=1)
    cb.discover(module)
    masks = cb.select(0)
    assert set(masks) == set(cb._candidates)
    frac = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert 0.23 < frac < 0.27
    assert all(torch.equal(masks[n], cb.select(0)[n]) for n in masks)
    assert not torch.equal(masks[cb._candidates[0]], cb.select(1)[cb._candidates[0]])


# -- the paper's default split ----------------------------------------------------------------------------------------

_OUTSIDE = ("model.model.embed_tokens.weight", "model.model.norm.weight", "model.lm_head.weight")


def test_default_trains_about_half_of_the_layers_and_freezes_embeddings_head_and_final_norm():
    """The paper: half of the parameters learn, the other half is frozen; the category-level selection is per layer,
    so the tensors outside the layers stay frozen. Before, they trained by default (85% of a benchmark model)."""
    torch.manual_seed(0)
    module = _module(layers=4)
    cb = HalfFineTuning(seed=3)
    trainer = _trainer([cb], steps=1)
    trainer.fit(module, datamodule=ListDataModule(n_batches=1))
    params = dict(module.named_parameters())
    assert all(not params[n].requires_grad for n in _OUTSIDE)
    total = sum(p.numel() for p in params.values())
    in_layers = sum(params[n].numel() for u in cb.units for n in u.params)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    # every trainable element is one HFT selected inside the layers, nothing else
    assert trainable == round(cb.selected_fraction * in_layers)
    assert cb.trainable_fraction() == pytest.approx(trainable / total)
    assert float(trainer.callback_metrics["lit_ft/half_fine_tuning/trainable_fraction"]) == pytest.approx(
        trainable / total)
    assert 0.3 < cb.selected_fraction < 0.7
    assert cb.trainable_fraction() < 0.7 * in_layers / total  # no tensor outside the layers adds to it


def test_train_non_layer_true_keeps_the_earlier_behaviour():
    torch.manual_seed(0)
    module = _module(layers=4)
    cb = HalfFineTuning(seed=3, train_non_layer=True)
    _trainer([cb], steps=1).fit(module, datamodule=ListDataModule(n_batches=1))
    params = dict(module.named_parameters())
    assert all(params[n].requires_grad for n in _OUTSIDE)
    outside = sum(params[n].numel() for n in _OUTSIDE)
    in_layers = sum(params[n].numel() for u in cb.units for n in u.params)
    total = sum(p.numel() for p in params.values())
    assert cb.trainable_fraction() == pytest.approx((round(cb.selected_fraction * in_layers) + outside) / total)


# -- training -------------------------------------------------------------------------------------------------------

def test_frozen_half_is_bit_identical_through_adamw_and_changes_every_epoch():
    torch.manual_seed(0)
    module = _module()
    cb = HalfFineTuning(seed=0)
    probe = Probe(cb)
    trainer = _trainer([cb, probe], steps=6)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))  # 3 epochs = 3 stages of 2 steps
    assert [probe.sel[s][0] for s in range(6)] == [0, 0, 1, 1, 2, 2]
    assert probe.sel[0][1] != probe.sel[2][1] != probe.sel[4][1]
    for first in (0, 2, 4):
        before, after = probe.start[first], probe.end[first + 1]
        trainable = probe.grad[first]
        frozen = [n for n in before if n not in trainable]
        assert frozen and len(trainable) < len(before)
        for n in before:
            if n in trainable:
                assert not torch.equal(before[n], after[n]), n  # trained (weight decay 0.5 alone would move it)
            else:
                assert torch.equal(before[n], after[n]), n  # frozen: no grad, no decay, no momentum
        assert all(n not in probe.state[first] or n in trainable for n in before)  # no state for frozen tensors
    assert 0.3 < cb.selected_fraction < 0.7 and cb.trainable_fraction() < 1.0
    assert {"lit_ft/half_fine_tuning/stage", "lit_ft/half_fine_tuning/resets",
            "lit_ft/half_fine_tuning/trainable_fraction"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize("reset_moments", [True, False], ids=["reset_moments", "keep_moments"])
def test_optimizer_moments_on_freeze_and_thaw(reset_moments):
    torch.manual_seed(0)
    module = _module()
    cb = HalfFineTuning(reselect="steps", stage_steps=1, reset_moments_on_thaw=reset_moments, seed=0)
    pre, post = Probe(), Probe(cb)  # state before / after HFT's switch at each batch start
    trainer = _trainer([pre, cb, post], steps=6)
    trainer.fit(module, datamodule=ListDataModule(n_batches=6))
    checked = 0
    for t in range(1, 6):
        froze = (post.grad[t - 1] - post.grad[t]) & set(cb._candidates)
        for n in froze:
            assert n in pre.state[t] and n not in post.state[t]  # frozen: out of the optimizer state
            thaw = next((u for u in range(t + 1, 6) if n in post.grad[u]), None)
            if thaw is None:
                continue
            for u in range(t, thaw):
                assert n not in post.state[u]  # no state while frozen (nothing can update it)
            if reset_moments:
                assert n not in post.state[thaw]  # fresh state: the next step starts at step 1
                if thaw + 1 in pre.state:
                    assert pre.state[thaw + 1][n]["step"].item() == 1.0
            else:
                kept, old = post.state[thaw][n], pre.state[t][n]
                assert kept.keys() == old.keys()
                for k in old:
                    assert torch.equal(kept[k], old[k]), (n, k)  # exactly the moments at freezing time
            checked += 1
    assert checked >= 3


def test_reset_frozen_restores_pretrained_values_and_counts():
    torch.manual_seed(0)
    module = _module()
    theta0 = _params(module)
    cb = HalfFineTuning(reselect="steps", stage_steps=1, reset_frozen=True, seed=0)
    probe = Probe(cb)
    trainer = _trainer([cb, probe], steps=4)
    trainer.fit(module, datamodule=ListDataModule(n_batches=4))
    assert all(t.device.type == "cpu" for t in cb._theta0.values()) and set(cb._theta0) == set(cb._candidates)
    moved_then_reset, expected_resets = 0, 0
    for s in range(1, 4):
        frozen = [n for n in cb._candidates if n not in probe.grad[s]]
        expected_resets += len(frozen)
        for n in frozen:
            assert torch.equal(probe.start[s][n], theta0[n]), n
            moved_then_reset += not torch.equal(probe.end[s - 1][n], theta0[n])
    assert moved_then_reset > 0  # some tensors trained in the previous stage were put back
    assert cb.resets == expected_resets
    assert trainer.callback_metrics["lit_ft/half_fine_tuning/resets"].item() == expected_resets


def test_parameter_granularity_masks_and_reset():
    torch.manual_seed(0)
    module = _module()
    theta0 = _params(module)
    cb = HalfFineTuning(granularity="parameter", reselect="steps", stage_steps=2, reset_frozen=True, seed=0)
    probe = Probe(cb)
    _trainer([cb, probe], steps=4).fit(module, datamodule=ListDataModule(n_batches=4))
    for s, mask_stage in ((0, 0), (2, 1)):
        masks = cb.select(mask_stage)
        for n, m in masks.items():
            assert torch.equal(probe.end[s + 1][n][~m], theta0[n][~m]), n  # masked-out: the pre-trained values
            assert not torch.equal(probe.end[s + 1][n][m], probe.start[s][n][m]), n


# -- composition ----------------------------------------------------------------------------------------------------

class _Other(ParamPlanCallback):
    technique_name = "other"

    def __init__(self, make):
        self.make = make

    @property
    def state_key(self):
        return "Other"

    def build_plan(self, trainer, pl_module):
        return self.make(pl_module)


def test_composes_with_another_plan_by_intersection():
    torch.manual_seed(0)
    module = _module()
    other = _Other(lambda m: ParamPlan.freeze(m, ["*layers.0.mlp.*", "*lm_head*"], owner="Other"))
    cb = HalfFineTuning(seed=0, train_non_layer=True)  # HFT trains lm_head: the other plan's freeze must win
    probe = Probe(cb)
    before = _params(module)
    _trainer([other, cb, probe], steps=2).fit(module, datamodule=ListDataModule(n_batches=2))
    after = _params(module)
    chosen = set(probe.sel[0][1])
    for n in before:
        other_frozen = ".layers.0.mlp." in n or "lm_head" in n
        unit = next((f"{u.layer}:{u.name}" for u in cb.units if n in u.params), None)
        hft_trainable = unit is None or unit in chosen
        assert (n in probe.grad[0]) == (hft_trainable and not other_frozen), n
        assert torch.equal(before[n], after[n]) == (n not in probe.grad[0]), n


def test_conflict_with_a_required_tensor_names_both_owners():
    module = _module()
    other = _Other(lambda m: ParamPlan.trainable_only(m, ["*layers.0.self_attn.*"], owner="NeedsAttention",
                                                      required=True))
    with pytest.raises(ParamPlanConflict, match="(?s)NeedsAttention.*HalfFineTuning"):
        _trainer([other, HalfFineTuning(seed=0)], steps=1).fit(module, datamodule=ListDataModule(n_batches=1))


# -- checkpoint -> resume ------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kwargs, ckpt",
    [
        (dict(reset_frozen=True, reset_moments_on_thaw=False), "epoch=1-step=4.ckpt"),
        (dict(granularity="parameter", reselect="steps", stage_steps=3, reset_frozen=True), "epoch=0-step=2.ckpt"),
    ],
    ids=["matrix_reset_keep_moments", "parameter_steps"],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, kwargs, ckpt):
    def run(save_dir=None, ckpt_path=None):
        torch.manual_seed(0)
        module = _module(warmup_steps=3)
        cb = HalfFineTuning(seed=5, **kwargs)
        callbacks = [cb]
        if save_dir:
            callbacks.append(ModelCheckpoint(dirpath=save_dir, every_n_train_steps=2, save_top_k=-1))
        trainer = _trainer(callbacks, steps=6, enable_checkpointing=bool(save_dir))
        trainer.fit(module, datamodule=ListDataModule(n_batches=2), ckpt_path=ckpt_path)
        return module, cb

    full, cb_full = run(save_dir=tmp_path)
    checkpoint = torch.load(tmp_path / ckpt, weights_only=False)
    saved = checkpoint["callbacks"][cb_full.state_key]
    # the optimizer group layout is saved once for all parameter callbacks (ParamPlanCallback base)
    assert saved["stage"] >= 0 and saved["theta0"] and checkpoint["lit_ft_param_plans"]["optimizer_layout"]
    resumed, cb_res = run(ckpt_path=str(tmp_path / ckpt))
    assert cb_res.stage == cb_full.stage and cb_res.resets == cb_full.resets
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), n


# -- drop-in: a plain module, a PEFT model ---------------------------------------------------------------------------

def test_plain_user_module_with_sgd():
    torch.manual_seed(0)
    module = PlainHFModule(lr=0.5)
    cb = HalfFineTuning(seed=0)
    probe = Probe(cb)
    _trainer([cb, probe], steps=4).fit(module, datamodule=ListDataModule(n_batches=2))
    for first in (0, 2):
        for n, before in probe.start[first].items():
            assert torch.equal(before, probe.end[first + 1][n]) == (n not in probe.grad[first]), n
    assert probe.grad[0] != probe.grad[2]


def PeftModule():
    return LoraModule(seed=None)


def test_peft_model_selects_among_the_adapters_only():
    torch.manual_seed(0)
    module = PeftModule()
    lora = {n for n, p in module.named_parameters() if p.requires_grad}
    cb = HalfFineTuning(seed=0)
    probe = Probe(cb)
    before = _params(module)
    _trainer([cb, probe], steps=4).fit(module, datamodule=ListDataModule(n_batches=2))
    assert {n for u in cb.units for n in u.params} == lora and not cb.non_layer
    assert all(u.category == "self_attn" for u in cb.units)
    for stage_first in (0, 2):
        chosen = [s for s in probe.sel[stage_first][1]]
        assert len(chosen) == 2 and {s.split(":")[0] for s in chosen} == {"0", "1"}  # 1 of {q, v} per layer
        assert probe.grad[stage_first] < lora
    after = _params(module)
    for n in before:
        if n not in lora:
            assert torch.equal(before[n], after[n]), n  # the user's frozen base stays frozen
    assert any(not torch.equal(before[n], after[n]) for n in lora)


# -- DDP ------------------------------------------------------------------------------------------------------------

class _RankDump(pl.Callback):
    def __init__(self, hft, path):
        self.hft, self.path, self.sel = hft, path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.sel.append(list(self.hft.selection))

    def on_train_end(self, trainer, pl_module):
        torch.save({"sel": self.sel, "params": _params(pl_module)}, self.path / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_share_the_selection_and_sync_thawed_tensors(tmp_path):
    torch.manual_seed(0)
    module = _module()
    cb = HalfFineTuning(reselect="steps", stage_steps=1, reset_moments_on_thaw=False)  # seed from PL_GLOBAL_SEED / 0
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True),
        max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[cb, _RankDump(cb, tmp_path)], limit_val_batches=0, use_distributed_sampler=True,
    )
    trainer.fit(module, datamodule=ListDataModule(n_batches=6))  # each rank sees different batches
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["sel"] == r1["sel"] and len({tuple(s) for s in r0["sel"]}) == 3
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n  # tensors that thawed mid-run are all-reduced too
