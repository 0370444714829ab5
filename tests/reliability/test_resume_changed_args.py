"""Resuming a stateful technique with a changed argument (issue 18 items 1, 5 and 11): the saved state is restored
when it stays valid under the new value, and the resume is refused with an error naming the argument otherwise —
never a silent reset. One scenario per stateful technique: fit to step 2 with a checkpoint, resume with another
argument, compare with an uninterrupted run that had the new argument from the start (or switched to it at step 2).
Also the learning rate of a resumed run (`ConfiguredLearningRate`)."""

from __future__ import annotations

import re

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

import lit_ft
from lit_ft.callbacks import (
    ExcessLossSelection, FreezeLayers, HalfFineTuning, LocalizedTuning, LotteryTicketSparseFT, MaskedThought,
    ReinitTopLayers, SSToken,
)
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, PlanCallback, assert_state_dicts_equal, tiny_config

CKPT = "epoch=0-step=2.ckpt"


def _module(lr: float = 1e-2, **kw) -> CausalLMModule:
    return CausalLMModule(model_config=tiny_config(), learning_rate=lr, weight_decay=kw.pop("weight_decay", 0.5), **kw)


def _fit(callbacks, max_steps=4, save_dir=None, ckpt_path=None, make_module=_module):
    """One fit of a fresh seeded module (2 batches per epoch: the step-2 checkpoint is on an epoch boundary, so the
    data order of a resumed run is the uninterrupted run's)."""
    torch.manual_seed(0)
    module = make_module()
    cbs = list(callbacks)
    if save_dir is not None:
        cbs.append(ModelCheckpoint(dirpath=save_dir, every_n_train_steps=2, save_top_k=-1))
    trainer = pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=save_dir is not None,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=cbs)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2), ckpt_path=ckpt_path)
    return module, trainer


def _checkpoint(tmp_path, callbacks, max_steps=2, make_module=_module) -> str:
    _fit(callbacks, max_steps=max_steps, save_dir=tmp_path, make_module=make_module)
    return str(tmp_path / CKPT)


class _SetAt(Callback):
    """Sets ``target.<attr> = value`` at the first batch after ``step`` optimizer steps (listed before the target:
    the reference for "resumed at ``step`` with the new value")."""

    def __init__(self, target, attr, value, step=2):
        self.target, self.attr, self.value, self.step = target, attr, value, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            setattr(self.target, self.attr, self.value)


class _AtTrainStart(Callback):
    """Runs ``fn(trainer, pl_module)`` at ``on_train_start`` (after Lightning restored everything)."""

    def __init__(self, fn):
        self.fn, self.seen = fn, None

    def on_train_start(self, trainer, pl_module):
        self.seen = self.fn(trainer, pl_module)


# -- LotteryTicketSparseFT (item 1) --------------------------------------------------------------------------------


@pytest.mark.parametrize("changed", [dict(phase1_steps=4), dict(proportion=0.1)], ids=["phase1_steps", "proportion"])
def test_lottery_ticket_resumed_in_phase1_with_a_changed_argument_keeps_theta0(tmp_path, changed):
    """issue 18 item 1: resumed in phase 1 with another ``phase1_steps`` / ``proportion``, θ₀ is the checkpoint's
    (the weights at fit start), the new value applies, and the run (weights, masks, θ₀, exported diff) equals an
    uninterrupted run with the new value — not a θ₀ taken from the step-2 weights."""
    base = dict(proportion=0.05, phase1_steps=3, export=False)
    new = {**base, **changed}
    ckpt = _checkpoint(tmp_path / "ck", [LotteryTicketSparseFT(**base)])
    ref_cb = LotteryTicketSparseFT(**{**new, "export": True}, export_path=str(tmp_path / "ref.safetensors"))
    ref, _ = _fit([ref_cb], max_steps=5)
    res_cb = LotteryTicketSparseFT(**{**new, "export": True}, export_path=str(tmp_path / "res.safetensors"))
    res, _ = _fit([res_cb], max_steps=5, ckpt_path=ckpt)
    assert res_cb.phase == ref_cb.phase == 2 and res_cb.k == ref_cb.k and res_cb._switched_at == ref_cb._switched_at
    for n, m in ref_cb.masks.items():
        assert torch.equal(res_cb.masks[n], m), n
    assert_state_dicts_equal(ref.state_dict(), res.state_dict())
    # the exported diff composes onto the initial weights to the fine-tuned model
    torch.manual_seed(0)
    fresh = _module()
    lit_ft.compose_sparse_diffs(fresh, [res_cb.last_export_path])
    for (n, a), (_, b) in zip(fresh.named_parameters(), res.named_parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("changed, name", [(dict(proportion=0.1), "proportion"), (dict(phase1_steps=2), "phase1_steps"),
                                           (dict(always_train=[]), "always_train"), (dict(iterations=2), "iterations")])
def test_lottery_ticket_resumed_in_phase2_with_a_changed_argument_is_refused(tmp_path, changed, name):
    """issue 18 item 1: after the switch the kept entries were chosen with the saved values and θ₀ outside them is
    gone: a changed selection / phase-1 argument is refused with an error naming it and both values."""
    base = dict(proportion=0.05, phase1_steps=1, export=False)
    ckpt = _checkpoint(tmp_path, [LotteryTicketSparseFT(**base)])
    saved = torch.load(ckpt, weights_only=False)["callbacks"]
    assert next(iter(saved.values()))["phase"] == 2
    old = {"proportion": 0.05, "phase1_steps": 1, "always_train": None, "iterations": 1}[name]
    with pytest.raises(ValueError, match=rf"(?s){re.escape(f'{name}={changed[name]!r}')}.*checkpoint was made with "
                                         rf"{re.escape(f'{name}={old!r}')}.*switch to phase 2 already happened"):
        _fit([LotteryTicketSparseFT(**{**base, **changed})], max_steps=4, ckpt_path=ckpt)


def test_lottery_ticket_resumed_from_a_checkpoint_without_its_state_warns(tmp_path):
    """issue 18 item 1: the "θ₀ from trained weights" warning fires on resume (``global_step`` is still 0 at
    ``on_fit_start``, so it never fired)."""
    ckpt = _checkpoint(tmp_path, [])
    with pytest.warns(UserWarning, match="holds no state of this callback"):
        _fit([LotteryTicketSparseFT(proportion=0.05, phase1_steps=3, export=False)], max_steps=3, ckpt_path=ckpt)


def test_lottery_ticket_theta0_dtype_bfloat16_to_exact_is_refused(tmp_path):
    """issue 18 item 1 (general rule): a bf16-rounded θ₀ cannot become exact."""
    ckpt = _checkpoint(tmp_path, [LotteryTicketSparseFT(proportion=0.05, phase1_steps=3, theta0_dtype="bfloat16",
                                                        export=False)])
    with pytest.raises(ValueError, match="theta0_dtype='exact'.*theta0_dtype='bfloat16'"):
        _fit([LotteryTicketSparseFT(proportion=0.05, phase1_steps=3, export=False)], max_steps=3, ckpt_path=ckpt)


# -- SSToken (item 5) ------------------------------------------------------------------------------------------------


def test_sstoken_resumed_with_a_changed_keep_ratio_keeps_the_ema_history(tmp_path):
    """issue 18 item 5: resumed with another ``keep_ratio``, the EMA history and its step are the checkpoint's, and
    the run equals an uninterrupted run whose keep_ratio changed at step 2 (before: the history restarted from the
    step-2 weights, silently)."""
    ckpt = _checkpoint(tmp_path, [SSToken(keep_ratio=0.5, history="ema", ema_decay=0.5)])
    saved = next(iter(torch.load(ckpt, weights_only=False)["callbacks"].values()))
    ref_cb = SSToken(keep_ratio=0.5, history="ema", ema_decay=0.5)
    ref, _ = _fit([_SetAt(ref_cb, "keep_ratio", 0.8), ref_cb], max_steps=4)
    res_cb = SSToken(keep_ratio=0.8, history="ema", ema_decay=0.5)
    probe = _AtTrainStart(lambda t, m: (res_cb._ema_step, {k: v.clone() for k, v in res_cb.history_model.state_dict().items()}))
    res, _ = _fit([res_cb, probe], max_steps=4, ckpt_path=ckpt)
    ema_step, history = probe.seen
    assert ema_step == 2
    assert_state_dicts_equal(saved["history_state"], history)
    assert_state_dicts_equal(ref_cb.history_model.state_dict(), res_cb.history_model.state_dict())
    assert_state_dicts_equal(ref.state_dict(), res.state_dict())


@pytest.mark.parametrize("saved_kw, new_kw, name", [
    (dict(history="ema"), dict(history="initial"), "history"),
    (dict(gamma=0.0), dict(gamma=0.5), "gamma"),
], ids=["ema_to_initial", "gamma_0_to_0.5"])
def test_sstoken_change_that_needs_unsaved_history_is_refused(tmp_path, saved_kw, new_kw, name):
    """issue 18 item 5: the saved history weights cannot stand for another kind of history, and with gamma=0 none
    were kept: refused, naming the argument."""
    ckpt = _checkpoint(tmp_path, [SSToken(keep_ratio=0.5, **saved_kw)])
    with pytest.raises(ValueError, match=rf"(?s)SSToken.*{re.escape(f'{name}={new_kw[name]!r}')}"
                                         rf".*{re.escape(f'{name}={saved_kw[name]!r}')}"):
        _fit([SSToken(keep_ratio=0.5, **new_kw)], max_steps=3, ckpt_path=ckpt)


# -- ExcessLossSelection -------------------------------------------------------------------------------------------


def test_excess_loss_resumed_with_a_changed_keep_ratio_keeps_the_initial_reference(tmp_path):
    """issue 18 item 5 (general rule): the reference "initial weights" survive a changed ``keep_ratio`` (before: the
    state was dropped and the reference copied from the resumed module at setup); the run equals one whose
    keep_ratio changed at step 2."""
    ckpt = _checkpoint(tmp_path, [ExcessLossSelection(keep_ratio=0.5, reference="initial")])
    ref_cb = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    ref, _ = _fit([_SetAt(ref_cb, "keep_ratio", 0.8), ref_cb], max_steps=4)
    res_cb = ExcessLossSelection(keep_ratio=0.8, reference="initial")
    # the resumed module is built from another seed (the checkpoint replaces its weights): a reference copied at
    # setup from the module, as when the saved state is dropped, would be those other weights
    res, _ = _fit([res_cb], max_steps=4, ckpt_path=ckpt, make_module=lambda: (torch.manual_seed(1), _module())[1])
    torch.manual_seed(0)
    assert_state_dicts_equal(_module().model.state_dict(), res_cb.reference_model.state_dict())
    assert_state_dicts_equal(ref.state_dict(), res.state_dict())


# -- HalfFineTuning (item 11) --------------------------------------------------------------------------------------


@pytest.mark.parametrize("changed, name", [(dict(ratio=0.75), "ratio"), (dict(train_non_layer=True), "train_non_layer")])
def test_half_fine_tuning_resumed_with_a_changed_selection_argument_names_it(tmp_path, changed, name):
    """issue 18 item 11: a changed ``ratio`` used to fail with an optimizer-layout error naming no argument."""
    base = dict(ratio=0.5, seed=5, reselect="steps", stage_steps=3)
    ckpt = _checkpoint(tmp_path, [HalfFineTuning(**base)])
    old = {**base, "train_non_layer": False}[name]  # False: the default (the paper's split)
    with pytest.raises(ValueError, match=rf"(?s)HalfFineTuning.*{re.escape(f'{name}={changed[name]!r}')}"
                                         rf".*{re.escape(f'{name}={old!r}')}.*current stage's selection"):
        _fit([HalfFineTuning(**{**base, **changed})], max_steps=4, ckpt_path=ckpt)


def test_half_fine_tuning_resumed_with_a_changed_restorable_argument_equals_uninterrupted(tmp_path):
    """issue 18 item 11 (general rule): ``theta0_device`` is placement only: restored, same run."""
    base = dict(ratio=0.5, seed=5, reselect="steps", stage_steps=3, reset_frozen=True)
    ckpt = _checkpoint(tmp_path, [HalfFineTuning(**base)])
    ref, _ = _fit([HalfFineTuning(**base, theta0_device="same")], max_steps=4)
    res_cb = HalfFineTuning(**base, theta0_device="same")
    res, _ = _fit([res_cb], max_steps=4, ckpt_path=ckpt)
    assert res_cb.stage == 1
    assert_state_dicts_equal(ref.state_dict(), res.state_dict())


# -- the other stateful techniques -----------------------------------------------------------------------------------


def test_reinit_top_layers_changed_after_the_reinit_is_refused(tmp_path):
    """issue 18 item 5 (general rule): the re-init is in the checkpoint's weights; another ``num_layers`` cannot
    apply."""
    ckpt = _checkpoint(tmp_path, [ReinitTopLayers(num_layers=1, seed=5)])
    with pytest.raises(ValueError, match=r"(?s)ReinitTopLayers.*num_layers=2.*num_layers=1.*already applied"):
        _fit([ReinitTopLayers(num_layers=2, seed=5)], max_steps=3, ckpt_path=ckpt)


def test_freeze_layers_and_localized_tuning_changed_selection_is_refused(tmp_path):
    """issue 18 item 5 (general rule): what is frozen / trained, and the optimizer state laid out for it, follow the
    saved value."""
    ckpt = _checkpoint(tmp_path / "f", [FreezeLayers(num_layers=1)])
    with pytest.raises(ValueError, match=r"(?s)FreezeLayers.*num_layers=2.*num_layers=1"):
        _fit([FreezeLayers(num_layers=2)], max_steps=3, ckpt_path=ckpt)
    ckpt = _checkpoint(tmp_path / "l", [LocalizedTuning(layer=-1)])
    with pytest.raises(ValueError, match=r"(?s)LocalizedTuning.*layer=0.*layer=-1"):
        _fit([LocalizedTuning(layer=0)], max_steps=3, ckpt_path=ckpt)


def test_masked_thought_resumed_with_a_changed_max_rate_keeps_its_schedule_state(tmp_path):
    """issue 18 item 5 (general rule): the schedule position is restored under a new ``max_rate``."""
    ckpt = _checkpoint(tmp_path, [MaskedThought(max_rate=0.2, seed=3, require_sample_idx=False)])
    saved = next(iter(torch.load(ckpt, weights_only=False)["callbacks"].values()))
    assert saved["step"] > 0
    cb = MaskedThought(max_rate=0.3, seed=3, require_sample_idx=False)
    probe = _AtTrainStart(lambda t, m: (cb._step, cb._rate))
    _fit([cb, probe], max_steps=3, ckpt_path=ckpt)
    assert probe.seen == (saved["step"], saved["rate"])


class _Stateful(PlanCallback):
    """A parameter callback with state and a key built from its argument, declaring no resume decisions."""

    def __init__(self, k):
        super().__init__(lambda m: None)
        self.k, self.loaded = k, None

    @property
    def state_key(self):
        return self._generate_state_key(k=self.k)

    def state_dict(self):
        return {"k": self.k}

    def load_state_dict(self, state_dict):
        self.loaded = state_dict


def test_a_callback_without_decisions_refuses_a_changed_key_and_ambiguity_is_named(tmp_path):
    """issue 18 item 5 (general rule): without per-argument decisions, a changed argument is refused (no silent
    reset); two saved states that could be this instance's are named."""
    ckpt = _checkpoint(tmp_path / "a", [_Stateful(1)])
    with pytest.raises(ValueError, match=r"(?s)_Stateful.*k=2.*checkpoint was made with k=1"):
        _fit([_Stateful(2)], max_steps=3, ckpt_path=ckpt)
    same = _Stateful(1)
    _fit([same], max_steps=3, ckpt_path=ckpt)
    assert same.loaded["k"] == 1
    ckpt = _checkpoint(tmp_path / "b", [SSToken(keep_ratio=0.5), SSToken(keep_ratio=0.6)])
    with pytest.raises(ValueError, match=r"(?s)SSToken.*2 saved states of SSToken"):
        _fit([SSToken(keep_ratio=0.7), SSToken(keep_ratio=0.8)], max_steps=3, ckpt_path=ckpt)


# -- learning rate on resume (item 11) -------------------------------------------------------------------------------


class _LRs(Callback):
    """The first group's lr at every training batch, by global step."""

    def __init__(self):
        self.lrs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_a_changed_learning_rate_is_the_checkpoints_unless_configured_learning_rate_is_used(tmp_path):
    """issue 18 item 11: Lightning restores the param groups' lr and the scheduler's base_lrs from the checkpoint, so
    a resume with learning_rate=2e-2 trains at the checkpoint's 1e-2 (documented); with ``ConfiguredLearningRate``
    the lr of every resumed step is the one an uninterrupted 2e-2 run has at that step (warm-up position kept)."""
    from lit_ft.callbacks.learning_rate import ConfiguredLearningRate

    ckpt = _checkpoint(tmp_path, [], make_module=lambda: _module(lr=1e-2, warmup_steps=4))
    ref_lrs = _LRs()
    _fit([ref_lrs], max_steps=4, make_module=lambda: _module(lr=2e-2, warmup_steps=4))
    plain = _LRs()
    _fit([plain], max_steps=4, ckpt_path=ckpt, make_module=lambda: _module(lr=2e-2, warmup_steps=4))
    assert plain.lrs[2] == pytest.approx(ref_lrs.lrs[2] / 2, rel=1e-12)  # the checkpoint's 1e-2
    override, lrs = ConfiguredLearningRate(), _LRs()
    _, trainer = _fit([override, lrs], max_steps=4, ckpt_path=ckpt,
                      make_module=lambda: _module(lr=2e-2, warmup_steps=4))
    assert lrs.lrs == pytest.approx({s: ref_lrs.lrs[s] for s in (2, 3)}, rel=1e-12)
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs == pytest.approx([2e-2] * len(trainer.optimizers[0].param_groups))
    assert {(g, old, new) for _, g, old, new in override.changed} == \
        {(g, 1e-2, 2e-2) for g in range(len(trainer.optimizers[0].param_groups))}


def test_reapply_learning_rates_keeps_the_schedule_position_and_per_group_rates():
    """issue 18 item 11: two groups (lr 1 and 0.1) restored from a checkpoint made with 0.5 / 0.05 at schedule
    factor 0.25: the configured rates come back at the same factor; base_lrs follow."""
    from lit_ft.core.optim import configured_learning_rates, reapply_learning_rates

    def make(lr):
        a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.AdamW([{"params": [a], "lr": lr}, {"params": [b], "lr": lr / 10}])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.25 * (s + 1))
        return opt, sched

    old_opt, old_sched = make(0.5)
    old_opt.step(), old_sched.step(), old_opt.step(), old_sched.step()
    opt, sched = make(1.0)
    configured = configured_learning_rates(opt)
    opt.load_state_dict(old_opt.state_dict())
    sched.load_state_dict(old_sched.state_dict())
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.5 * 0.75, 0.05 * 0.75])
    changed = reapply_learning_rates(opt, configured, [sched])
    assert changed == [(0, 0.5, 1.0), (1, pytest.approx(0.05), pytest.approx(0.1))]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.75, 0.075])
    assert sched.base_lrs == pytest.approx([1.0, 0.1])
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.1])


class _AllLRs(Callback):
    """Every parameter's lr at every training batch: ``{step: {name: lr}}``."""

    def __init__(self):
        self.lrs = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        names = {id(p): n for n, p in pl_module.named_parameters()}
        self.lrs[trainer.global_step] = {names[id(p)]: g["lr"] for g in trainer.optimizers[0].param_groups
                                         for p in g["params"]}


def test_configured_learning_rate_keeps_a_techniques_per_group_rates_whatever_its_place(tmp_path):
    """issue 18 item 11: listed *before* LayerwiseLRDecay (which splits the groups at on_fit_start), the override
    still records the decayed per-layer rates (it records when the optimizer state is loaded): every tensor's lr at
    the resumed steps is the uninterrupted 2e-2 run's."""
    from lit_ft.callbacks import LayerwiseLRDecay
    from lit_ft.callbacks.learning_rate import ConfiguredLearningRate

    def make(lr):
        return lambda: _module(lr=lr, warmup_steps=4)

    ckpt = _checkpoint(tmp_path, [LayerwiseLRDecay(decay=0.5)], make_module=make(1e-2))
    ref = _AllLRs()
    _fit([LayerwiseLRDecay(decay=0.5), ref], max_steps=4, make_module=make(2e-2))
    res = _AllLRs()
    _fit([ConfiguredLearningRate(), LayerwiseLRDecay(decay=0.5), res], max_steps=4, ckpt_path=ckpt,
         make_module=make(2e-2))
    assert len(set(ref.lrs[2].values())) > 2  # several per-layer rates
    for step in (2, 3):
        assert res.lrs[step] == pytest.approx(ref.lrs[step], rel=1e-12), step


def test_half_fine_tuning_seed_none_resumes_and_another_explicit_seed_is_refused(tmp_path, monkeypatch):
    """issue 18 item 11 (general rule): ``seed=None`` is resolved at setup; a resume with ``None`` or the stored seed
    is accepted, another explicit seed is refused with its name (it used to be replaced silently)."""
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # None resolves to 0
    base = dict(ratio=0.5, reselect="steps", stage_steps=3)
    ckpt = _checkpoint(tmp_path, [HalfFineTuning(**base)])
    for seed in (None, 0):
        cb = HalfFineTuning(**base, seed=seed)
        _fit([cb], max_steps=3, ckpt_path=ckpt)
        assert cb.seed == 0
    with pytest.raises(ValueError, match=r"(?s)HalfFineTuning.*seed=7.*seed=None.*checkpoint's seed 0"):
        _fit([HalfFineTuning(**base, seed=7)], max_steps=3, ckpt_path=ckpt)
