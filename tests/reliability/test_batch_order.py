"""issue 18 item 9: one ordering check (``lit_ft.core.loss.batch_order``) for callbacks that edit or read the batch
at ``on_train_batch_start``; its errors name the pair and the fix, at setup."""

from __future__ import annotations

import pytest
import torch

from lit_ft.callbacks import ExcessLossSelection, KeyTokenWeighting, QTuning, SSToken
from lit_ft.core.loss.batch_order import check_batch_order
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, quiet_trainer, tiny_config


def _fit(callbacks, steps: int = 2):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    quiet_trainer(callbacks, max_steps=steps, limit_val_batches=0).fit(module, datamodule=ListDataModule(n_batches=2))
    assert any(not torch.equal(p, before[n]) for n, p in module.named_parameters())


def _sep():
    return QTuning(sample_ratio=0.5, plot_every_n_steps=0)


@pytest.mark.parametrize("order", ["qtuning_first", "sstoken_first"])
def test_qtuning_separate_and_sstoken_do_not_combine(order):
    """issue 18 item 9: QTuning(scoring='separate') with SSToken's attention score fails at setup in either order,
    naming both and the fix (QTuning(scoring='inline'))."""
    cbs = [_sep(), SSToken(keep_ratio=0.5)]
    if order == "sstoken_first":
        cbs.reverse()
    with pytest.raises(ValueError, match=r"QTuning\(scoring='separate'\) and SSToken do not combine.*"
                                         r"QTuning\(scoring='inline'\) together with SSToken"):
        _fit(cbs)


def test_reader_listed_before_qtuning_separate_is_refused():
    """issue 18 item 9: ExcessLossSelection before QTuning(scoring='separate') (its reference NLL would be for rows
    QTuning removes: formerly a misleading "no reference NLL" error in the loss) fails at setup with the fix."""
    with pytest.raises(ValueError, match=r"ExcessLossSelection is listed before QTuning\(scoring='separate'\).*"
                                         r"Fix: list QTuning\(scoring='separate'\) before ExcessLossSelection"):
        _fit([ExcessLossSelection(keep_ratio=0.5, reference="initial"), _sep()])


@pytest.mark.parametrize("case", ["excess_after", "sstoken_loss_only_after", "inline_with_sstoken"])
def test_orders_that_work_still_train(case):
    """issue 18 item 9: the check refuses only the broken orders: these train."""
    cbs = {
        "excess_after": lambda: [_sep(), ExcessLossSelection(keep_ratio=0.5, reference="initial")],
        # gamma=1: no prompt keys read, the history NLL of the edited batch is what the loss needs
        "sstoken_loss_only_after": lambda: [_sep(), SSToken(keep_ratio=0.5, gamma=1.0)],
        "inline_with_sstoken": lambda: [SSToken(keep_ratio=0.5), QTuning(sample_ratio=0.5, scoring="inline",
                                                                         plot_every_n_steps=0)],
    }[case]()
    _fit(cbs)


def test_scorer_without_batch_start_work_may_come_first():
    """KeyTokenWeighting does no per-batch work before the forward (no ``prepare_batch``): any order is fine."""
    check_batch_order([KeyTokenWeighting(), _sep()])
    with pytest.raises(ValueError, match="ExcessLossSelection is listed before"):  # the inferred reader is refused
        check_batch_order([KeyTokenWeighting(), ExcessLossSelection(reference="initial"), _sep()])


def test_declared_parts_only():
    """The rule itself: a reader before an editor of what it reads is refused; an editor of other parts is not."""

    class Editor:
        batch_start_edits = frozenset({"input_ids"})

    class Reader:
        batch_start_reads = frozenset({"rows"})

    check_batch_order([Reader(), Editor()])  # disjoint: fine
    Editor.batch_start_edits = frozenset({"rows"})
    with pytest.raises(ValueError, match="Fix: list Editor before Reader"):
        check_batch_order([Reader(), Editor()])
    check_batch_order([Editor(), Reader()])
