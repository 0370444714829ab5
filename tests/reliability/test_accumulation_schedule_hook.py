"""issue 18 item 3: the HF-hook path (level 2) scales gradients by the *current* ``accumulate_grad_batches``.

Lightning's ``GradientAccumulationScheduler`` changes ``trainer.accumulate_grad_batches`` between epochs; the hook
copied it once at setup, so after a 1 -> 2 switch every gradient was exactly half. Reference: HF's own mean loss
over the accumulation window's micro-batches concatenated (what accumulation must reproduce)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from torch.utils.data import DataLoader

from lit_ft.callbacks import ExcessLossSelection

from helpers import PlainHFModule, random_batch

KEYS = ("input_ids", "attention_mask", "labels")


class GradRecorder(Callback):
    """The gradient of every optimizer step (the sum over its accumulation window)."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})


def _reference_grads(init: dict, window: list[dict]) -> dict[str, torch.Tensor]:
    ref = PlainHFModule()
    ref.load_state_dict(init)
    cat = {k: torch.cat([b[k] for b in window]) for k in KEYS}
    ref.model(**cat).loss.backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def test_hook_gradient_follows_gradient_accumulation_scheduler():
    """issue 18 item 3: epoch 0 accumulates 1 micro-batch, epoch 1 two (GradientAccumulationScheduler); every
    step's gradient equals HF's mean-loss gradient over its window (lr 0: all at the initial weights)."""
    torch.manual_seed(0)
    module = PlainHFModule(lr=0.0)
    init = {k: v.clone() for k, v in module.state_dict().items()}
    batches = [random_batch(2, 16, prompt_len=3, seed=s) for s in range(4)]
    batches[2]["labels"][0, 3:12] = -100  # unequal supervised counts inside a window: a mean of means differs
    rec = GradRecorder()
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
        callbacks=[GradientAccumulationScheduler({1: 2}), ExcessLossSelection(keep_ratio=1.0, reference="initial"), rec],
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    assert trainer.accumulate_grad_batches == 2
    windows = [[b] for b in batches] + [batches[0:2], batches[2:4]]
    assert len(rec.grads) == len(windows)
    for step, window in enumerate(windows):
        ref = _reference_grads(init, window)
        for name, g in ref.items():
            torch.testing.assert_close(rec.grads[step][name], g, rtol=1e-4, atol=1e-7,
                                       msg=lambda m, s=step, n=name: f"step {s} {n}: {m}")
