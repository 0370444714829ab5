"""Global token normalisation and global top-k under real multi-process DDP (2 CPU ranks, gloo): 2 ranks x batch 4
must update the weights exactly like one process with batch 8."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import ExcessLossSelection
from lit_ft.modules import CausalLMModule

from helpers import random_batch, tiny_config


class SGDModule(CausalLMModule):
    # SGD makes the update proportional to the gradient, so any normalisation error shows in the weights
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _fit(strategy: str, devices: int, batch_size: int, init_state, data, keep_ratio):
    module = SGDModule(model_config=tiny_config())
    module.load_state_dict(init_state)
    batches = [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, 8, batch_size)]
    callbacks = [ExcessLossSelection(keep_ratio=keep_ratio)] if keep_ratio else []
    trainer = pl.Trainer(
        accelerator="cpu", strategy=strategy, devices=devices, max_steps=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        use_distributed_sampler=True,
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return module.state_dict()


@pytest.mark.slow
@pytest.mark.parametrize("keep_ratio", [None, 0.5], ids=["plain", "excess_loss"])
def test_ddp_two_ranks_equal_one_big_batch(keep_ratio):
    torch.manual_seed(0)
    init = SGDModule(model_config=tiny_config()).state_dict()
    data = random_batch(8, 16, prompt_len=3, seed=2)
    data["labels"][:4, 3:12] = -100  # rank 0 holds far fewer tokens than rank 1
    single = _fit("auto", 1, 8, init, data, keep_ratio)
    ddp = _fit("ddp_spawn", 2, 4, init, data, keep_ratio)
    moved = False
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(single[name], init[name])
    assert moved
