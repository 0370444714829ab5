"""PreferenceDataModule: the pair batch contract, completion-only labels on each side (multi-turn prompts included),
the LLaMA-Factory JSON form, datasets objects, a seeded validation split, drops and bad rows."""

from __future__ import annotations

import json

import pytest
import torch

from lit_ft.data import DataWarning, PreferenceDataModule
from lit_ft.testing import write_tiny_preference_jsonl

KEYS = {"chosen_input_ids", "chosen_attention_mask", "chosen_labels", "rejected_input_ids",
        "rejected_attention_mask", "rejected_labels", "sample_idx"}


def make_dm(data, tok, **kw):
    kw.setdefault("max_length", 256)
    dm = PreferenceDataModule(data=data, tokenizer=tok, **kw)
    dm.setup()
    return dm


def labelled_text(tok, batch, side, row):
    lab = batch[f"{side}_labels"][row]
    return tok.decode(lab[lab != -100])


def test_jsonl_pairs_give_the_batch_contract_with_response_only_labels(tiny_tok, tmp_path):
    path = write_tiny_preference_jsonl(tmp_path / "p.jsonl", n=11)
    rows = [json.loads(line) for line in open(path)]
    val_path = write_tiny_preference_jsonl(tmp_path / "v.jsonl", n=2, seed=1)
    dm = make_dm(path, tiny_tok, val_data=val_path, batch_size=3)
    tok = dm.tokenizer
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == KEYS
        shapes = {tuple(batch[k].shape) for k in KEYS - {"sample_idx"}}
        assert len(shapes) == 1  # both sides padded to one width
        for row, idx in enumerate(batch["sample_idx"].tolist()):
            seen.append(idx)
            for side in ("chosen", "rejected"):
                ids, mask, lab = (batch[f"{side}_{k}"][row] for k in ("input_ids", "attention_mask", "labels"))
                n = int(mask.sum())
                assert mask[:n].eq(1).all() and lab[n:].eq(-100).all()
                vis = lab != -100
                assert torch.equal(lab[vis], ids[vis])
                assert labelled_text(tok, batch, side, row) == rows[idx][side] + "<|im_end|>"
                first = int(vis.nonzero()[0])
                assert rows[idx]["prompt"] in tok.decode(ids[:first])
            c, r = batch["chosen_input_ids"][row], batch["rejected_input_ids"][row]
            first = int((batch["chosen_labels"][row] != -100).nonzero()[0])
            assert torch.equal(c[:first], r[:first])  # the same prompt: positions line up
    assert sorted(seen) == list(range(11))  # sample_idx: the pair's index in its split
    assert [int(i) for b in dm.val_dataloader() for i in b["sample_idx"]] == [0, 1]


def test_the_validation_split_is_seeded(tiny_tok, tmp_path):
    path = write_tiny_preference_jsonl(tmp_path / "p.jsonl", n=20)

    def val_prompts(seed):
        dm = make_dm(path, tiny_tok, val_split=0.2, seed=seed)
        return [dm.tokenizer.decode(b["chosen_input_ids"][i]) for b in dm.val_dataloader() for i in range(len(b["sample_idx"]))]

    first = val_prompts(0)
    assert len(first) == 4 and val_prompts(0) == first and val_prompts(1) != first


def test_llama_factory_conversations_label_only_the_final_response(tiny_tok, tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "two plus two"},
                               {"from": "gpt", "value": "four"}, {"from": "human", "value": "and times three"}],
             "chosen": {"from": "gpt", "value": "twelve"}, "rejected": {"from": "gpt", "value": "seven"}},
            {"conversations": [{"from": "human", "value": "name a fruit"}],
             "chosen": {"from": "gpt", "value": "apple"}, "rejected": {"from": "gpt", "value": "car"}}]
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(rows))
    dm = make_dm(str(path), tiny_tok, val_split=0.0, batch_size=2, bucket_by_length=False)
    (batch,) = list(dm.train_dataloader())
    tok = dm.tokenizer
    for row, idx in enumerate(batch["sample_idx"].tolist()):
        for side in ("chosen", "rejected"):
            assert labelled_text(tok, batch, side, row) == rows[idx][side]["value"] + "<|im_end|>"
        ids = batch["chosen_input_ids"][row]
        if idx == 0:
            text = tok.decode(ids[batch["chosen_attention_mask"][row].bool()])
            assert "four" in text and "be brief" in text  # the earlier turns are context


def test_a_datasets_object_and_renamed_columns(tiny_tok):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"q": f"say {i}", "good": f"{i}", "bad": f"{i + 1}"} for i in range(6)])
    dm = make_dm(ds, tiny_tok, val_split=0.0, batch_size=6, prompt_key="q", chosen_key="good",
                 rejected_key="bad")
    (batch,) = list(dm.train_dataloader())
    for row, idx in enumerate(batch["sample_idx"].tolist()):
        assert labelled_text(dm.tokenizer, batch, "rejected", row) == f"{idx + 1}<|im_end|>"


def test_a_pair_whose_response_is_cut_away_is_dropped_and_counted(tiny_tok, tmp_path):
    rows = [{"prompt": "word " * 40, "chosen": "yes", "rejected": "no"}, {"prompt": "hi", "chosen": "a", "rejected": "b"}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.warns(DataWarning, match=r"PreferenceDataModule \(pairs\).*dropped 1"):
        dm = make_dm(str(path), tiny_tok, val_split=0.0, max_length=30, min_prompt_length=30)
    assert dm.stats["train_dropped_samples"] == 1 and dm.stats["train_samples"] == 1


@pytest.mark.parametrize("row, match", [
    ({"prompt": "a", "chosen": "b"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "b", "rejected": "c"}, "no prompt"),
    ({"conversations": [{"from": "robot", "value": "x"}], "chosen": "b", "rejected": "c"}, "unknown speaker 'robot'"),
    ({"prompt": "a", "chosen": 3, "rejected": "c"}, "a response must be a string"),
])
def test_bad_rows_are_named(tiny_tok, tmp_path, row, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}))
    with pytest.raises(ValueError, match=match):
        make_dm(str(path), tiny_tok, val_split=0.0)


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="chosen_key"):
        PreferenceDataModule(chosen_key="")
    with pytest.raises(ValueError, match="must differ"):
        PreferenceDataModule(chosen_key="rejected")
