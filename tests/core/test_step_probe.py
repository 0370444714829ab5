"""lit_ft.core.step_probe: the measured FLOPs fraction every parameter technique logs
(lit_ft/<technique>/flops_fraction) — the real step counted with FlopCounterMode against the full step on the same
batch — and that measuring leaves training untouched."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import FreezeLayers, TrainOnly
from lit_ft.core.flops import measured_step
from lit_ft.modules import CausalLMModule
from tests.helpers import ListDataModule, random_batch, tiny_config


def _fit(cb, every, steps=3):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    cb.flops_every_n_steps = every
    t = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=[cb])
    t.fit(module, datamodule=ListDataModule(n_batches=steps))
    return module, t


@pytest.mark.parametrize("make", [lambda: TrainOnly(preset="last_layers", last_k=1), lambda: FreezeLayers(num_layers=1)])
def test_flops_fraction_is_measured_logged_and_below_one(make):
    cb = make()
    module, t = _fit(cb, every=2, steps=5)
    mon = cb.flops_monitor
    assert [m[0] for m in mon.measurements] == [1, 2, 4]  # after the first step, then every 2
    step, real, full = mon.measurements[-1]
    assert 0 < real < full and mon.fraction == pytest.approx(real / full)
    name = cb.technique_name
    assert float(t.callback_metrics[f"lit_ft/{name}/flops_fraction"]) == pytest.approx(mon.fraction)


def test_the_full_step_is_the_same_batch_with_everything_trainable():
    """The probe's count equals a forward + backward of the module with every parameter trainable."""
    cb = TrainOnly(preset="last_layers", last_k=1)
    module, _ = _fit(cb, every=1, steps=2)
    full = cb.flops_monitor.measurements[0][2]
    batch = ListDataModule(n_batches=2).train_dataloader().__iter__().__next__()
    for p in module.parameters():
        p.requires_grad_(True)
    with measured_step() as count, torch.enable_grad():
        loss = module.compute_token_loss(batch, module.model).loss
        torch.autograd.grad(loss, list(module.parameters()), allow_unused=True)
    assert count.total == pytest.approx(full)


def test_measuring_does_not_change_training_beyond_float_rounding():
    cb_on, cb_off = TrainOnly(preset="last_layers", last_k=1), TrainOnly(preset="last_layers", last_k=1)
    on, _ = _fit(cb_on, every=1)
    off, _ = _fit(cb_off, every=0)
    assert cb_on.flops_monitor.measurements and "_flops_monitor" not in cb_off.__dict__
    # the probe itself leaves no trace (checked by hand: bit-identical with the count disabled); the counted real
    # step runs under FlopCounterMode, a dispatch mode, which moved one weight by 2e-8 here: float rounding only
    for (n, a), (_, b) in zip(on.state_dict().items(), off.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=n)
