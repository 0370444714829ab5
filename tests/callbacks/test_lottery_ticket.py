"""LT-SFT (LotteryTicketSparseFT) and sparse diffs: exact top-K, phase switch (reset, optimizer state, masks through
AdamW weight decay), export / compose, resume in both phases, composition with other parameter callbacks, plain /
PEFT modules, DDP."""

from __future__ import annotations

import csv

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import lit_ft
from lit_ft.callbacks import LotteryTicketSparseFT
from lit_ft.callbacks._param_plan import param_plans_for
from lit_ft.callbacks.param_reset.lottery_ticket import topk_abs_delta_masks
from lit_ft.core.optim import verify_optimizer
from lit_ft.core.params import ParamPlan, ParamPlanConflict, pack_mask
from lit_ft.core.sparse_diff import SparseDiffError, load_sparse_diff, save_sparse_diff, sparse_diff_from_params
from lit_ft.modules import CausalLMModule

from helpers import (
    ListDataModule, PlainHFModule, PlanCallback, assert_state_dicts_equal, fit_and_resume, random_batch,
    tiny_config,
)
from helpers import LoraModule

_Plan = PlanCallback


def _trainer(callbacks, max_steps=4, tmp_path=None, logger=False, **kw):
    return pl.Trainer(
        max_steps=max_steps, logger=logger, enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, limit_val_batches=0,
        default_root_dir=tmp_path, **kw,
    )


def _module(seed=0, **kw):
    torch.manual_seed(seed)
    return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=kw.pop("weight_decay", 0.5), **kw)


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


class _Probe(pl.Callback):
    """Runs after LT-SFT at every batch end; records what the switch left behind."""

    def __init__(self, cb):
        self.cb, self.seen = cb, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.seen is None and self.cb.phase == 2:
            opt = trainer.optimizers[0]
            verify_optimizer(opt, pl_module, param_plans_for(pl_module).composed)
            self.seen = {
                "step": trainer.global_step,
                "state_len": len(opt.state),
                "params": _params(pl_module),
                "in_opt": {id(p) for g in opt.param_groups for p in g["params"]},
            }


# -- the threshold -----------------------------------------------------------------------------------------------


def test_topk_masks_equal_a_stable_sort_of_all_values_with_ties():
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(37, 5, generator=g), "b": torch.randn(101, generator=g), "c": torch.zeros(3, 3)}
    # rounded deltas: many exact ties, and an all-zero tensor
    theta0 = {k: v + (torch.randn(v.shape, generator=g) * 0.1).round(decimals=2) for k, v in params.items()}
    theta0["c"] = params["c"].clone()
    flat = torch.cat([(params[k] - theta0[k]).abs().reshape(-1) for k in params])
    order = flat.sort(descending=True, stable=True).indices
    for k in [1, 7, 50, 120, 190, flat.numel()]:
        masks, thr = topk_abs_delta_masks(params, theta0, k, chunk=16)  # chunks smaller than every tensor
        sel = torch.cat([masks[n].reshape(-1) for n in params])
        expected = torch.zeros_like(sel)
        expected[order[:k]] = True
        assert int(sel.sum()) == k
        assert torch.equal(sel, expected), k  # ties broken by model order, then flat index
        assert thr == float(flat[order[k - 1]])
    with pytest.raises(ValueError, match=r"`k` must be an int in \[1, 295\]"):
        topk_abs_delta_masks(params, theta0, 296)
    params["b"][3] = float("nan")
    with pytest.raises(ValueError, match="'b'.*not finite"):
        topk_abs_delta_masks(params, theta0, 5)


# -- phases, masks through AdamW weight decay, export ----------------------------------------------------------------


def test_phase_switch_masks_survive_adamw_weight_decay_and_diff_reproduces_the_model(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    module = _module()
    theta0 = _params(module)
    cb = LotteryTicketSparseFT(proportion=0.05, phase1_steps=2)
    probe = _Probe(cb)
    trainer = _trainer([cb, probe], max_steps=5, logger=CSVLogger(tmp_path / "logs"), log_every_n_steps=1)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    head = "model.lm_head.weight"
    assert cb.always_trained == [head] and head not in cb.maskable  # untied lm_head: trained in full
    assert cb.kept == cb.k == int(0.05 * cb.num_maskable)

    # right after the switch: every trainable tensor back at θ₀, optimizer state empty and consistent
    assert probe.seen["step"] == 2 and probe.seen["state_len"] == 0 and cb.optimizer_states_cleared > 0
    for n in cb.maskable + [head]:
        assert torch.equal(probe.seen["params"][n], theta0[n]), n
    frozen = [n for n, m in cb.masks.items() if not m.any()]
    for n in frozen:  # tensors without a kept entry left the optimizer
        assert id(dict(module.named_parameters())[n]) not in probe.seen["in_opt"]

    # end of phase 2 (3 AdamW steps, weight_decay=0.5): masked-out entries bit-identical to θ₀, kept ones moved
    after = dict(module.named_parameters())
    moved = 0
    for n, m in cb.masks.items():
        assert torch.equal(after[n][~m], theta0[n][~m]), n
        moved += int((after[n][m] != theta0[n][m]).sum())
    assert moved > 0.9 * cb.kept
    assert not torch.equal(after[head], theta0[head])

    # the exported diff: only the kept entries (+ the dense head); base + φ == the fine-tuned model, bit for bit
    diff = load_sparse_diff(cb.last_export_path)
    assert cb.last_export_path.startswith(str(tmp_path / "logs")) and cb.last_export_path.endswith("sparse_diff.safetensors")
    assert diff.module_prefix == "model." and diff.entries[head].kind == "dense"
    assert sum(e.nnz for n, e in diff.entries.items() if n != head) == cb.kept
    base = _module()
    lit_ft.compose_sparse_diffs(base, [cb.last_export_path])
    for (n, a), (_, b) in zip(base.named_parameters(), module.named_parameters()):
        assert torch.equal(a, b), n

    rows = list(csv.DictReader(open(next((tmp_path / "logs").rglob("metrics.csv")))))
    phases = [float(r["lit_ft/lottery_ticket/phase"]) for r in rows if r.get("lit_ft/lottery_ticket/phase")]
    assert phases[0] == 1.0 and phases[-1] == 2.0
    kept = [float(r["lit_ft/lottery_ticket/kept_entries"]) for r in rows if r.get("lit_ft/lottery_ticket/kept_entries")]
    thr = [float(r["lit_ft/lottery_ticket/threshold"]) for r in rows if r.get("lit_ft/lottery_ticket/threshold")]
    assert kept == [cb.kept] and thr == [pytest.approx(cb.threshold)] and cb.threshold > 0
    frac = [float(r["lit_ft/lottery_ticket/trainable_fraction"]) for r in rows if r.get("lit_ft/lottery_ticket/trainable_fraction")]
    assert frac[0] == 1.0 and frac[-1] < 0.5


def _train_on(seeds, tmp_path, name):
    module = _module()
    dm = ListDataModule(n_batches=2)
    dm.batches = [random_batch(4, 16, seed=s) for s in seeds]
    cb = LotteryTicketSparseFT(proportion=0.05, phase1_steps=2, always_train=[], export_path=str(tmp_path / name))
    _trainer([cb], max_steps=4).fit(module, datamodule=dm)
    return module, cb


def test_two_diffs_from_disjoint_data_compose_like_sequential_application(tmp_path):
    ma, ca = _train_on([0, 1], tmp_path, "a.safetensors")
    mb, cbb = _train_on([10, 11], tmp_path, "b.safetensors")
    a, b = load_sparse_diff(ca.last_export_path), load_sparse_diff(cbb.last_export_path)
    assert all(e.kind == "sparse" for e in a.entries.values()) and a.nnz == ca.kept  # always_train=[]: all sparse

    together, swapped, one_by_one = _module(), _module(), _module()
    base = _params(together)
    lit_ft.compose_sparse_diffs(together, [a, b])
    lit_ft.compose_sparse_diffs(swapped, [cbb.last_export_path, ca.last_export_path])
    lit_ft.compose_sparse_diffs(one_by_one, [a])
    lit_ft.compose_sparse_diffs(one_by_one, [b])
    pa, pb = dict(ma.named_parameters()), dict(mb.named_parameters())
    overlap = only_a = 0
    for (n, t), (_, s), (_, o) in zip(together.named_parameters(), swapped.named_parameters(), one_by_one.named_parameters()):
        assert torch.equal(t, o), n
        assert torch.equal(t, s), n
        m_a, m_b = ca.masks[n], cbb.masks[n]
        assert torch.equal(t[m_a & ~m_b], pa[n][m_a & ~m_b])  # entries of one diff only land on its fine-tuned value
        assert torch.equal(t[m_b & ~m_a], pb[n][m_b & ~m_a])
        assert torch.equal(t[~m_a & ~m_b], base[n][~m_a & ~m_b])
        both = m_a & m_b
        torch.testing.assert_close(t[both], base[n][both] + (pa[n][both] - base[n][both]) + (pb[n][both] - base[n][both]))
        overlap += int(both.sum())
        only_a += int((m_a & ~m_b).sum())
    assert only_a > 0 and overlap > 0


def test_compose_name_prefix_and_clear_errors(tmp_path):
    module, cb = _train_on([0, 1], tmp_path, "a.safetensors")
    path = cb.last_export_path
    hf = _module().model  # the bare HF model: names without the LightningModule's "model." prefix
    counts = lit_ft.compose_sparse_diffs(hf, [path])  # auto: strips the recorded module_prefix
    assert sum(counts.values()) == cb.kept
    for (n, a), (_, b) in zip(hf.named_parameters(), module.model.named_parameters()):
        assert torch.equal(a, b), n
    with pytest.raises(SparseDiffError, match="(?s)not parameters of the model.*names_prefix"):
        lit_ft.compose_sparse_diffs(_module().model, [path], names_prefix="")
    with pytest.raises(SparseDiffError, match="does not start with names_prefix 'foo.'"):
        lit_ft.compose_sparse_diffs(_module(), [path], names_prefix="foo.")
    wide = CausalLMModule(model_config=tiny_config(intermediate_size=48))
    before = _params(wide)
    with pytest.raises(SparseDiffError, match=r"shape \[64, 32\].*shape \[48, 32\]"):
        lit_ft.compose_sparse_diffs(wide, [path])
    for n, p in wide.named_parameters():  # checked before anything changed
        assert torch.equal(p, before[n]), n
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(SparseDiffError, match="not a lit_ft sparse diff"):
        lit_ft.compose_sparse_diffs(module, [str(tmp_path / "other.safetensors")])
    with pytest.raises(TypeError, match="list of paths"):
        lit_ft.compose_sparse_diffs(module, path)


def test_export_function_dense_compact_and_float32(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = torch.rand(5, 6) < 0.3
    with torch.no_grad():
        model.weight.add_(torch.randn(5, 6) * mask)
        model.bias.add_(1.0)
    compact = {"weight": theta0["weight"][mask], "bias": theta0["bias"]}
    out = lit_ft.callbacks.param_reset.export_sparse_diff(model, compact, {"weight": mask}, tmp_path / "d.safetensors",
                                                          diff_dtype="float32")
    d = load_sparse_diff(tmp_path / "d.safetensors")
    assert d.diff_dtype == "float32" and d.entries["weight"].values.dtype == torch.float32
    assert torch.equal(d.entries["weight"].indices, mask.reshape(-1).nonzero().squeeze(1))
    assert d.entries["bias"].kind == "dense" and out.nnz == int(mask.sum()) + 5
    fresh = torch.nn.Linear(6, 5)
    fresh.load_state_dict(theta0)
    lit_ft.compose_sparse_diffs(fresh, [d])
    torch.testing.assert_close(fresh.weight, model.weight, rtol=2e-7, atol=0)
    with pytest.raises(ValueError, match="expected the parameter's shape"):
        sparse_diff_from_params(model, {"weight": theta0["weight"][:2]}, {"weight": mask})
    with pytest.raises(KeyError, match="no base values"):
        sparse_diff_from_params(model, {}, {"weight": mask})
    save_sparse_diff(out, tmp_path / "sub" / "e.safetensors")  # creates the folder
    assert load_sparse_diff(tmp_path / "sub" / "e.safetensors").nnz == out.nnz


# -- resume ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("phase1_steps,phase_at_ckpt", [(3, 1), (1, 2)], ids=["resume_in_phase1", "resume_in_phase2"])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, phase1_steps, phase_at_ckpt):
    # 2 batches per epoch: the step-2 checkpoint falls on an epoch boundary, so data order is the same
    r = fit_and_resume(
        _module, lambda: [LotteryTicketSparseFT(proportion=0.05, phase1_steps=phase1_steps, export=False)], tmp_path,
        max_steps=5)
    (cb_full,), (cb_res,) = r.callbacks_full, r.callbacks_resumed
    saved = torch.load(r.ckpt, weights_only=True)["callbacks"][cb_full.state_key]
    assert saved["phase"] == phase_at_ckpt
    if phase_at_ckpt == 2:
        assert saved["plan"]["entries"]  # packed masks
        assert sum(t.numel() for t in saved["theta0"].values()) < cb_full.num_maskable  # compact θ₀ in phase 2
    assert cb_res.phase == 2 and cb_res.kept == cb_full.kept
    for n, m in cb_full.masks.items():
        assert torch.equal(cb_res.masks[n], m), n
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    theta0_full, _ = cb_full.sparse_diff_inputs()
    theta0_res, _ = cb_res.sparse_diff_inputs()
    for n in theta0_full:
        assert torch.equal(theta0_full[n], theta0_res[n]), n


# -- phase 2's LR schedule --------------------------------------------------------------------------------------


class _LrRecorder(pl.Callback):
    """The base learning rates every optimizer step runs at (one value: all groups share the module's lr)."""

    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        lrs = {round(g["lr"], 12) for g in optimizer.param_groups if g["params"]}
        assert len(lrs) == 1, lrs
        self.lrs.append(lrs.pop())


@pytest.mark.parametrize("schedule", ["restart", "continue"])
def test_phase2_restarts_the_lr_schedule_by_default(schedule):
    """The reference trains phase 2 with a fresh optimizer and schedule: the warm-up runs again from step 0."""
    module = _module(warmup_steps=4)  # LambdaLR warm-up: lr * min(1, (step + 1) / 4)
    kw = {} if schedule == "restart" else {"phase2_schedule": "continue"}
    cb = LotteryTicketSparseFT(proportion=0.05, phase1_steps=3, export=False, **kw)
    rec = _LrRecorder()
    _trainer([cb, rec], max_steps=6).fit(module, datamodule=ListDataModule(n_batches=2))
    warm = [1e-2 * min(1.0, (s + 1) / 4) for s in range(3)]
    phase2 = warm if schedule == "restart" else [1e-2 * min(1.0, (s + 1) / 4) for s in range(3, 6)]
    assert rec.lrs == pytest.approx(warm + phase2)
    assert cb.optimizer_states_cleared > 0  # a fresh optimizer state in both modes


def test_resume_in_phase2_after_a_schedule_restart_equals_uninterrupted(tmp_path):
    r = fit_and_resume(lambda: _module(warmup_steps=4),
                       lambda: [LotteryTicketSparseFT(proportion=0.05, phase1_steps=1, export=False)], tmp_path,
                       max_steps=5)
    assert r.callbacks_full[0].phase == 2
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    s_full = r.trainer_full.lr_scheduler_configs[0].scheduler
    s_res = r.trainer_resumed.lr_scheduler_configs[0].scheduler
    assert s_full.last_epoch == s_res.last_epoch == 4  # restarted after step 1, then 4 phase-2 steps


# -- the optional L1 pull towards θ₀ ------------------------------------------------------------------------------


class _GradAt(pl.Callback):
    """After LT-SFT in the list: the gradients and weights the optimizer step ``step`` will use."""

    def __init__(self, step):
        self.step, self.grads, self.params = step, None, None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.step:
            named = dict(pl_module.named_parameters())
            self.grads = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
            self.params = {n: p.detach().clone() for n, p in named.items()}


def _grads_with_l1(step, **kw):
    module = _module(weight_decay=0.0)
    theta0 = _params(module)
    cb = LotteryTicketSparseFT(proportion=0.05, export=False, **kw)
    probe = _GradAt(step)
    _trainer([cb, probe], max_steps=step + 1).fit(module, datamodule=ListDataModule(n_batches=2))
    return cb, probe, theta0


@pytest.mark.parametrize("phase", [1, 2])
def test_l1_pull_adds_its_subgradient_once_per_step(phase):
    """The gradient difference with and without the L1 term is exactly λ·sign(θ − θ₀)/N on the maskable tensors
    (phase 2: on the kept entries only); the first steps are identical (θ = θ₀ there), so θ matches at ``step``."""
    lam, step = 0.3, (1 if phase == 1 else 2)  # the second step of the phase: θ ≠ θ₀, same θ in both runs
    key = "full_l1_reg" if phase == 1 else "sparse_l1_reg"
    p1 = {"phase1_steps": 5} if phase == 1 else {"phase1_steps": 1}
    cb, with_l1, theta0 = _grads_with_l1(step, **p1, **{key: lam})
    _, without, _ = _grads_with_l1(step, **p1)
    assert cb.phase == phase and cb.last_l1_distance > 0
    checked = 0
    for n in cb.maskable:
        if n not in with_l1.grads:
            continue
        torch.testing.assert_close(with_l1.params[n], without.params[n], rtol=0, atol=0)
        want = torch.sign(with_l1.params[n] - theta0[n]) * lam / cb.num_maskable
        if phase == 2:
            want = want * cb.masks[n]
        torch.testing.assert_close(with_l1.grads[n] - without.grads[n], want, rtol=0, atol=1e-7)
        checked += int(want.count_nonzero())
    assert checked > 0
    for n in cb.always_trained:  # the head is not pulled (the reference's penalty covers the maskable tensors)
        torch.testing.assert_close(with_l1.grads[n], without.grads[n], rtol=0, atol=0)


# -- composition with other parameter callbacks ------------------------------------------------------------------


def test_composes_with_a_freezing_callback_and_conflicts_raise():
    module = _module()
    theta0 = _params(module)
    freeze = _Plan(lambda m: ParamPlan.freeze(m, ["model.model.layers.0.*"], owner="FreezeL0"), "F")
    cb = LotteryTicketSparseFT(num_params=300, phase1_steps=2, export=False)
    _trainer([freeze, cb]).fit(module, datamodule=ListDataModule(n_batches=2))
    assert not any(n.startswith("model.model.layers.0.") for n in cb.maskable)
    assert cb.kept == 300
    for n, p in module.named_parameters():
        if n.startswith("model.model.layers.0."):
            assert torch.equal(p, theta0[n]), n
    assert not torch.equal(module.model.model.layers[1].mlp.up_proj.weight, theta0["model.model.layers.1.mlp.up_proj.weight"])

    module = _module()
    head_freezer = _Plan(lambda m: ParamPlan.freeze(m, ["model.lm_head.weight"], owner="HeadFreezer"), "H")
    cb = LotteryTicketSparseFT(phase1_steps=1, always_train=["model.lm_head.weight"])
    with pytest.raises(ParamPlanConflict, match="(?s)LotteryTicketSparseFT.*HeadFreezer"):
        _trainer([head_freezer, cb]).fit(module, datamodule=ListDataModule(n_batches=2))


# -- plain module, epochs, bf16 θ₀; PEFT -------------------------------------------------------------------------


def test_plain_module_epoch_boundary_and_bf16_theta0():
    torch.manual_seed(0)
    module = PlainHFModule(lr=0.5)
    theta0 = _params(module)
    cb = LotteryTicketSparseFT(proportion=0.02, phase1_epochs=1, theta0_dtype="bfloat16", export=False)
    _trainer([cb], max_steps=4).fit(module, datamodule=ListDataModule(n_batches=2))
    assert cb._switched_at == 2 and cb.phase == 2  # end of epoch 0 = step 2
    moved = 0
    for n, m in cb.masks.items():
        p = dict(module.named_parameters())[n]
        assert torch.equal(p[~m], theta0[n].bfloat16().float()[~m]), n  # reset landed on the bf16 copy and stayed
        moved += int((p[m] != theta0[n].bfloat16().float()[m]).sum())
    assert moved > 0


def test_peft_wrapped_model_only_lora_entries_are_masked(tmp_path):
    pytest.importorskip("peft")

    def PeftModule():
        return LoraModule(seed=None, weight_decay=0.3)

    torch.manual_seed(0)
    module = PeftModule()
    theta0 = _params(module)
    cb = LotteryTicketSparseFT(proportion=0.1, phase1_steps=2, export_path=str(tmp_path / "lora.safetensors"))
    _trainer([cb]).fit(module, datamodule=ListDataModule(n_batches=2))
    assert cb.maskable and all("lora_" in n for n in cb.maskable) and cb.always_trained == []
    after = dict(module.named_parameters())
    for n, p in after.items():
        if "lora_" not in n:
            assert torch.equal(p, theta0[n]), n  # the user's frozen base stays frozen
        else:
            assert torch.equal(p[~cb.masks[n]], theta0[n][~cb.masks[n]]), n
    diff = load_sparse_diff(cb.last_export_path)
    assert diff.nnz == cb.kept and diff.module_prefix == "model.base_model.model."
    torch.manual_seed(0)
    fresh = PeftModule()
    lit_ft.compose_sparse_diffs(fresh, [diff])
    for (n, a), (_, b) in zip(fresh.named_parameters(), module.named_parameters()):
        assert torch.equal(a, b), n


# -- arguments ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"proportion": 0}, r"`proportion` must be a number in \(0, 1\], got 0"),
        ({"num_params": 0}, "`num_params` must be an int >= 1 or null \\(= from `proportion`\\), got 0"),
        ({"phase1_steps": 2, "phase1_epochs": 1}, "exclusive"),
        ({"phase1_fraction": 1.0}, r"`phase1_fraction` must be a number in \(0, 1\)"),
        ({"theta0_device": "gpu"}, r"`theta0_device` must be one of \('cpu', 'same'\), got 'gpu'"),
        ({"phase2_schedule": "keep"}, r"`phase2_schedule` must be one of \('restart', 'continue'\), got 'keep'"),
        ({"full_l1_reg": -0.1}, r"`full_l1_reg` must be a finite number >= 0, got -0.1"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        LotteryTicketSparseFT(**kw)


def test_defaults_and_run_time_errors(tmp_path):
    cb = LotteryTicketSparseFT()
    assert cb.proportion == 0.01 and cb.phase1_fraction == 0.5 and cb.diff_dtype == "float64"
    with pytest.raises(ValueError, match=r"`num_params`=10000000 exceeds the \d+ maskable entries"):
        _trainer([LotteryTicketSparseFT(num_params=10_000_000)], max_steps=2).fit(_module(), datamodule=ListDataModule(2))
    with pytest.raises(Exception, match="matched no parameter"):
        _trainer([LotteryTicketSparseFT(always_train=["head.*"])], max_steps=2).fit(_module(), datamodule=ListDataModule(2))
    # default phase1_fraction: half of the run
    cb = LotteryTicketSparseFT()
    with pytest.warns(UserWarning, match="ended in phase 1.*no sparse diff"):
        _trainer([cb], max_steps=1, tmp_path=tmp_path).fit(_module(), datamodule=ListDataModule(2))
    assert cb.phase == 1 and cb.last_export_path is None and not list(tmp_path.rglob("*.safetensors"))
    cb = LotteryTicketSparseFT(export=False)
    _trainer([cb], max_steps=4).fit(_module(), datamodule=ListDataModule(2))
    assert cb.boundary_step == 2 and cb._switched_at == 2


# -- DDP ---------------------------------------------------------------------------------------------------------


class _DumpMasks(pl.Callback):
    def __init__(self, cb, folder):
        self.cb, self.folder = cb, folder

    def on_train_end(self, trainer, pl_module):
        torch.save({"masks": {n: pack_mask(m) for n, m in self.cb.masks.items()}, "threshold": self.cb.threshold,
                    "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()}},
                   f"{self.folder}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_select_identical_masks(tmp_path):
    from lightning.pytorch.strategies import DDPStrategy

    module = _module()
    cb = LotteryTicketSparseFT(proportion=0.05, phase1_steps=1, export=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(start_method="spawn", find_unused_parameters=True),
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[cb, _DumpMasks(cb, str(tmp_path))], use_distributed_sampler=True,
    )
    trainer.fit(module, datamodule=ListDataModule(n_batches=4))  # each rank sees different batches
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["threshold"] == r1["threshold"] > 0
    assert r0["masks"].keys() == r1["masks"].keys() and r0["masks"]
    for n in r0["masks"]:
        assert torch.equal(r0["masks"][n]["bits"], r1["masks"][n]["bits"]), n
    for n in r0["params"]:
        assert torch.equal(r0["params"][n], r1["params"][n]), n


# -- several iterations (the reference's n_ft_iterations) ----------------------------------------------------------


def test_topk_exclude_selects_among_the_allowed_entries_only():
    g = torch.Generator().manual_seed(3)
    params = {"a": torch.randn(23, 3, generator=g), "b": torch.randn(41, generator=g)}
    theta0 = {k: v + (torch.randn(v.shape, generator=g) * 0.1).round(decimals=2) for k, v in params.items()}
    exclude = {"a": torch.rand(23, 3, generator=g) < 0.5}  # "b": nothing excluded
    flat = torch.cat([(params[k] - theta0[k]).abs().reshape(-1) for k in params])
    allowed = torch.cat([~exclude["a"].reshape(-1), torch.ones(41, dtype=torch.bool)])
    order = [i for i in flat.sort(descending=True, stable=True).indices.tolist() if allowed[i]]
    for k in (1, 9, len(order)):
        masks, thr = topk_abs_delta_masks(params, theta0, k, chunk=8, exclude=exclude)
        sel = torch.cat([masks[n].reshape(-1) for n in params])
        expected = torch.zeros_like(sel)
        expected[order[:k]] = True
        assert torch.equal(sel, expected), k
        assert not bool((masks["a"] & exclude["a"]).any())
    with pytest.raises(ValueError, match=rf"\[1, {len(order)}\] \(the number of maskable entries not selected yet\)"):
        topk_abs_delta_masks(params, theta0, len(order) + 1, exclude=exclude)


class _BeforeSwitch(pl.Callback):
    """Listed before LT-SFT: the weights at every batch end before LT-SFT acts on them, and what LT-SFT left."""

    def __init__(self):
        self.before, self.masks, self.phase = {}, {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.before[trainer.global_step] = _params(pl_module)


class _AfterSwitch(pl.Callback):
    def __init__(self, cb, before):
        self.cb, self.b = cb, before
        self.after, self.trainable = {}, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        s = trainer.global_step
        self.after[s] = _params(pl_module)
        self.b.masks[s] = {n: m.clone() for n, m in self.cb.masks.items()}
        self.b.phase[s] = (self.cb.iteration, self.cb.phase)
        self.trainable[s] = {n for n, p in pl_module.named_parameters() if p.requires_grad}


def test_two_iterations_follow_the_reference_loop():
    """iterations=2 over 8 steps, 2 full steps per iteration: select K//2 at step 2 and reset to θ₀; lift the masks
    at step 4 (all maskable tensors train again); at step 6 select K//2 *more* entries (largest |θ − θ₀| among the
    rest, θ₀ = the weights at fit start), reset to the weights of step 4; entries never selected end at θ₀."""
    module = _module(weight_decay=0.0, warmup_steps=2)
    theta0 = _params(module)
    cb = LotteryTicketSparseFT(num_params=40, iterations=2, phase1_steps=2, export=False, always_train=[])
    before = _BeforeSwitch()
    after = _AfterSwitch(cb, before)
    rec = _LrRecorder()
    _trainer([before, cb, after, rec], max_steps=8).fit(module, datamodule=ListDataModule(n_batches=2))
    assert cb.iteration_starts == [0, 4] and cb.k_per_iteration == 20
    assert [before.phase[s] for s in range(1, 9)] == [(0, 1), (0, 2), (0, 2), (1, 1), (1, 1), (1, 2), (1, 2), (1, 2)]
    maskable = cb.maskable
    # the first selection: the top 20 of |θ − θ₀| at step 2, then θ = θ₀
    m1, _ = topk_abs_delta_masks({n: before.before[2][n] for n in maskable}, theta0, 20)
    assert all(torch.equal(before.masks[2][n], m1[n]) for n in maskable)
    assert all(torch.equal(after.after[2][n], theta0[n]) for n in maskable)
    # step 4: the masks are lifted: every maskable tensor trains, the selected entries stay recorded
    assert set(maskable) <= after.trainable[4]
    assert all(torch.equal(before.masks[4][n], m1[n]) for n in maskable)
    snapshot = after.after[4]
    assert all(torch.equal(snapshot[n], before.before[4][n]) for n in maskable)  # no reset at the lift
    # the second selection excludes the first 20, measured against the fit-start θ₀; then θ = the step-4 weights
    m2, _ = topk_abs_delta_masks({n: before.before[6][n] for n in maskable}, theta0, 20, exclude=m1)
    union = {n: m1[n] | m2[n] for n in maskable}
    assert cb.kept == 40 and all(torch.equal(before.masks[6][n], union[n]) for n in maskable)
    assert all(torch.equal(after.after[6][n], snapshot[n]) for n in maskable)
    # entries never selected end exactly at θ₀ (they were θ₀ at step 4 and stay frozen); the selected ones moved
    final = after.after[8]
    for n in maskable:
        assert torch.equal(final[n][~union[n]], theta0[n][~union[n]]), n
    assert sum(int((final[n] != theta0[n]).sum()) for n in maskable) > 20
    # every phase starts a fresh schedule: the 2-step warm-up runs four times
    warm = [1e-2 * min(1.0, (s + 1) / 2) for s in range(2)]
    assert rec.lrs == pytest.approx(warm * 4)
    # the exported diff (θ₀ at the kept entries) rebuilds the final weights
    theta0_kept, masks = cb.sparse_diff_inputs()
    for n, m in masks.items():
        assert torch.equal(theta0_kept[n].reshape(-1), theta0[n].reshape(-1)[m.reshape(-1)]), n


@pytest.mark.parametrize("ckpt_step", [2, 4, 6], ids=["iter0_sparse", "iter1_full", "iter1_sparse"])
def test_two_iterations_resume_equals_uninterrupted(tmp_path, ckpt_step):
    r = fit_and_resume(
        lambda: _module(warmup_steps=2),
        lambda: [LotteryTicketSparseFT(num_params=40, iterations=2, phase1_steps=1, export=False)], tmp_path,
        max_steps=8, ckpt_name=f"epoch={ckpt_step // 2 - 1}-step={ckpt_step}.ckpt")
    (cb_full,), (cb_res,) = r.callbacks_full, r.callbacks_resumed
    saved = torch.load(r.ckpt, weights_only=True)["callbacks"][cb_full.state_key]
    assert (saved["iteration"], saved["phase"]) == {2: (0, 2), 4: (1, 1), 6: (1, 2)}[ckpt_step]
    if ckpt_step == 4:
        assert "snapshot" in saved and saved["plan"]["entries"]  # the step-4 weights and the first selection
    assert (cb_res.iteration, cb_res.phase, cb_res.kept) == (cb_full.iteration, cb_full.phase, cb_full.kept) == (1, 2, 40)
    for n, m in cb_full.masks.items():
        assert torch.equal(cb_res.masks[n], m), n
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"iterations": 0}, r"`iterations` must be an int >= 1, got 0"),
        ({"iterations": 2, "phase1_epochs": 1}, r"`phase1_epochs` \(1\) applies to one iteration only"),
    ],
)
def test_iterations_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        LotteryTicketSparseFT(**kw)


def test_iterations_run_time_errors():
    with pytest.raises(ValueError, match=r"K // iterations = 0 entries per iteration \(K = 3\)"):
        _trainer([LotteryTicketSparseFT(num_params=3, iterations=4)], max_steps=8).fit(_module(), datamodule=ListDataModule(2))
    with pytest.raises(ValueError, match="a full phase of 4 steps leaves no sparse phase"):
        _trainer([LotteryTicketSparseFT(iterations=2, phase1_steps=4)], max_steps=8).fit(_module(), datamodule=ListDataModule(2))
