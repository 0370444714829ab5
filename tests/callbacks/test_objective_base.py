"""The objectives family's base (lit_ft.callbacks._objective.ObjectiveCallback): one life cycle at levels 2 and 3 —
attached at setup, the term changes training and is logged, detached at teardown, bad input named."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks._objective import ObjectiveCallback
from lit_ft.core.loss import installed_hook, token_pipeline_for
from lit_ft.modules import CausalLMModule
from tests.helpers import ListDataModule, PlainHFModule, tiny_config


class LogitPenalty(ObjectiveCallback):
    """``c · mean_v z²`` per supervised position (a z-loss-like term), normalised by the supervised tokens."""

    objective_name = "logit_penalty"

    def __init__(self, c: float = 0.5, integration: str = "auto") -> None:
        super().__init__(integration)
        self.c = c

    def objective_weight(self) -> float:
        return self.c

    def objective_loss(self, inputs):
        return inputs.chunked_loss(lambda z: z.pow(2).mean(-1).sum(), inputs.valid)


def _fit(module, callbacks):
    t = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, callbacks=callbacks)
    t.fit(module, datamodule=ListDataModule(n_batches=2))
    return t


@pytest.mark.parametrize("make, level", [("causal", "mixin"), ("plain", "hook")])
def test_term_changes_training_and_is_logged(make, level):
    def module():
        torch.manual_seed(0)
        return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2) if make == "causal" else PlainHFModule()

    base = module()
    _fit(base, [])
    with_term = module()
    cb = LogitPenalty(c=0.5)
    t = _fit(with_term, [cb])
    assert float(t.callback_metrics["lit_ft/logit_penalty/loss"]) > 0
    changed = [n for n, p in with_term.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed
    # detached at teardown: no participant left, the HF model's own loss function is back
    assert cb.level is None and cb not in token_pipeline_for(with_term).objectives
    assert installed_hook(with_term.model) is None


def test_level_choice_and_bad_integration():
    with pytest.raises(ValueError, match="integration"):
        LogitPenalty(integration="batch")
    cb = LogitPenalty(integration="mixin")
    with pytest.raises(TypeError, match="TokenLossMixin"):
        cb.setup(pl.Trainer(logger=False), PlainHFModule(), "fit")
