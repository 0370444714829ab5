"""lit_ft.core.optim: per-tensor lr / weight decay on an existing optimizer (assign_group_hparams), exact
save/restore of optimizer state (optimizer_snapshot), LR schedulers after a regrouping (sync_schedulers), and the
hyper-parameters of tensors that join mid-run (optimizer_defaults). Param groups by name, state reset and layouts
are tested with the plans they serve in test_params.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lit_ft.core.optim import (
    assign_group_hparams,
    in_optimizer,
    optimizer_defaults,
    optimizer_snapshot,
    sync_schedulers,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.c = nn.Linear(3, 3)


def test_moves_keeps_state_and_hparams():
    net = Net()
    opt = torch.optim.AdamW([
        {"params": [net.a.weight, net.b.weight], "param_names": ["a.weight", "b.weight"], "weight_decay": 0.1},
        {"params": [net.a.bias, net.b.bias], "param_names": ["a.bias", "b.bias"], "weight_decay": 0.0},
    ], lr=1e-3, betas=(0.8, 0.9))
    (net.b(net.a(torch.randn(2, 3))) ** 2).sum().backward()
    opt.step()
    state_b = opt.state[net.b.weight]["exp_avg"].clone()
    r = assign_group_hparams(opt, net, {"b.weight": {"lr": 0.5}, "b.bias": {"lr": 0.5, "weight_decay": 0.01},
                                        "c.weight": {"lr": 0.5}})
    assert r.moved == ["b.weight", "b.bias"] and r.added == ["c.weight"]
    groups = opt.param_groups
    assert [g["param_names"] for g in groups] == [["a.weight"], ["a.bias"], ["b.weight"], ["b.bias"], ["c.weight"]]
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 0.5, 0.5, 0.5]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0, 0.1, 0.01, 0.1]  # source group's unless assigned
    assert all(g["betas"] == (0.8, 0.9) for g in groups)
    assert r.origin == [0, 1, 0, 1, None] and r.scale[2] == pytest.approx(500.0)
    assert torch.equal(opt.state[net.b.weight]["exp_avg"], state_b)  # state follows the tensor
    assert in_optimizer(opt, [net.c.weight, net.c.bias]) == [True, False]
    # idempotent: assigning the same again changes nothing
    again = assign_group_hparams(opt, net, {"b.weight": {"lr": 0.5}, "c.weight": {"lr": 0.5}})
    assert not again.changed and len(opt.param_groups) == 5


def test_already_matching_tensors_stay_put_and_errors():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    assert not assign_group_hparams(opt, net, {"a.weight": {"lr": 0.1}}).changed
    assert len(opt.param_groups) == 1
    with pytest.raises(KeyError, match="not parameters"):
        assign_group_hparams(opt, net, {"zzz": {"lr": 1.0}})
    with pytest.raises(KeyError, match="only"):
        assign_group_hparams(opt, net, {"a.weight": {"momentum": 0.9}})
    net.c.weight.requires_grad_(False)  # frozen tensors are skipped
    assert not assign_group_hparams(opt, net, {"c.weight": {"lr": 5.0}}).changed


# ---------------------------------------------------------------------------------------------------------------
# optimizer_snapshot
# ---------------------------------------------------------------------------------------------------------------


def _adamw_after_two_steps() -> tuple[Net, torch.optim.AdamW]:
    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.AdamW([
        {"params": [net.a.weight, net.b.weight], "param_names": ["a.weight", "b.weight"], "weight_decay": 0.1},
        {"params": [net.a.bias, net.b.bias], "param_names": ["a.bias", "b.bias"], "weight_decay": 0.0},
    ], lr=1e-3)
    for _ in range(2):
        _step(net, opt)
    return net, opt


def _step(net: Net, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad(set_to_none=True)
    (net.c(net.b(net.a(torch.randn(4, 3)))) ** 2).sum().backward()
    opt.step()


def _state_copy(opt: torch.optim.Optimizer) -> dict:
    return {p: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


def _assert_state_equal(opt: torch.optim.Optimizer, saved: dict) -> None:
    assert set(opt.state) == set(saved)  # no tensor gained or lost state
    for p, s in saved.items():
        assert set(opt.state[p]) == set(s)
        for k, v in s.items():
            assert torch.equal(opt.state[p][k], v), k  # bit-exact, step counters included


def test_snapshot_restores_state_steps_and_groups_bit_exactly():
    net, opt = _adamw_after_two_steps()
    saved = _state_copy(opt)
    groups_before = [dict(g, params=list(g["params"]), param_names=list(g["param_names"])) for g in opt.param_groups]
    group_objects = list(opt.param_groups)
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    with optimizer_snapshot(opt) as inner:
        assert inner is opt
        net.c.weight.requires_grad_(True)
        opt.add_param_group({"params": [net.c.weight], "param_names": ["c.weight"], "lr": 0.5})  # a rebuild's group
        opt.param_groups[0]["params"].remove(net.a.weight)  # a regrouping edits the lists in place
        opt.param_groups[0]["param_names"].remove("a.weight")
        opt.param_groups[1]["params"].append(net.a.weight)
        opt.param_groups[1]["param_names"].append("a.weight")
        for g in opt.param_groups:
            g["lr"] *= 10  # a scheduler step
        _step(net, opt)
        assert opt.state[net.b.weight]["step"].item() == 3  # the body really moved the state
        assert not torch.equal(opt.state[net.b.weight]["exp_avg"], saved[net.b.weight]["exp_avg"])
        assert net.c.weight in opt.state
    _assert_state_equal(opt, saved)
    assert opt.state[net.b.weight]["step"].item() == 2
    assert len(opt.param_groups) == 2
    assert all(g is o for g, o in zip(opt.param_groups, group_objects))  # restored in place (schedulers hold them)
    for g, before in zip(opt.param_groups, groups_before):
        assert g["param_names"] == before["param_names"]
        assert [id(p) for p in g["params"]] == [id(p) for p in before["params"]]
        assert {k: v for k, v in g.items() if k not in ("params", "param_names")} == {
            k: v for k, v in before.items() if k not in ("params", "param_names")
        }
    # parameters are not optimizer state: put them back as a probe does; then the optimizer steps exactly as an
    # untouched copy does
    with torch.no_grad():
        for n, p in net.named_parameters():
            p.copy_(weights[n])
    net2, opt2 = _adamw_after_two_steps()
    torch.manual_seed(1)
    _step(net, opt)
    torch.manual_seed(1)
    _step(net2, opt2)
    for (n, p), p2 in zip(net.named_parameters(), net2.parameters()):
        assert torch.equal(p, p2), n


def test_snapshot_restores_when_the_body_raises():
    net, opt = _adamw_after_two_steps()
    saved = _state_copy(opt)
    lrs = [g["lr"] for g in opt.param_groups]
    with pytest.raises(RuntimeError, match="probe failed"):
        with optimizer_snapshot(opt):
            _step(net, opt)
            opt.param_groups[0]["lr"] = 123.0
            opt.add_param_group({"params": [net.c.weight], "param_names": ["c.weight"]})
            raise RuntimeError("probe failed")
    _assert_state_equal(opt, saved)
    assert [g["lr"] for g in opt.param_groups] == lrs


def test_snapshot_of_fresh_optimizer_drops_state_created_in_the_body():
    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    with optimizer_snapshot(opt):
        _step(net, opt)
        assert len(opt.state) > 0
    assert len(opt.state) == 0


def test_snapshot_restores_tensor_hyperparameters_in_place():
    net = Net()
    lr = torch.tensor(0.01)
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    with optimizer_snapshot(opt):
        opt.param_groups[0]["lr"].fill_(5.0)
    assert opt.param_groups[0]["lr"] is lr and lr.item() == pytest.approx(0.01)


# ---------------------------------------------------------------------------------------------------------------
# sync_schedulers / optimizer_defaults
# ---------------------------------------------------------------------------------------------------------------


def _trainer_with(*schedulers) -> SimpleNamespace:
    """The one attribute sync_schedulers reads from a Lightning Trainer."""
    return SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=s) for s in schedulers])


def test_sync_schedulers_remaps_lambda_lr_to_new_groups():
    net = Net()
    opt = torch.optim.SGD([
        {"params": [net.a.weight, net.b.weight], "param_names": ["a.weight", "b.weight"]},
    ], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    opt.step()
    sched.step()  # lr 0.05
    r = assign_group_hparams(opt, net, {"b.weight": {"lr": 1.0}})
    assert r.origin == [0, 0] and len(sched.lr_lambdas) == 1
    assert sync_schedulers(_trainer_with(sched), opt, origin=r.origin, scale=r.scale, owner="Test") == 1
    assert len(sched.lr_lambdas) == 2 and sched.base_lrs == [0.1, 1.0]
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.025, 0.25])


def test_sync_schedulers_skips_other_optimizers_and_refuses_unknown_schedulers():
    net = Net()
    opt = torch.optim.SGD(net.a.parameters(), lr=0.1)
    other = torch.optim.SGD(net.b.parameters(), lr=0.1)
    other_sched = torch.optim.lr_scheduler.StepLR(other, step_size=1)
    assert sync_schedulers(_trainer_with(other_sched), opt) == 0

    class Custom(torch.optim.lr_scheduler.LRScheduler):
        def get_lr(self):
            return [g["lr"] for g in self.optimizer.param_groups]

    with pytest.raises(TypeError, match="Custom"):
        sync_schedulers(_trainer_with(Custom(opt)), opt, owner="Test")


def test_optimizer_defaults_first_decayed_group_and_its_initial_lr():
    net = Net()
    opt = torch.optim.AdamW([
        {"params": [net.a.bias], "weight_decay": 0.0, "lr": 1e-3},
        {"params": [net.a.weight], "weight_decay": 0.1, "lr": 2e-3},
        {"params": [net.b.weight], "weight_decay": 0.2, "lr": 3e-3},
    ])
    assert optimizer_defaults(opt) == (2e-3, 0.1)
    opt.param_groups[1]["initial_lr"] = 4e-3  # a scheduler scaled lr: the un-scaled base is what a rebuild needs
    assert optimizer_defaults(opt) == (4e-3, 0.1)
    no_decay = torch.optim.SGD([{"params": [net.c.bias], "lr": 0.5}], lr=0.5)
    assert optimizer_defaults(no_decay) == (0.5, 0.0)
