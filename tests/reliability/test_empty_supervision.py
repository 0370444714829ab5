"""Issue 18 item 10: a run whose batches have no supervised token (every label -100 after the shift) trained
silently (loss 0.0, kept fraction 0.0, no warning) with a token scorer, where plain HF shows NaN. Now the token
pipeline warns once per run with the count of such optimizer steps, and fails when a whole epoch has none."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils.data import DataLoader

import lightning.pytorch as pl

from lit_ft.callbacks.token_selection import ExcessLossSelection, KeyTokenWeighting
from lit_ft.core.loss import token_pipeline_for
from lit_ft.modules import CausalLMModule

from helpers import PlainHFModule, quiet_trainer, random_batch, tiny_config


class _Batches(pl.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, shuffle=False)


def _batches(n: int, empty: set[int]) -> list[dict]:
    out = []
    for i in range(n):
        b = random_batch(2, 10, seed=i)
        b["key_token_mask"] = torch.zeros_like(b["labels"], dtype=torch.bool)
        b["key_token_mask"][:, 6] = True
        b["key_boundary_mask"] = torch.zeros_like(b["key_token_mask"])  # KeyTokenWeighting's default preset
        b["key_boundary_mask"][:, 8] = True
        if i in empty:
            b["labels"][:] = -100
            b["labels"][:, 0] = 7  # a label at position 0 only: never a target after the one-token shift
        out.append(b)
    return out


def _messages(record) -> list[str]:
    return [str(w.message) for w in record if "no supervised token" in str(w.message)]


@pytest.mark.parametrize("module_kind", ["mixin", "hook"])
@pytest.mark.parametrize("scorer", ["excess_loss", "key_token"])
def test_steps_without_supervised_tokens_warn_once_with_their_count(module_kind, scorer):
    """issue 18 item 10: 2 of 6 steps (accumulate 1) have no supervised token: one warning naming "2 of 6"; the
    counter says 2; the other steps train."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config()) if module_kind == "mixin" else PlainHFModule()
    cb = ExcessLossSelection(keep_ratio=0.5, reference="initial") if scorer == "excess_loss" else KeyTokenWeighting()
    trainer = quiet_trainer([cb], max_steps=6, max_epochs=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=_Batches(_batches(6, empty={1, 4})))
    msgs = _messages(record)
    assert len(msgs) == 1, msgs
    assert "2 of 6 optimizer steps" in msgs[0]
    assert token_pipeline_for(module).empty_steps == 2


def test_the_count_is_per_optimizer_step_with_accumulation():
    """issue 18 item 10: with accumulate_grad_batches=2 a step is empty only when both its micro-batches are."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    trainer = quiet_trainer([ExcessLossSelection(keep_ratio=0.5, reference="initial")], max_steps=3, max_epochs=1,
                            accumulate_grad_batches=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # windows: (0, 1) empty, (2, 3) half empty, (4, 5) full
        trainer.fit(module, datamodule=_Batches(_batches(6, empty={0, 1, 2})))
    msgs = _messages(record)
    assert len(msgs) == 1 and "1 of 3 optimizer steps" in msgs[0], msgs
    assert token_pipeline_for(module).empty_steps == 1


@pytest.mark.parametrize("module_kind", ["mixin", "hook"])
def test_an_epoch_without_any_supervised_token_fails(module_kind):
    """issue 18 item 10: every batch of the epoch is empty: fit raises, naming the epoch (it trained loss 0.0)."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config()) if module_kind == "mixin" else PlainHFModule()
    trainer = quiet_trainer([ExcessLossSelection(keep_ratio=0.5, reference="initial")], max_steps=-1, max_epochs=2)
    with pytest.raises(RuntimeError, match="no batch of epoch 0 has a supervised token"):
        trainer.fit(module, datamodule=_Batches(_batches(3, empty={0, 1, 2})))


def test_a_run_with_supervised_tokens_everywhere_does_not_warn():
    """issue 18 item 10: no false alarm."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    trainer = quiet_trainer([ExcessLossSelection(keep_ratio=0.5, reference="initial")], max_steps=-1, max_epochs=2)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(module, datamodule=_Batches(_batches(3, empty=set())))
    assert _messages(record) == []
    assert token_pipeline_for(module).empty_steps == 0
