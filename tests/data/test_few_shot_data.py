"""FewShotDataModule: K labelled rows per class (seeded), the rest unlabelled with labels hidden, seeded side streams."""

from __future__ import annotations

import pytest
import torch

from tests.self_training_case import few_shot_data


def test_k_per_class_labelled_and_the_rest_unlabelled_without_labels():
    dm = few_shot_data()
    dm.setup("fit")
    labelled = dm._examples("train")
    assert sorted(int(e["label"]) for e in labelled) == [0] * 4 + [1] * 4
    pool_rows = {e["sample_idx"] for e in dm._unlabelled}
    assert not pool_rows & {e["sample_idx"] for e in labelled} and len(pool_rows) == 40 == dm.num_unlabelled
    assert dm.stats["labelled_samples"] == 8 and dm.stats["unlabelled_samples"] == 40
    b = next(iter(dm.stream_loader("unlabelled", 0)))
    assert "labels" not in b and b["input_ids"].shape[0] == 8 and b["pool_idx"].max() < 40
    assert sum(len(x["labels"]) for x in dm.train_dataloader()) == 8  # the Trainer sees only the labelled rows
    assert dm.unlabelled_labels().shape == (40,)
    pool = torch.cat([x["pool_idx"] for x in dm.pool_loader()])
    assert pool.tolist() == list(range(40))


def test_streams_are_seeded_per_epoch_and_the_draw_per_seed():
    a, b = few_shot_data(), few_shot_data()
    ids = lambda dm, e: torch.cat([x["pool_idx"] for x in dm.stream_loader("unlabelled", e)]).tolist()  # noqa: E731
    assert ids(a, 0) == ids(b, 0) and ids(a, 0) != ids(a, 1)
    assert len(ids(a, 0)) == 40  # 5 full batches of 8
    meta = [x["labels"].shape[0] for x in a.stream_loader("meta", 0)]
    assert meta == [3, 3, 2]
    c = few_shot_data(seed=1)
    c.setup("fit")
    a.setup("fit")
    assert {e["sample_idx"] for e in a._examples("train")} != {e["sample_idx"] for e in c._examples("train")}
    capped = few_shot_data(max_unlabelled_samples=16)
    assert capped.num_unlabelled == 16


def test_bad_arguments_name_them():
    for arg, value in (("shots_per_class", 0), ("unlabelled_batch_size", 0), ("meta_batch_size", 1.5),
                       ("max_unlabelled_samples", 0)):
        with pytest.raises(ValueError, match=arg):
            few_shot_data(**{arg: value})
    with pytest.raises(ValueError, match="stream"):
        few_shot_data().stream_loader("labelled", 0)
