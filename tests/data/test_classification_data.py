"""ClassificationDataModule: batches, label mapping, truncation accounting, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lit_ft.data import ClassificationDataModule, DataWarning
from lit_ft.testing import write_tiny_classification_jsonl


def make_dm(data, tok, **kw):
    dm = ClassificationDataModule(data=data, tokenizer=tok, **kw)
    dm.setup()
    return dm


def test_batches_and_sample_idx(tiny_tok, tmp_path):
    data = write_tiny_classification_jsonl(tmp_path / "train.jsonl", n=30)
    val = write_tiny_classification_jsonl(tmp_path / "val.jsonl", n=6, seed=1)
    rows = [json.loads(x) for x in open(data)]
    dm = make_dm(data, tiny_tok, val_data=val, batch_size=8, max_length=64)
    assert dm.num_labels == 2 and dm.label_names == ["0", "1"]
    tok = dm.tokenizer
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels", "sample_idx"}
        assert batch["labels"].dtype == torch.long and batch["labels"].shape == batch["sample_idx"].shape
        for b, i in enumerate(batch["sample_idx"].tolist()):
            seen.append(i)
            n = int(batch["attention_mask"][b].sum())
            assert batch["attention_mask"][b][n:].eq(0).all() and batch["attention_mask"][b][:n].eq(1).all()
            assert batch["input_ids"][b][n:].eq(tok.pad_token_id).all()
            assert tok.decode(batch["input_ids"][b][:n]) == rows[i]["text"]
            assert int(batch["labels"][b]) == rows[i]["label"]
    assert sorted(seen) == list(range(30))
    vb = next(iter(dm.val_dataloader()))
    assert vb["sample_idx"].tolist() == list(range(6))  # unshuffled
    # per-epoch order: deterministic for (seed, epoch), different across epochs
    dl = dm.train_dataloader()
    orders = []
    for e in (0, 1, 0):
        dl.batch_sampler.sampler.set_epoch(e)
        orders.append(torch.cat([b["sample_idx"] for b in dl]).tolist())
    assert orders[0] == orders[2] != orders[1]


def test_string_labels_mapped_and_label_names_file(tiny_tok, write_jsonl, tmp_path):
    rows = [{"sentence": f"apples {i}", "topic": ["sports", "business", "tech"][i % 3]} for i in range(12)]
    data = write_jsonl("s.jsonl", rows)
    dm = make_dm(data, tiny_tok, text_key="sentence", label_key="topic", val_split=0.25)
    assert dm.label_names == ["business", "sports", "tech"] and dm.num_labels == 3
    ex = dm._examples("train") + dm._examples("val")
    assert len(ex) == 12
    # int labels: names from label_names.json beside the data file
    (tmp_path / "label_names.json").write_text(json.dumps(["neg", "pos", "neutral"]))
    data2 = write_jsonl("i.jsonl", [{"text": "a b", "label": i % 3} for i in range(9)])
    dm2 = make_dm(data2, tiny_tok, val_split=0.0)
    assert dm2.label_names == ["neg", "pos", "neutral"] and dm2.num_labels == 3
    dm3 = make_dm(data2, tiny_tok, val_split=0.0, num_labels=5)  # file does not match -> plain names
    assert dm3.label_names == ["0", "1", "2", "3", "4"]


def test_pad_defaults_to_eos(tiny_tok_no_template, tmp_path):
    data = write_tiny_classification_jsonl(tmp_path / "t.jsonl", n=8)
    dm = make_dm(data, tiny_tok_no_template, val_split=0.0)
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id is not None
    assert next(iter(dm.train_dataloader()))["input_ids"].shape[0] == 8


def test_truncation_counted_and_warned(tiny_tok, write_jsonl):
    rows = [{"text": "Tom has apples", "label": 0}, {"text": "apples and oranges " * 30, "label": 1}]
    data = write_jsonl("t.jsonl", rows)
    with pytest.warns(DataWarning, match="truncated 1 texts"):
        dm = make_dm(data, tiny_tok, val_split=0.0, max_length=16)
    assert dm.stats["truncated_samples"] == dm.stats["train_truncated_samples"] == 1
    assert dm.stats["truncated_tokens"] > 0 and dm.stats["train_samples"] == 2
    assert max(len(e["input_ids"]) for e in dm._examples("train")) == 16


def test_bad_input(tiny_tok, write_jsonl, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data='.*missing\.jsonl'.*Known assets"):
        make_dm(str(tmp_path / "missing.jsonl"), tiny_tok)
    with pytest.raises(ValueError, match=r"train row 1: missing key\(s\) \['label'\]; keys found: \['lbl', 'text'\]"):
        make_dm(write_jsonl("a.jsonl", [{"text": "a", "label": 0}, {"text": "b", "lbl": 1}]), tiny_tok,
                val_split=0.0)
    with pytest.raises(ValueError, match="mix ints and strings"):
        make_dm(write_jsonl("b.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": "x"}]), tiny_tok,
                val_split=0.0)
    with pytest.raises(ValueError, match=r"must lie in \[0, num_labels=2\)"):
        make_dm(write_jsonl("c.jsonl", [{"text": "a", "label": 0}, {"text": "b", "label": 2}]), tiny_tok,
                val_split=0.0, num_labels=2)
    with pytest.raises(ValueError, match="never occur in the training data"):
        make_dm(write_jsonl("d.jsonl", [{"text": "a", "label": "x"}] * 3), tiny_tok,
                val_data=write_jsonl("e.jsonl", [{"text": "a", "label": "y"}]))
    for kw, match in [
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(val_split=1.5), r"val_split must be a float in \[0, 1\)"),
        (dict(max_length=0), "max_length must be an integer >= 2"),
        (dict(num_labels=1), "num_labels must be an integer >= 2 or None"),
        (dict(text_key=""), "text_key must be a non-empty string"),
    ]:
        with pytest.raises(ValueError, match=match):
            ClassificationDataModule(**kw)


@pytest.mark.slow
def test_sarcasm_with_minilm():
    dm = ClassificationDataModule(max_train_samples=200, max_val_samples=50, batch_size=16)
    dm.setup()
    assert dm.stats["train_rows"] == 26498 and dm.stats["val_rows"] == 2000 and dm.num_labels == 2
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[0] == 16 and set(b["labels"].tolist()) <= {0, 1}
    assert int(b["input_ids"][0, 0]) == dm.tokenizer.cls_token_id
