"""restart_schedulers: a scheduler put back at step 0 gives the learning rates of a freshly built one."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.optim import lr_scheduler as L

from lit_ft.core.optim import restart_schedulers

SCHEDULERS = {
    "lambda_warmup": lambda o: L.LambdaLR(o, lambda s: min(1.0, (s + 1) / 4)),
    "linear_decay": lambda o: L.LambdaLR(o, lambda s: max(0.0, 1 - s / 10)),
    "step": lambda o: L.StepLR(o, step_size=2, gamma=0.5),
    "linear": lambda o: L.LinearLR(o, start_factor=0.25, total_iters=3),
    "cosine": lambda o: L.CosineAnnealingLR(o, T_max=6),
    "warm_restarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3),
    "one_cycle": lambda o: L.OneCycleLR(o, max_lr=[0.1, 0.02], total_steps=12),
    "sequential": lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=0.5, total_iters=2),
                                              L.ExponentialLR(o, gamma=0.9)], milestones=[2]),
    "chained": lambda o: L.ChainedScheduler([L.ConstantLR(o, factor=0.5, total_iters=2),
                                             L.ExponentialLR(o, gamma=0.9)]),
}


def make_optimizer() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    return torch.optim.AdamW([{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.01}])


def lrs_over(opt, sched, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_restart_gives_the_rates_of_a_fresh_scheduler(name):
    fresh_opt = make_optimizer()
    expected = lrs_over(fresh_opt, SCHEDULERS[name](fresh_opt), 7)
    opt = make_optimizer()
    sched = SCHEDULERS[name](opt)
    lrs_over(opt, sched, 5)  # phase 1: the schedule moves on (a continued schedule would give expected[5:] next)
    trainer = SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=sched)])
    assert restart_schedulers(trainer, opt) == 1
    got = lrs_over(opt, sched, 7)
    for g_row, e_row in zip(got, expected):
        assert g_row == pytest.approx(e_row, rel=1e-9), name


def test_plateau_counters_reset():
    opt = make_optimizer()
    sched = L.ReduceLROnPlateau(opt, patience=0)
    for v in (1.0, 2.0, 3.0):
        sched.step(v)
    assert sched.num_bad_epochs > 0 or sched.cooldown_counter > 0 or opt.param_groups[0]["lr"] < 0.1
    restart_schedulers(SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=sched)]), opt)
    assert sched.num_bad_epochs == 0 and sched.best == sched.mode_worse


def test_unknown_scheduler_type_is_refused():
    class Custom(L.LRScheduler):
        def get_lr(self):
            return [g["lr"] for g in self.optimizer.param_groups]

    opt = make_optimizer()
    sched = Custom(opt)
    with pytest.raises(TypeError, match="Custom"):
        restart_schedulers(SimpleNamespace(lr_scheduler_configs=[SimpleNamespace(scheduler=sched)]), opt, owner="X")
