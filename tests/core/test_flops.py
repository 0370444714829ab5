"""lit_ft.core.flops: counting a step's FLOPs, the fused op's formulas, the per-tensor FLOPs model, the logging
convention."""

import subprocess
import sys

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lit_ft.core.flops import TrainingStepFlops, log_flops_fraction, measured_step, profile_tensor_flops

from helpers import REPO

B, D_IN, D_HID, D_OUT = 3, 8, 16, 4


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D_IN, D_HID, bias=False), nn.ReLU(), nn.Linear(D_HID, D_OUT, bias=False))


def test_measured_step_counts_forward_and_backward_matmuls():
    x = torch.randn(B, D_IN)
    w = torch.randn(D_IN, D_HID, requires_grad=True)
    with measured_step() as fwd:
        y = x @ w
    assert fwd.total == 2 * B * D_IN * D_HID
    with measured_step() as step:
        (x @ w).sum().backward()  # forward + dW (x needs no gradient, so no dX)
    assert step.total == 2 * (2 * B * D_IN * D_HID)
    assert y.shape == (B, D_HID)


def test_measured_step_reads_the_count_even_when_the_block_raises():
    x, w = torch.randn(B, D_IN), torch.randn(D_IN, D_HID)
    with pytest.raises(RuntimeError, match="boom"):
        with measured_step() as step:
            x @ w
            raise RuntimeError("boom")
    assert step.total == 2 * B * D_IN * D_HID


def test_fused_op_formulas_are_registered_by_core_flops_alone():
    """In a fresh process that imports neither lit_ft.modules nor lit_ft.callbacks, measured_step still counts the
    lm_head matmuls done inside lit_ft::token_ce (an unregistered custom op counts 0)."""
    code = (
        "import sys, torch\n"
        "from lit_ft.core.flops import measured_step\n"
        "from lit_ft.kernels import fused_linear_token_ce\n"
        "assert 'lit_ft.modules' not in sys.modules\n"
        "h = torch.randn(6, 8); w = torch.randn(32, 8); y = torch.randint(0, 32, (6,))\n"
        "with measured_step() as s:\n"
        "    fused_linear_token_ce(h, w, y)\n"
        "print(int(s.total))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == 2 * 6 * 32 * 8  # the logits matmul, nothing needs a gradient


class _TinyModule(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = _mlp()

    def training_step(self, batch, batch_idx):
        return self.net(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _CountEveryStep(pl.Callback):
    def __init__(self) -> None:
        self.meter = TrainingStepFlops()
        self.counts: list[float] = []
        self.patched_during_step: list[bool] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.meter.arm(pl_module)
        self.patched_during_step.append("training_step" in pl_module.__dict__)

    def on_after_backward(self, trainer, pl_module):
        assert self.meter.counting
        self.counts.append(self.meter.stop())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        assert not self.meter.armed and self.meter.stop() is None  # nothing left behind
        assert "training_step" not in pl_module.__dict__


def test_training_step_flops_counts_the_real_step_through_backward():
    module = _TinyModule()
    cb = _CountEveryStep()
    data = torch.utils.data.DataLoader([torch.randn(B, D_IN) for _ in range(2)], batch_size=None)
    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, callbacks=[cb]).fit(module, data)
    fwd = 2 * B * D_IN * D_HID + 2 * B * D_HID * D_OUT
    dw = fwd  # each Linear's dW costs its forward matmul
    dx = 2 * B * D_HID * D_OUT  # only the second layer's input needs a gradient
    assert cb.counts == [fwd + dw + dx] * 2
    assert cb.patched_during_step == [True, True]


def test_training_step_flops_disarmed_before_the_step_counts_nothing():
    module = _TinyModule()
    meter = TrainingStepFlops()
    meter.arm(module)
    assert meter.armed and not meter.counting and "training_step" in module.__dict__
    assert meter.stop() is None
    assert "training_step" not in module.__dict__
    assert module.training_step(torch.randn(B, D_IN), 0).shape == ()


def test_log_flops_fraction_logs_the_convention_key_and_checks_its_inputs():
    logged = {}

    class Recorder:
        def log(self, name, value, **kw):
            logged[name] = (value, kw)

    assert log_flops_fraction(Recorder(), "my_technique", 30.0, 120.0) == 0.25
    value, kw = logged["lit_ft/my_technique/flops_fraction"]
    assert value == 0.25 and kw["on_step"] is True
    with pytest.raises(ValueError, match="baseline must be > 0 FLOPs, got 0"):
        log_flops_fraction(Recorder(), "my_technique", 1.0, 0.0)
    with pytest.raises(ValueError, match="measured must be >= 0"):
        log_flops_fraction(Recorder(), "my_technique", -1.0, 2.0)
    with pytest.raises(ValueError, match="technique must be a non-empty string"):
        log_flops_fraction(Recorder(), "", 1.0, 2.0)


def test_profile_tensor_flops_of_a_two_layer_mlp_matches_hand_counts():
    model = _mlp()
    x = torch.randn(B, D_IN)
    prof = profile_tensor_flops(model, lambda: model(x).sum())
    fwd1, fwd2 = 2 * B * D_IN * D_HID, 2 * B * D_HID * D_OUT
    assert prof.names == ["2.weight", "0.weight"]  # output -> input
    assert prof.t_fp == fwd1 + fwd2
    assert prof.t_dw == [fwd2, fwd1]
    assert prof.t_step_all == fwd1 + fwd2 + fwd2 + fwd1 + fwd2  # forward, dW of both, dX of the second
    assert prof.outside_used == []
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())
