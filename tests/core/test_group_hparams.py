"""assign_group_hparams: per-tensor lr / weight decay on an existing optimizer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lit_ft.core.group_hparams import assign_group_hparams, in_optimizer


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
