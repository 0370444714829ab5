"""How the matrix cuts a case's data into batches (``tests/matrix/case_data.py``): preference pairs are counted,
halved and concatenated by their ``<side>_input_ids``; a lit-ft text DataModule's rows are collated by the DataModule
when the loader is asked for, so the rows a technique kept at setup are the ones that train; and the fuzz setting
shapes every side of a pair."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import case_data  # noqa: E402
import fuzz_cell  # noqa: E402
from single_job import collate_batches  # noqa: E402

from tests.helpers import ListDataModule  # noqa: E402
from tests.pairs import pair_batch  # noqa: E402


@dataclass
class FakeCase:
    """What a plan reads of a contract case."""

    datamodule: Callable[[], Any]


def test_pair_batches_are_counted_halved_and_concatenated_by_their_sides():
    batch = pair_batch(seed=1, batch_size=3)  # no `input_ids`: chosen_ / rejected_ sequences, sample_idx
    assert case_data.batch_rows(batch) == 3
    first, second = case_data.split_rows(batch)
    assert first["sample_idx"].tolist() == [3] and second["sample_idx"].tolist() == [4, 5]
    assert first["rejected_labels"].shape == (1, 11) and second["chosen_input_ids"].shape == (2, 11)
    whole = case_data.concat_rows([first, second])
    assert all(torch.equal(whole[k], batch[k]) for k in batch)


def test_batches_the_harness_cannot_count_or_join_are_refused_by_name():
    with pytest.raises(KeyError, match="no `input_ids`.*'labels'"):
        case_data.batch_rows({"labels": torch.zeros(2, 3)})
    lopsided = {"chosen_input_ids": torch.zeros(2, 3), "rejected_input_ids": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="different row counts"):
        case_data.batch_rows(lopsided)
    narrow, wide = {"input_ids": torch.zeros(2, 3)}, {"input_ids": torch.zeros(2, 5)}
    with pytest.raises(ValueError, match=r"`input_ids` has shapes \[\(2, 3\), \(2, 5\)\]"):
        case_data.concat_rows([narrow, wide])


def test_a_plain_batch_datamodule_gets_the_fixed_batch_plan():
    plan = case_data.plan_for(FakeCase(lambda: ListDataModule(n_batches=2)))
    assert type(plan) is case_data.BatchPlan
    micro = plan.batches()
    merged = plan.merge(micro)
    assert case_data.batch_rows(merged) == 2 * case_data.batch_rows(micro[0])
    assert plan.materialize(object(), micro[0]) is micro[0]


def _sft(tmp_path: Path, cls=None):
    from lit_ft.data import SFTDataModule
    from lit_ft.testing import make_tiny_tokenizer, write_tiny_sft_jsonl

    tok = make_tiny_tokenizer(tmp_path / "tok")
    data = write_tiny_sft_jsonl(tmp_path / "train.jsonl", n=20, seed=2)
    val = write_tiny_sft_jsonl(tmp_path / "val.jsonl", n=2, seed=3)
    return lambda: (cls or SFTDataModule)(data=data, val_data=val, tokenizer=tok, max_length=64, batch_size=4,
                                          use_chat_template=False, bucket_by_length=False)


def test_text_datamodule_rows_are_collated_at_fit_time_after_a_selection(tmp_path):
    """RowPlan: batches are row ranges; the DataModule collates them from the rows it holds when asked (here after
    a stand-in for OTDataSelection's setup kept rows 1, 3, 5, ...), and the global batch pads the rows of both
    micro-batches together."""
    plan = case_data.plan_for(FakeCase(_sft(tmp_path)))
    assert type(plan) is case_data.RowPlan
    micro = plan.batches()
    assert micro == [case_data.Rows(0, 4), case_data.Rows(4, 8)]
    assert plan.merge(micro) == case_data.Rows(0, 8)
    assert plan.halves(micro[1]) == [case_data.Rows(4, 6), case_data.Rows(6, 8)]
    assert plan.template(micro[0])["sample_idx"].tolist() == [0, 1, 2, 3]

    dm = plan.case.datamodule()
    dm.setup("fit")
    dm._splits["train"] = dm._splits["train"][1::2]  # what a row selection does (keep_rows)
    kept = [int(e["sample_idx"]) for e in dm._splits["train"]]
    parts = [plan.materialize(dm, r) for r in micro]
    whole = plan.materialize(dm, plan.merge(micro))
    assert parts[0]["sample_idx"].tolist() == kept[:4] and whole["sample_idx"].tolist() == kept[:8]
    assert whole["input_ids"].shape[1] == max(p["input_ids"].shape[1] for p in parts)
    for p, rows in zip(parts, (slice(0, 4), slice(4, 8))):  # the same tokens, only padded wider
        width = p["input_ids"].shape[1]
        assert torch.equal(whole["input_ids"][rows, :width][p["attention_mask"].bool()],
                           p["input_ids"][p["attention_mask"].bool()])
    dm._splits["train"] = dm._splits["train"][:5]
    with pytest.raises(ValueError, match="serves 5 training row"):
        plan.materialize(dm, micro[1])
    assert plan.materialize(dm, parts[0]) is parts[0]  # a batch the cell made itself passes through


def test_a_datamodule_with_its_own_training_loader_keeps_the_fixed_batches(tmp_path):
    """FeedbackLoopDataModule-like: its loader serves rows that are not ``_examples("train")``."""
    from lit_ft.data import SFTDataModule

    class OwnLoader(SFTDataModule):
        def train_dataloader(self):
            return super().train_dataloader()

    assert type(case_data.plan_for(FakeCase(_sft(tmp_path, OwnLoader)))) is case_data.BatchPlan


def test_the_resumable_loader_collates_any_number_of_its_batches():
    """CriticalTokenScoring re-reads the loader's dataset with its own batch size: it must get every row."""
    a, b = pair_batch(0, batch_size=2), pair_batch(1, batch_size=2)
    assert collate_batches([a]) is a
    assert collate_batches([a, b])["sample_idx"].tolist() == [0, 1, 2, 3]


def test_fuzz_shapes_both_sides_of_a_pair():
    template = pair_batch(seed=0, batch_size=3)
    b = fuzz_cell.shaped_batch(template, ["normal", "padded"], 2, with_mask=True)
    for side in ("chosen", "rejected"):
        assert b[f"{side}_input_ids"].tolist() == template[f"{side}_input_ids"][:2, :2].tolist()
        assert b[f"{side}_labels"].tolist() == [b[f"{side}_input_ids"][0].tolist(), [-100, -100]]
        assert b[f"{side}_attention_mask"].tolist() == [[1, 1], [0, 0]]
    assert b["sample_idx"].tolist() == [0, 1]
    bare = fuzz_cell.shaped_batch(template, ["ignored"], 1, with_mask=False)
    assert not any(k.endswith("attention_mask") for k in bare)
    assert bare["chosen_labels"].tolist() == [[-100]] and bare["rejected_labels"].tolist() == [[-100]]
