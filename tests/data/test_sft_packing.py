"""SFT packing (padding-free): the packed batch holds the unpacked batch's tokens, each example attends only to
itself (same per-token loss as alone, at lit_ft's level 3 and through a plain ``model(**batch)``), and resume and the
batch order are those of the unpacked loader."""

from __future__ import annotations

import pytest
import torch

from lit_ft.data import SFTDataModule
from lit_ft.data.packing import collate_packed, pack_rows
from lit_ft.modules import CausalLMModule
from lit_ft.testing import write_tiny_sft_jsonl
from tests.helpers import quiet_trainer, tiny_config

IGNORE = -100


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows([5, 3, 4, 2, 6], capacity=8)
    assert rows == [[4, 3], [0, 1], [2]]  # 6+2, 5+3, 4
    assert sorted(i for r in rows for i in r) == list(range(5))
    with pytest.raises(ValueError, match="example 1 has 9 tokens; packing needs 1..8"):
        pack_rows([3, 9], capacity=8)


def test_collate_packed_layout():
    ex = [{"input_ids": [11, 12, 13], "labels": [IGNORE, 12, 13], "sample_idx": 7},
          {"input_ids": [21, 22], "labels": [21, 22], "sample_idx": 9}]
    b = collate_packed(ex, capacity=6, pad_id=0)
    assert set(b) == {"input_ids", "labels", "position_ids", "packed_sample_idx"}  # no attention_mask
    assert b["input_ids"].tolist() == [[11, 12, 13, 21, 22]]
    assert b["labels"].tolist() == [[IGNORE, 12, 13, IGNORE, 22]]  # each example's first token is no target
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert b["packed_sample_idx"].tolist() == [[7, 7, 7, 9, 9]]
    two = collate_packed(ex, capacity=4, pad_id=0)  # no room for both: two rows, the short one padded
    assert two["input_ids"].tolist() == [[11, 12, 13], [21, 22, 0]]
    assert two["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]  # the pad tail is its own block
    assert two["labels"][1].tolist() == [IGNORE, 22, IGNORE] and two["packed_sample_idx"][1].tolist() == [9, 9, -1]


@pytest.fixture
def data(tmp_path):
    return write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=12)


def _dm(data, tok, packing):
    dm = SFTDataModule(data=data, tokenizer=tok, val_split=0.0, batch_size=4, max_length=256, packing=packing)
    dm.setup()
    return dm


def test_packed_batches_hold_the_unpacked_tokens(data, tiny_tok):
    plain, packed = _dm(data, tiny_tok, False), _dm(data, tiny_tok, True)
    for a, b in zip(plain.train_dataloader(), packed.train_dataloader()):
        assert "attention_mask" not in b and b["input_ids"].shape[0] < a["input_ids"].shape[0]  # fewer rows
        for s in a["sample_idx"].tolist():
            row = a["sample_idx"].tolist().index(s)
            n = int(a["attention_mask"][row].sum())
            where = b["packed_sample_idx"] == s
            assert int(where.sum()) == n
            assert b["input_ids"][where].tolist() == a["input_ids"][row, :n].tolist()
            want = a["labels"][row, :n].clone()
            want[0] = IGNORE
            assert b["labels"][where].tolist() == want.tolist()
    assert not [b for b in packed.val_dataloader() if "position_ids" in b]  # validation stays unpacked


def _per_example_loss_sum(model, plain_batch):
    """Summed next-token NLL of each example alone (first label ignored as packing does)."""
    total, count = 0.0, 0
    for row in range(plain_batch["input_ids"].shape[0]):
        n = int(plain_batch["attention_mask"][row].sum())
        ids = plain_batch["input_ids"][row: row + 1, :n]
        labels = plain_batch["labels"][row: row + 1, :n].clone()
        labels[0, 0] = IGNORE
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=IGNORE, reduction="sum")
        total += float(nll)
        count += int((labels[0, 1:] != IGNORE).sum())
    return total / count


def test_packed_loss_equals_each_example_alone(data, tiny_tok, tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    plain, packed = _dm(data, tiny_tok, False), _dm(data, tiny_tok, True)
    a, b = next(iter(plain.train_dataloader())), next(iter(packed.train_dataloader()))
    module.eval()
    with torch.no_grad():
        want = _per_example_loss_sum(module.model, a)
        level3 = module.compute_token_loss(b, module.causal_lm).mean  # lit_ft's loss: use_cache=False
        torch.testing.assert_close(float(level3), want, rtol=1e-5, atol=1e-5)
        # a plain model(**batch) needs config.use_cache off: the data module's setup does that under a trainer
        leaky = float(module.model(**{k: b[k] for k in ("input_ids", "labels", "position_ids")}).loss)
        assert abs(leaky - want) > 1e-4  # with a KV cache the examples attend to each other
        quiet_trainer([], max_steps=0, default_root_dir=str(tmp_path)).fit(module, datamodule=packed)
        assert module.model.config.use_cache is False
        plain_forward = float(module.model(**{k: b[k] for k in ("input_ids", "labels", "position_ids")}).loss)
        torch.testing.assert_close(plain_forward, want, rtol=1e-5, atol=1e-5)


def test_packing_argument_checked(data, tiny_tok):
    with pytest.raises(ValueError, match="packing must be True or False, got 'yes'"):
        SFTDataModule(data=data, tokenizer=tiny_tok, packing="yes")


def test_refuse_packed_names_the_technique_and_the_reason():
    from lit_ft.core.batch import is_packed, refuse_packed

    packed = collate_packed([{"input_ids": [1, 2], "labels": [1, 2], "sample_idx": 0}], capacity=4, pad_id=0)
    assert is_packed(packed) and not is_packed({"input_ids": packed["input_ids"]})
    refuse_packed({"input_ids": packed["input_ids"]}, "X", "why")  # unpacked: nothing happens
    with pytest.raises(ValueError, match=r"QTuning does not accept packed batches .*: it keeps whole rows"):
        refuse_packed(packed, "QTuning", "it keeps whole rows")


@pytest.mark.parametrize("make", ["QTuning", "SSToken", "TokenElimination"])
def test_row_as_sample_techniques_refuse_packed_batches(data, tiny_tok, tmp_path, make):
    import lit_ft.callbacks as cbs

    module = CausalLMModule(model_config=tiny_config())
    cb = getattr(cbs, make)(**({"min_seq_len": 1, "dense_layers": 0} if make == "TokenElimination" else {}))
    packed = SFTDataModule(data=data, tokenizer=tiny_tok, val_split=0.0, batch_size=4, max_length=256, packing=True)
    with pytest.raises(ValueError, match=f"{make} does not accept packed batches"):
        quiet_trainer([cb], max_steps=1, default_root_dir=str(tmp_path)).fit(module, datamodule=packed)


def test_prompt_techniques_refuse_packed_batches(data, tiny_tok, tmp_path):
    from lit_ft.callbacks import PromptTuning
    from lit_ft.core.prompts import PromptError

    module = CausalLMModule(model_config=tiny_config())
    packed = SFTDataModule(data=data, tokenizer=tiny_tok, val_split=0.0, batch_size=4, max_length=256, packing=True)
    with pytest.raises(PromptError, match="prompt techniques do not accept packed batches"):
        quiet_trainer([PromptTuning(num_virtual_tokens=2)], max_steps=1,
                      default_root_dir=str(tmp_path)).fit(module, datamodule=packed)
