"""Checks every adapter technique's tests run (the family's shared life cycle), each taking a callback factory."""

from __future__ import annotations

from typing import Callable

import lightning.pytorch as pl
import torch

from lit_ft.modules import CausalLMModule
from tests.helpers import (
    FitAndResume,
    ListDataModule,
    LoraModule,
    PlainHFModule,
    assert_state_dicts_equal,
    fit_and_resume,
    quiet_trainer,
    tiny_config,
)


def assert_resume_equals_uninterrupted(make_callback: Callable[[], pl.Callback], tmp_path,
                                       key: Callable[[str], bool] = lambda k: k.startswith("lit_ft_adapters.")
                                       ) -> FitAndResume:
    """Checkpoint at step 2, resume to 4: every weight (the adapters' included: some state-dict key satisfies
    ``key``) equals the uninterrupted run's."""
    r = fit_and_resume(lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1),
                       lambda: [make_callback()], tmp_path)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    assert any(key(k) for k in r.resumed.state_dict())
    return r


def assert_plain_module_backbone_untouched(make_callback: Callable[[], pl.Callback]) -> None:
    """On a plain ``self.model(**batch).loss`` module: the adapters are added and train, no model weight moves."""
    plain = PlainHFModule()
    before = {n: p.detach().clone() for n, p in plain.named_parameters()}
    quiet_trainer([make_callback()], max_steps=2).fit(plain, datamodule=ListDataModule(n_batches=2))
    moved = {n for n, p in plain.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert not moved and any(n.startswith("lit_ft_adapters.") for n, _ in plain.named_parameters())


def fit_on_peft_lora(make_callback: Callable[[], pl.Callback]) -> pl.Callback:
    """Two steps on a PEFT-LoRA module; returns the callback for the caller's checks of what it found."""
    cb = make_callback()
    quiet_trainer([cb], max_steps=2).fit(LoraModule(), datamodule=ListDataModule(n_batches=2))
    return cb
