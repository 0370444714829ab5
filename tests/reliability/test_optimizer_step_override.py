"""issue 18 item 6: a ``CausalLMModule`` subclass that overrides ``on_before_optimizer_step`` without ``super()``
(Lightning's usual grad-norm logging pattern) trains exactly like one that calls it.

The loss is normalised by the accumulation window's count before backward (``core/loss/window.py``), so nothing is
rescaled at the optimizer step any more; these tests pin that down against HF's own loss."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from lit_ft.callbacks import FreezeLayers

from helpers import SGDModule, assert_state_dicts_equal, quiet_trainer, random_batch, tiny_config

KEYS = ("input_ids", "attention_mask", "labels")


class NoSuper(SGDModule):
    """Logs the gradient norm the usual Lightning way and does not call ``super()``."""

    def on_before_optimizer_step(self, optimizer):
        self.norms = getattr(self, "norms", [])
        self.norms.append(float(torch.linalg.vector_norm(
            torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]))))


class WithSuper(NoSuper):
    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        SGDModule.on_before_optimizer_step(self, optimizer)


def _batches() -> list[dict]:
    batches = [random_batch(2, 16, prompt_len=3, seed=s) for s in range(4)]
    batches[1]["labels"][0, 3:14] = -100  # unequal supervised counts inside the first window
    return batches


def _fit(cls, init: dict, batches: list[dict], callbacks=(), steps: int = 2):
    torch.manual_seed(0)
    module = cls(model_config=tiny_config())
    module.load_state_dict(init)
    trainer = quiet_trainer(list(callbacks), max_steps=steps, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module


def test_override_without_super_trains_like_super():
    """issue 18 item 6: same weights (bit for bit) and the same logged gradient norms with and without super();
    the first update equals SGD (lr 1) on HF's mean loss over the window's micro-batches concatenated."""
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in SGDModule(model_config=tiny_config()).state_dict().items()}
    batches = _batches()
    plain = _fit(NoSuper, init, batches)
    calls = _fit(WithSuper, init, batches)
    assert_state_dicts_equal(plain.state_dict(), calls.state_dict())
    assert plain.norms == calls.norms and len(plain.norms) == 2

    one = _fit(NoSuper, init, batches, steps=1)
    ref = SGDModule(model_config=tiny_config())
    ref.load_state_dict(init)
    cat = {k: torch.cat([b[k] for b in batches[:2]]) for k in KEYS}
    ref.model(**cat).loss.backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= p.grad
    moved = False
    for (name, p), q in zip(one.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(p, init[name])
    assert moved


def test_override_without_super_keeps_flops_measurements():
    """issue 18 item 6: the window bookkeeping that parameter techniques' FLOPs measurements wait for
    (``TokenPipeline.mid_window``) closes even when the module's hook does not call ``super()``, so
    ``lit_ft/<technique>/flops_fraction`` is measured on the same steps as with ``super()``."""
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in SGDModule(model_config=tiny_config()).state_dict().items()}
    batches = _batches() * 2
    found = []
    for cls in (WithSuper, NoSuper):
        cb = FreezeLayers(num_layers=1)
        cb.flops_every_n_steps = 1
        _fit(cls, init, batches, callbacks=[cb], steps=4)
        found.append([m[0] for m in cb.flops_monitor.measurements])
    assert found[0], "the reference run (with super()) measured nothing"
    assert found[1] == found[0]
