"""PackedTextDataModule: exact packing (eos between documents, fixed lengths, labels == ids), the seeded sequence
split, sample_idx, errors naming what is wrong, and a Trainer step of CausalLMModule on packed batches."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer

from lit_ft.data import PackedTextDataModule
from lit_ft.testing import tiny_corpus, tiny_llama_config

SEQ = 32


def docs(n: int = 24, seed: int = 0) -> list[dict]:
    """n documents of 2-4 pseudo-sentences each (about 20-80 tokens with the tiny tokenizer)."""
    lines = tiny_corpus(4 * n, seed=seed)
    return [{"text": " ".join(lines[4 * i : 4 * i + 2 + i % 3]), "id": i} for i in range(n)]


def expected_sequences(tok_path: str, rows: list[dict], seq_len: int) -> list[list[int]]:
    """Independent packing: per-document ids + eos, concatenated, cut into full chunks."""
    tok = AutoTokenizer.from_pretrained(tok_path)
    stream = []
    for r in rows:
        stream += tok.encode(r["text"], add_special_tokens=False) + [tok.eos_token_id]
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def make_dm(data, tok, **kw):
    kw.setdefault("seq_len", SEQ)
    dm = PackedTextDataModule(data=data, tokenizer=tok, **kw)
    dm.setup()
    return dm


def seqs_of(dm, split):
    return [e["input_ids"].tolist() for e in dm._examples(split)]


# --------------------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------------------


def test_exact_packing_and_batches(tiny_tok, write_jsonl):
    rows = docs()
    data = write_jsonl("d.jsonl", rows)
    dm = make_dm(data, tiny_tok, val_split=0.0, batch_size=3)
    want = expected_sequences(tiny_tok, rows, SEQ)
    n_tokens = sum(len(dm.tokenizer.encode(r["text"], add_special_tokens=False)) + 1 for r in rows)
    assert len(want) == n_tokens // SEQ and len(want) >= 10
    assert seqs_of(dm, "train") == want
    assert dm._examples("val") == [] and dm.val_dataloader() == []
    assert dm.stats["data_tokens"] == n_tokens
    assert dm.stats["data_dropped_tokens"] == dm.stats["dropped_tokens"] == n_tokens - len(want) * SEQ
    assert dm.stats["data_documents"] == len(rows)
    assert dm.stats["data_sequences"] == dm.stats["train_samples"] == len(want)
    # the eos separators sit exactly at the document ends of the stream
    eos = dm.tokenizer.eos_token_id
    flat = [t for s in want for t in s]
    ends, pos = [], -1
    for r in rows:
        pos += len(dm.tokenizer.encode(r["text"], add_special_tokens=False)) + 1
        if pos < len(flat):
            ends.append(pos)
    assert [i for i, t in enumerate(flat) if t == eos] == ends
    # batches: every sequence once per epoch, in a shuffled order, labels == input_ids, mask all ones
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels", "sample_idx"}
        assert batch["input_ids"].dtype == torch.long and batch["input_ids"].shape[1] == SEQ
        assert torch.equal(batch["labels"], batch["input_ids"])
        assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
        assert batch["attention_mask"].eq(1).all()
        for i, ids in zip(batch["sample_idx"].tolist(), batch["input_ids"].tolist()):
            assert ids == want[i]
            seen.append(i)
    assert sorted(seen) == list(range(len(want))) and seen != sorted(seen)


def test_text_key_and_remainder_dropped(tiny_tok, write_jsonl):
    rows = [{"body": r["text"]} for r in docs(8)]
    dm = make_dm(write_jsonl("b.jsonl", rows), tiny_tok, text_key="body", val_split=0.0, seq_len=17)
    want = expected_sequences(tiny_tok, [{"text": r["body"]} for r in rows], 17)
    assert seqs_of(dm, "train") == want
    assert 0 <= dm.stats["dropped_tokens"] < 17


# --------------------------------------------------------------------------------------------------------------
# split, subsets, sample_idx
# --------------------------------------------------------------------------------------------------------------


def test_val_split_is_seeded_disjoint_and_complete(tiny_tok, write_jsonl):
    data = write_jsonl("d.jsonl", docs(40))
    allseq = seqs_of(make_dm(data, tiny_tok, val_split=0.0), "train")
    n = len(allseq)
    splits = {}
    for seed in (0, 0, 1, 2):
        dm = make_dm(data, tiny_tok, val_split=0.25, seed=seed)
        train, val = seqs_of(dm, "train"), seqs_of(dm, "val")
        assert len(val) == round(0.25 * n) and len(train) + len(val) == n
        # whole sequences of the one stream, none in both splits, each split in stream order
        pos = {tuple(s): i for i, s in enumerate(allseq)}
        tpos, vpos = [pos[tuple(s)] for s in train], [pos[tuple(s)] for s in val]
        assert sorted(tpos + vpos) == list(range(n))
        assert tpos == sorted(tpos) and vpos == sorted(vpos)
        assert [e["sample_idx"] for e in dm._examples("val")] == list(range(len(val)))
        assert dm.data_info["val_from_split"] == len(val) == dm.stats["val_samples"]
        assert dm.stats["data_sequences"] == n and "val_data_tokens" not in dm.stats
        splits.setdefault(seed, []).append(vpos)
    assert splits[0][0] == splits[0][1]  # same seed, same split
    assert splits[1][0] != splits[0][0] or splits[2][0] != splits[0][0]  # the seed does move it


def test_small_val_split_keeps_one_sequence(tiny_tok, write_jsonl):
    dm = make_dm(write_jsonl("d.jsonl", docs(12)), tiny_tok, val_split=0.001)
    assert len(dm._examples("val")) == 1


def test_val_data_is_packed_on_its_own(tiny_tok, write_jsonl):
    train_rows, val_rows = docs(16), docs(6, seed=1)
    dm = make_dm(write_jsonl("t.jsonl", train_rows), tiny_tok, val_data=write_jsonl("v.jsonl", val_rows), val_split=0.5)
    assert seqs_of(dm, "train") == expected_sequences(tiny_tok, train_rows, SEQ)
    assert seqs_of(dm, "val") == expected_sequences(tiny_tok, val_rows, SEQ)
    assert dm.stats["val_data_documents"] == 6 and dm.stats["val_samples"] == len(seqs_of(dm, "val"))
    assert dm.stats["dropped_tokens"] == dm.stats["data_dropped_tokens"] + dm.stats["val_data_dropped_tokens"]
    batch = next(iter(dm.val_dataloader()))
    assert batch["sample_idx"].tolist() == [0] and torch.equal(batch["labels"], batch["input_ids"])


def test_max_samples_keep_split_indices(tiny_tok, write_jsonl):
    data = write_jsonl("d.jsonl", docs(24))
    full = make_dm(data, tiny_tok, val_split=0.2, seed=3)
    dm = make_dm(data, tiny_tok, val_split=0.2, seed=3, max_train_samples=4, max_val_samples=1)
    ex = dm._examples("train")
    assert len(ex) == 4 == dm.stats["train_samples"] and dm.stats["train_sequences"] > 4
    idx = [e["sample_idx"] for e in ex]
    assert idx == sorted(set(idx))
    # sample_idx still names the sequence's index in the whole split
    assert [e["input_ids"].tolist() for e in ex] == [seqs_of(full, "train")[i] for i in idx]
    assert len(dm._examples("val")) == 1


# --------------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------------


def test_too_little_text_says_how_many_tokens(tiny_tok, write_jsonl):
    rows = docs(2)
    data = write_jsonl("s.jsonl", rows)
    n = sum(len(s) for s in expected_sequences(tiny_tok, rows, 1))  # every token of the stream
    with pytest.raises(ValueError, match=rf"{n} tokens.*seq_len={n + 1}"):
        make_dm(data, tiny_tok, seq_len=n + 1, val_split=0.0)
    # one sequence only: a validation split would leave no training data
    with pytest.raises(ValueError, match=r"val_split=0.5 leaves no training sequences out of 1"):
        make_dm(data, tiny_tok, seq_len=n, val_split=0.5)


def test_missing_text_key_names_row_and_keys(tiny_tok, write_jsonl):
    rows = docs(4)
    rows[2] = {"body": "x", "label": 1}
    with pytest.raises(ValueError, match=r"row 2: missing key 'text'; keys found: \['body', 'label'\]"):
        make_dm(write_jsonl("m.jsonl", rows), tiny_tok)
    rows[2] = {"text": 5}
    with pytest.raises(ValueError, match=r"row 2: 'text' must be a string, got 5"):
        make_dm(write_jsonl("m.jsonl", rows), tiny_tok)


@pytest.mark.parametrize(
    "kw, msg",
    [
        (dict(seq_len=1), r"seq_len must be an integer >= 2, got 1"),
        (dict(seq_len="4096"), r"seq_len must be an integer >= 2, got '4096'"),
        (dict(val_split=1.0), r"val_split must be a float in \[0, 1\), got 1.0"),
        (dict(text_key=""), r"text_key must be a non-empty string, got ''"),
        (dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
        (dict(max_train_samples=0), r"max_train_samples must be an integer >= 1 or None, got 0"),
        (dict(data=""), r"data must be a non-empty path or asset name, got ''"),
    ],
)
def test_bad_arguments(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PackedTextDataModule(**kw)


def test_defaults_follow_the_brief():
    dm = PackedTextDataModule()
    assert (dm.data, dm.val_data, dm.val_split, dm.tokenizer_name) == ("bbcnews", None, 0.05, "smollm2-135m-instruct")
    assert (dm.seq_len, dm.text_key, dm.batch_size, dm.eval_batch_size, dm.seed) == (4096, "text", 1, 1, 0)


# --------------------------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------------------------


def test_one_trainer_step_of_causal_lm(tiny_tok, write_jsonl):
    from lit_ft.modules import CausalLMModule

    torch.manual_seed(0)
    dm = PackedTextDataModule(data=write_jsonl("d.jsonl", docs(24)), tokenizer=tiny_tok, seq_len=SEQ, batch_size=2,
                              val_split=0.2)
    module = CausalLMModule(model_config=tiny_llama_config(max_position_embeddings=SEQ), learning_rate=1e-2)
    before = [p.detach().clone() for p in module.parameters()]
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", devices=1, limit_val_batches=1,
                         num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 1
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    # every token but the last of each sequence is a target: 2 x (SEQ - 1)
    assert trainer.callback_metrics["train/tokens"].item() == 2 * (SEQ - 1)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert torch.isfinite(torch.tensor(metrics["val/loss"]))
