"""GreenTrainer: the DP against brute force, the FLOPs model against measured steps, the probe's exact restore, the
selection's effect in a Trainer (frozen tensors bit-identical under AdamW weight decay, optimizer state kept / dropped
/ fresh), composition, checkpoint -> resume equality, plain / PEFT modules, DDP."""

from __future__ import annotations

import copy
import itertools
import math
import types

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from lit_ft.callbacks import GreenTrainer
from lit_ft.callbacks._param_plan import param_plans_for
from lit_ft.callbacks.tensor_selection.green_trainer import (
    backward_budget,
    flop_counter,
    profile_tensor_flops,
    quantize_costs,
    select_tensors_dp,
    selection_cost,
)
from lit_ft.core.optim import verify_optimizer
from lit_ft.core.params import ParamPlan, ParamPlanConflict
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, PlainHFModule, PlanCallback, random_batch, tiny_config
from helpers import LoraModule

_Plan = PlanCallback

LM = "model.lm_head.weight"
NORM = "model.model.norm.weight"
DOWN1 = "model.model.layers.1.mlp.down_proj.weight"


def _trainer(callbacks, max_steps=4, **kw):
    kw.setdefault("logger", False)
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=callbacks, limit_val_batches=0, **kw)


class Scripted(GreenTrainer):
    """GreenTrainer whose importance is given per epoch (names -> importance; others -1), to force selections."""

    def __init__(self, script, **kw):
        super().__init__(**kw)
        self.script = script

    def probe_importance(self, trainer, pl_module, batch, candidates, base=None):
        want = self.script[min(trainer.current_epoch, max(self.script))]
        return -np.array([want.get(n, -1.0) for n in candidates])  # raw; the callback negates


# -- the dynamic programme -----------------------------------------------------------------------------------------


def _brute(t_dy, t_dw, imp, budget):
    best = -np.inf
    for r in range(1, len(imp) + 1):
        for sub in itertools.combinations(range(len(imp)), r):
            sel = np.zeros(len(imp), bool)
            sel[list(sub)] = True
            if selection_cost(t_dy, t_dw, sel) <= budget:
                best = max(best, float(np.sum(np.asarray(imp)[sel])))
    return best


def test_dp_matches_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(150):
        n = int(rng.integers(1, 9))
        t_dy = rng.integers(0, 8, n)
        t_dw = rng.integers(0, 10, n)
        imp = rng.normal(size=n).round(3)
        budget = int(rng.integers(0, 50))
        value, sel = select_tensors_dp(t_dy, t_dw, imp, budget)
        best = _brute(t_dy, t_dw, imp, budget)
        assert sel.any()
        if np.isfinite(best):
            checked += 1
            assert value == pytest.approx(best, abs=1e-9)
            assert selection_cost(t_dy, t_dw, sel) <= budget
            assert float(np.sum(imp[sel])) == pytest.approx(value, abs=1e-9)
        else:  # nothing fits: the cheapest single tensor
            costs = np.cumsum(t_dy) + t_dw
            assert sel.sum() == 1 and costs[sel][0] == costs.min()
    assert checked > 100


def test_dp_cost_model_reaching_deep_tensors_pays_the_chain():
    # tensor 2 is the most important but reaching it costs the whole chain: the budget only allows 0 and 1
    value, sel = select_tensors_dp([1, 1, 10], [1, 1, 1], [1.0, 1.0, 5.0], budget=5)
    assert sel.tolist() == [True, True, False] and value == 2.0
    value, sel = select_tensors_dp([1, 1, 10], [1, 1, 1], [1.0, 1.0, 5.0], budget=13)
    assert sel.tolist() == [False, False, True] or sel.tolist() == [True, True, True]
    assert value == 7.0 or value == 5.0
    # large instance runs (vectorised: O(N x budget))
    rng = np.random.default_rng(1)
    value, sel = select_tensors_dp(rng.integers(0, 5, 400), rng.integers(0, 5, 400), rng.normal(size=400), 1000)
    assert sel.any() and selection_cost(rng.integers(0, 1, 400), np.zeros(400), sel) == 0


def test_budget_conversion_and_quantisation():
    # rho of the full step -> backward fraction: rho(1 + f/b) - f/b
    assert backward_budget(0.5, 1.0, 2.0) == pytest.approx(0.5 * 1.5 - 0.5)
    assert backward_budget(0.2, 1.0, 2.0) == 0.05  # not positive -> 0.05
    assert backward_budget(1.0, 3.0, 2.0) == pytest.approx(1.0)
    t_dy, t_dw, scale = quantize_costs([1.0, 2.0, 3.0], [4.0, 0.0, 10.0], 1000)
    assert int(t_dy.sum() + t_dw.sum()) == 1000 and scale == pytest.approx(1000 / 20)
    assert t_dy.tolist() == [50, 100, 150] and t_dw.tolist() == [200, 0, 500]


def test_defaults_and_ddp_without_unused_parameters_is_refused():
    from lightning.pytorch.strategies import DDPStrategy

    cb = GreenTrainer()
    assert (cb.rho, cb.interval, cb.quantization, cb.measure_every_n_steps) == (0.5, 2, 1000, 50)
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        GreenTrainer._check_strategy(types.SimpleNamespace(strategy=DDPStrategy()))
    GreenTrainer._check_strategy(types.SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True)))


# -- FLOPs model -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_flops_model_predicts_measured_step_flops(tie):
    """For random selections, forward + modelled backward matches the FlopCounterMode count of the real step
    (parallel branches are linearised, so the model may overestimate by a few percent, never underestimate)."""
    torch.manual_seed(0)
    m = CausalLMModule(model_config=tiny_config(tie_word_embeddings=tie))
    batch = random_batch(4, 16)
    loss_fn = lambda: m.compute_token_loss(batch).loss  # noqa: E731
    prof = profile_tensor_flops(m, loss_fn)
    # the fused linear-CE computes the lm_head gradient inside one custom op: found as an outside use
    assert prof.outside_used == (["model.model.embed_tokens.weight"] if tie else [LM])
    names, t_dw, reach = prof.names, np.array(prof.t_dw), np.array(prof.reach)
    t_dy = np.diff(reach, prepend=0.0)
    assert names[-1] == "model.model.embed_tokens.weight" and (np.diff(reach) >= 0).all()
    params = dict(m.named_parameters())
    rng = np.random.default_rng(0)
    errors = []
    for _ in range(12):
        sel = np.zeros(len(names), bool)
        sel[rng.choice(len(names), int(rng.integers(1, 5)), replace=False)] = True
        for n, p in params.items():
            p.requires_grad_(bool(sel[names.index(n)]))
        with flop_counter() as fc:
            loss = loss_fn()
            if loss.requires_grad:
                loss.backward()
        errors.append((prof.t_fp + selection_cost(t_dy, t_dw, sel)) / fc.get_total_flops() - 1)
    assert min(errors) >= -1e-9 and max(errors) < 0.06, errors
    assert sum(e == 0 for e in errors) >= 4  # exact whenever no parallel branch is involved


# -- importance probe ------------------------------------------------------------------------------------------------


def test_probe_restores_parameters_and_optimizer_bit_exactly():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    cb = GreenTrainer(rho=0.7, interval=1, measure_every_n_steps=0)
    trainer = _trainer([cb], max_steps=3)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    opt = trainer.optimizers[0]
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    rg = {n: p.requires_grad for n, p in module.named_parameters()}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in module.named_parameters()}
    sd = copy.deepcopy(opt.state_dict())
    groups = [list(map(id, g["params"])) for g in opt.param_groups]
    assert any(len(s) for s in sd["state"].values())  # AdamW has moments to protect
    candidates = cb._candidates(module)[0]
    raw = cb.probe_importance(trainer, module, random_batch(4, 16, seed=9), candidates)
    assert raw.shape == (len(candidates),) and np.count_nonzero(raw) > len(candidates) // 2
    for n, p in module.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == rg[n], n
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
    after = opt.state_dict()
    assert [list(map(id, g["params"])) for g in opt.param_groups] == groups
    assert sd["param_groups"] == after["param_groups"]
    assert sd["state"].keys() == after["state"].keys()
    for k in sd["state"]:
        for key, v in sd["state"][k].items():
            assert torch.equal(v, after["state"][k][key]), (k, key)


def test_probe_importance_matches_hand_computed_sgd_reference():
    """SGD without momentum: Δw = -lr g(w0), so the raw importance is -lr Σ g(w0 - lr g0) ⊙ g0 per tensor."""
    torch.manual_seed(0)
    module = PlainHFModule(lr=0.05)
    cb = GreenTrainer(measure_every_n_steps=0)
    trainer = _trainer([cb], max_steps=1)
    trainer.fit(module, datamodule=ListDataModule(n_batches=1))
    batch = random_batch(4, 16, seed=4)
    ref = copy.deepcopy(module.model)
    for p in ref.parameters():
        p.requires_grad_(True)
    g0 = torch.autograd.grad(ref(**batch).loss, list(ref.parameters()))
    with torch.no_grad():
        for p, g in zip(ref.parameters(), g0):
            p.sub_(0.05 * g)
    g1 = torch.autograd.grad(ref(**batch).loss, list(ref.parameters()))
    expected = np.array([(-0.05 * (a * b).sum()).item() for a, b in zip(g1, g0)])
    candidates = cb._candidates(module)[0]
    assert candidates == ["model." + n for n, _ in ref.named_parameters()]
    raw = cb.probe_importance(trainer, module, batch, candidates)
    np.testing.assert_allclose(raw, expected, rtol=1e-4, atol=1e-10)


# -- in a Trainer ----------------------------------------------------------------------------------------------------


def test_selection_in_trainer_frozen_bit_identical_optimizer_state_kept_dropped_fresh():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.5)
    cb = Scripted({0: {LM: 1.0, NORM: 1.0}, 1: {LM: 1.0, DOWN1: 1.0}}, rho=0.7, interval=1, measure_every_n_steps=1)
    seen = {}

    class Watch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                opt = trainer.optimizers[0]
                named = dict(pl_module.named_parameters())
                seen[trainer.current_epoch] = {
                    "params": {n: p.detach().clone() for n, p in named.items()},
                    "state": {n: (int(opt.state[named[n]]["step"]) if named[n] in opt.state else None)
                              for n in (LM, NORM, DOWN1)},
                    "selection": list(cb.last_selection),
                }
                verify_optimizer(opt, pl_module, param_plans_for(pl_module).composed)

    trainer = _trainer([cb, Watch()], max_steps=4)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    assert seen[0]["selection"] == [LM, NORM] and seen[1]["selection"] == [LM, DOWN1]
    # epoch 1 start: lm_head kept its state (2 steps), the norm was dropped, down_proj starts fresh
    assert seen[1]["state"] == {LM: 2, NORM: None, DOWN1: None}
    final = dict(module.named_parameters())
    for epoch, nxt in ((0, seen[1]["params"]), (1, {n: p.detach() for n, p in final.items()})):
        start, sel = seen[epoch]["params"], set(seen[epoch]["selection"])
        for n in start:
            if n in sel:
                assert not torch.equal(nxt[n], start[n]), n
            else:  # weight decay 0.5 would move them if they were still in the optimizer
                assert torch.equal(nxt[n], start[n]), n
    assert int(trainer.optimizers[0].state[final[DOWN1]]["step"]) == 2
    m = trainer.callback_metrics
    for k in ("selected_tensor_fraction", "selected_param_fraction", "est_backward_flops_fraction",
              "est_flops_fraction", "measured_flops_fraction", "measured_flops_saved", "trainable_fraction"):
        assert f"lit_ft/green_trainer/{k}" in m, k
    # the measured fraction of the real step equals the model's estimate (no parallel branch selected here)
    assert cb.measured_flops_fraction == pytest.approx(cb.est_flops_fraction, rel=1e-6)
    assert 0 < cb.measured_flops_fraction < 0.7 + 1e-6 and cb.measured_flops_saved > 0.3
    assert len(cb.measurements) == 4
    # the lit_ft.core.flops convention key carries the same measured fraction
    assert float(m["lit_ft/green_trainer/flops_fraction"]) == pytest.approx(cb.measured_flops_fraction, rel=1e-6)


def test_real_probe_selection_meets_budget_and_logs():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    cb = GreenTrainer(rho=0.6, interval=1, measure_every_n_steps=2)
    trainer = _trainer([cb], max_steps=4)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    assert cb.n_selections == 2 and cb.last_selection_epoch == 1
    assert 0 < cb.selected_tensor_fraction < 1
    assert cb.est_flops_fraction <= 0.6 + 0.01  # within the budget (up to quantisation)
    assert [s for s, _, _ in cb.measurements] == [0, 2]
    assert all(step <= full for _, step, full in cb.measurements)
    assert cb.measured_flops_fraction == pytest.approx(cb.est_flops_fraction, rel=0.06)
    _assert_selection_is_best_for_the_probed_importance(cb)


def _assert_selection_is_best_for_the_probed_importance(cb):
    """The applied selection against the importance the real probe measured, checked without the DP: it is within
    the backward budget, no feasible addition of a tensor with positive importance and no feasible swap of a selected
    tensor for a more important one exists (a selection that ignored or inverted the importance fails). The probe's
    raw importance itself is checked against a hand-computed SGD reference in
    ``test_probe_importance_matches_hand_computed_sgd_reference``."""
    names, t_dy, t_dw = cb.profile.restricted(list(cb.last_importance))
    t_dy_q, t_dw_q, _ = quantize_costs(t_dy, t_dw, cb.quantization)
    budget = int(math.floor(cb.rho_bp * cb.quantization + 1e-9))
    imp = np.array([cb.last_importance[n] for n in names])
    sel = np.array([n in set(cb.last_selection) for n in names])

    def feasible(mask):
        return bool(mask.any()) and selection_cost(t_dy_q, t_dw_q, mask) <= budget

    assert feasible(sel) and 0 < sel.sum() < len(names)
    assert imp[sel].sum() > 0
    for u in np.flatnonzero(~sel):
        more = sel.copy()
        more[u] = True
        assert not (feasible(more) and imp[u] > 1e-12), names[u]
        for k in np.flatnonzero(sel):
            swap = more.copy()
            swap[k] = False
            assert not (feasible(swap) and imp[u] > imp[k] + 1e-12), (names[u], names[k])


def test_composes_with_another_plan_and_required_tensors():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.5)
    freeze = _Plan(lambda m: ParamPlan.freeze(m, ["model.model.layers.1.*"], owner="FreezeL1"), "F")
    need = _Plan(lambda m: ParamPlan.trainable_only(m, [NORM, LM, "model.model.layers.0.*"], owner="NeedNorm",
                                                    required=False), "N")
    cb = GreenTrainer(rho=0.9, interval=1, measure_every_n_steps=0)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    trainer = _trainer([freeze, need, cb], max_steps=2)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    cands = cb._candidates(module)[0]
    assert set(cands) == {NORM, LM} | {n for n in before if n.startswith("model.model.layers.0.")}
    assert set(cb.last_selection) <= set(cands)
    for n, p in module.named_parameters():
        if n not in cb.last_selection:
            assert torch.equal(p, before[n]), n

    # a tensor another callback requires is always selected ...
    module = CausalLMModule(model_config=tiny_config())
    req = _Plan(lambda m: ParamPlan({NORM: "trainable"}, owner="NeedsNorm", required=[NORM]), "R")
    cb = Scripted({0: {DOWN1: 1.0}}, rho=0.7, interval=1, measure_every_n_steps=0)
    _trainer([req, cb], max_steps=1).fit(module, datamodule=ListDataModule(n_batches=1))
    assert {NORM, DOWN1} == set(cb.last_selection)  # the norm has importance -1, but it is required
    # ... and one that does not fit the budget is a clear conflict
    module = CausalLMModule(model_config=tiny_config())
    emb = "model.model.embed_tokens.weight"
    req = _Plan(lambda m: ParamPlan({emb: "trainable"}, owner="NeedsEmbedding", required=[emb]), "E")
    cb = GreenTrainer(rho=0.3, interval=1, measure_every_n_steps=0)
    with pytest.raises(ParamPlanConflict, match="(?s)NeedsEmbedding.*GreenTrainer|GreenTrainer.*NeedsEmbedding"):
        _trainer([req, cb], max_steps=1).fit(module, datamodule=ListDataModule(n_batches=1))


def test_no_candidates_is_a_clear_error():
    module = CausalLMModule(model_config=tiny_config())
    freeze = _Plan(lambda m: ParamPlan.freeze(m, ["*"], owner="FreezeAll"), "F")
    module.model.lm_head.weight.requires_grad_(True)
    with pytest.raises((ValueError, RuntimeError), match="(?i)trainable|candidate"):
        _trainer([freeze, GreenTrainer()], max_steps=1).fit(module, datamodule=ListDataModule(n_batches=1))


def test_plain_module_sgd_drop_in():
    torch.manual_seed(0)
    module = PlainHFModule(lr=0.05)
    cb = GreenTrainer(rho=0.5, interval=1, measure_every_n_steps=1)
    trainer = _trainer([cb], max_steps=2)
    snap = {}

    class Snap(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snap.update({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    trainer.callbacks.append(Snap())
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    sel = set(cb.last_selection)
    assert sel and len(sel) < len(snap)
    for n, p in module.named_parameters():
        assert torch.equal(p, snap[n]) != (n in sel), n
    assert cb.measured_flops_fraction == pytest.approx(cb.est_flops_fraction, rel=0.06)


def test_peft_model_selects_among_lora_tensors_only():
    pytest.importorskip("peft")
    torch.manual_seed(0)
    module = LoraModule(seed=None)
    for n, p in module.named_parameters():  # LoRA B starts at 0: make every adapter matter
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.02)
    lora = {n for n, p in module.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = GreenTrainer(rho=0.5, interval=1, measure_every_n_steps=1)
    trainer = _trainer([cb], max_steps=2)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    assert set(cb._candidates(module)[0]) == lora
    assert set(cb.last_selection) < lora and cb.last_selection
    for n, p in module.named_parameters():
        if n not in lora:
            assert not p.requires_grad and torch.equal(p, before[n]), n
    assert cb.measured_flops_fraction is not None and cb.measured_flops_fraction < 1


# -- checkpoint -> resume --------------------------------------------------------------------------------------------


def _resume_run(tmp_path, make_cb, max_steps, n_batches=2, ckpt_path=None, save=False):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    cb = make_cb()
    callbacks = [cb]
    if save:
        from lightning.pytorch.callbacks import ModelCheckpoint

        callbacks.append(ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_top_k=-1))
    trainer = _trainer(callbacks, max_steps=max_steps, enable_checkpointing=save)
    trainer.fit(module, datamodule=ListDataModule(n_batches=n_batches), ckpt_path=ckpt_path)
    return module, cb, trainer


def _assert_same(a, b):
    for (n, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=n)


def test_checkpoint_resume_equals_uninterrupted_with_real_probe(tmp_path):
    make = lambda: GreenTrainer(rho=0.6, interval=1, measure_every_n_steps=0)  # noqa: E731
    full, cb_full, _ = _resume_run(tmp_path, make, 4, save=True)
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"][cb_full.state_key]
    assert state["selection"] and state["profile"]["names"] and state["last_selection_epoch"] == 0
    resumed, cb_res, _ = _resume_run(tmp_path, make, 4, ckpt_path=str(ckpt))
    _assert_same(full, resumed)
    assert cb_res.last_selection == cb_full.last_selection and cb_res.n_selections == 2
    assert cb_res.profile == cb_full.profile


def test_checkpoint_resume_after_selection_reordered_the_optimizer(tmp_path):
    """After epoch 1's selection the decay group is [lm_head, down_proj] (appended, not model order) and the no-decay
    group is empty: the fresh optimizer of a resumed run is laid out differently, and the Adam moments must still
    land on their own tensors."""
    script = {0: {LM: 1.0, NORM: 1.0}, 1: {LM: 1.0, DOWN1: 1.0}}
    make = lambda: Scripted(script, rho=0.7, interval=1, measure_every_n_steps=0)  # noqa: E731
    full, cb_full, tr_full = _resume_run(tmp_path, make, 6, save=True)
    ckpt = tmp_path / "epoch=1-step=4.ckpt"
    layout = torch.load(ckpt, weights_only=False)["lit_ft_param_plans"]["optimizer_layout"][0]
    assert layout == [[], [LM, DOWN1]]  # differs from what configure_optimizers builds from requires_grad
    resumed, cb_res, tr_res = _resume_run(tmp_path, make, 6, ckpt_path=str(ckpt))
    _assert_same(full, resumed)
    o_full, o_res = tr_full.optimizers[0], tr_res.optimizers[0]
    names = lambda mod, opt: [[{id(p): n for n, p in mod.named_parameters()}[id(p)] for p in g["params"]]  # noqa: E731
                              for g in opt.param_groups]
    assert names(resumed, o_res) == names(full, o_full) == [[], [LM, DOWN1]]
    verify_optimizer(o_res, resumed, param_plans_for(resumed).composed)


# -- DDP -------------------------------------------------------------------------------------------------------------


class _Record(pl.Callback):
    def __init__(self, cb, out_dir):
        self.cb, self.out_dir = cb, out_dir

    def on_train_end(self, trainer, pl_module):
        torch.save({
            "selection": self.cb.last_selection,
            "local": self.cb._local_importance,
            "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            "requires_grad": {n: p.requires_grad for n, p in pl_module.named_parameters()},
        }, f"{self.out_dir}/rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_two_ranks_select_identically(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    cb = GreenTrainer(rho=0.6, interval=1, measure_every_n_steps=2)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn_find_unused_parameters_true", max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[cb, _Record(cb, tmp_path)],
    )
    trainer.fit(module, datamodule=ListDataModule(n_batches=4))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["selection"] and r0["selection"] == r1["selection"]
    assert r0["requires_grad"] == r1["requires_grad"]
    assert not np.allclose(r0["local"], r1["local"])  # different probe batches per rank ...
    for n in r0["params"]:  # ... yet one selection, so the replicas stay identical
        torch.testing.assert_close(r0["params"][n], r1["params"][n], rtol=0, atol=0, msg=n)
