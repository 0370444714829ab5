"""DeepSpeed is refused (issue 18): every technique that refuses FSDP2 refuses ``DeepSpeedStrategy`` at setup with the
same message, the strategy named. deepspeed is not installed here, and ``lit_ft.core.strategy`` recognises strategies
by class name, so a single-device strategy class *named* ``DeepSpeedStrategy`` (or ``ModelParallelStrategy``, for
the FSDP2 side) stands in for it in a real ``Trainer.fit``."""

from __future__ import annotations

from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

import lit_ft
from lit_ft.core.strategy import is_sharded_strategy, refuse_sharded_strategies, require_unused_parameter_tolerance
from tests.contract.cases import CASES, Ctx


class ModelParallelStrategy(SingleDeviceStrategy):
    """Named like Lightning's FSDP2 strategy; trains on one CPU device."""


class DeepSpeedStrategy(SingleDeviceStrategy):
    """Named like Lightning's DeepSpeed strategy; trains on one CPU device."""


def _setup_refusal(record, strategy_cls, ctx: Ctx) -> str | None:
    """The message of the error a 1-step fit of ``record``'s case raises before its first batch, else None."""
    case = CASES[record.name]
    torch.manual_seed(0)
    module = case.module()
    started = []

    class Started(pl.Callback):
        def on_train_batch_start(self, *args):
            started.append(True)

    # a root dir under the test's folder: a technique's default cache (CriticalTokenScoring's weights file) lands there
    root = ctx.tmp_path / f"{record.name}_{strategy_cls.__name__}"
    trainer = pl.Trainer(accelerator="cpu", strategy=strategy_cls(device=torch.device("cpu")), max_steps=1,
                         default_root_dir=str(root), logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                         callbacks=[Started(), record.cls(**case.build(case.kwargs, ctx))])
    try:
        trainer.fit(module, datamodule=case.datamodule())
    except (ValueError, RuntimeError) as e:
        if not started:
            return str(e)
        raise
    return None


@pytest.mark.slow
def test_every_technique_refusing_fsdp2_refuses_deepspeed_with_the_same_message(tmp_path, tiny_tokenizer_path):
    ctx = Ctx(tmp_path, tiny_tokenizer_path)
    refusing = []
    for record in lit_ft.techniques():
        if issubclass(record.cls, pl.LightningModule):
            continue  # a technique that is the module (BlackBoxPromptLearning) refuses >1 process in its own tests
        fsdp2 = _setup_refusal(record, ModelParallelStrategy, ctx)
        if fsdp2 is None or "ModelParallelStrategy" not in fsdp2:
            continue
        refusing.append(record.name)
        deepspeed = _setup_refusal(record, DeepSpeedStrategy, ctx)
        assert deepspeed == fsdp2.replace("ModelParallelStrategy", "DeepSpeedStrategy"), (record.name, deepspeed)
    # the prompt techniques, SSToken, GreenTrainer, LotteryTicketSparseFT, TokenElimination (docs/compatibility.md)
    assert {"prompt_tuning", "green_trainer", "lottery_ticket", "sstoken"} <= set(refusing), refusing


def test_deepspeed_is_recognised_by_name_and_never_gets_the_ddp_advice():
    """Lightning's DeepSpeedStrategy subclasses DDPStrategy: the unused-parameter check must refuse it with the reason
    instead of recommending a DDP flag."""

    class DeepSpeedStrategy(DDPStrategy):  # noqa: D401  what Lightning's class derives from
        pass

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy(), world_size=2)
    assert is_sharded_strategy(trainer) == "DeepSpeedStrategy"
    with pytest.raises(ValueError, match="GreenTrainer does not support DeepSpeedStrategy yet: it needs whole"):
        refuse_sharded_strategies(trainer, "GreenTrainer", "it needs whole parameter tensors")
    with pytest.raises(ValueError, match="HalfFineTuning does not support DeepSpeedStrategy: it freezes") as e:
        require_unused_parameter_tolerance(trainer, "HalfFineTuning", "freezes part of the model")
    assert "find_unused_parameters=False" not in str(e.value)
    # a plain DDP run still gets the DDP advice
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        require_unused_parameter_tolerance(SimpleNamespace(strategy=DDPStrategy(), world_size=2), "X", "freezes")
