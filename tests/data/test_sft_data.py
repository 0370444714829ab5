"""SFTDataModule: completion-only labels, truncation accounting, bucketed sampler, generation batches, bad input."""

from __future__ import annotations

import json
import random
import warnings

import pytest
import torch
from torch.utils.data import BatchSampler

from lit_ft.data import DataWarning, LengthGroupedSampler, ResumableBatchSampler, SFTDataModule
from lit_ft.testing import write_tiny_sft_jsonl

EOS = "<|im_end|>"


def read(path):
    return [json.loads(line) for line in open(path)]


def make_dm(data, tok, **kw):
    kw.setdefault("max_length", 256)
    dm = SFTDataModule(data=data, tokenizer=tok, **kw)
    dm.setup()
    return dm


def check_row(tok, input_ids, attention_mask, labels, expect_prompt, expect_completion):
    """One row of a batch: right padding, prompt all -100, labels == ids on the completion, exact decode."""
    n = int(attention_mask.sum())
    assert attention_mask[:n].eq(1).all() and attention_mask[n:].eq(0).all()
    assert input_ids[n:].eq(tok.pad_token_id).all()
    assert labels[n:].eq(-100).all()
    ids, lab = input_ids[:n], labels[:n]
    vis = lab.ne(-100)
    assert torch.equal(lab[vis], ids[vis])
    first = int(vis.nonzero()[0])
    assert lab[:first].eq(-100).all()
    assert tok.decode(ids[:first]) == expect_prompt
    assert tok.decode(lab[vis]) == expect_completion
    return first


# --------------------------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------------------------


def test_plain_rows_completion_only_labels(tiny_tok, tmp_path):
    data = write_tiny_sft_jsonl(tmp_path / "train.jsonl", n=23)
    val = write_tiny_sft_jsonl(tmp_path / "val.jsonl", n=5, seed=1)
    rows = read(data)
    dm = make_dm(data, tiny_tok, val_data=val, use_chat_template=False, batch_size=4)
    assert dm.chat is False
    tok = dm.tokenizer
    seen = []
    for batch in dm.train_dataloader():
        assert set(batch) == {"input_ids", "attention_mask", "labels", "sample_idx"}
        assert all(v.dtype == torch.long for v in batch.values())
        assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
        for b in range(len(batch["sample_idx"])):
            i = int(batch["sample_idx"][b])
            seen.append(i)
            first = check_row(
                tok, batch["input_ids"][b], batch["attention_mask"][b], batch["labels"][b],
                rows[i]["prompt"], " " + rows[i]["completion"] + EOS,
            )
            # the completion continues the prompt with no unlabelled token in between, and ends in eos
            n = int(batch["attention_mask"][b].sum())
            assert batch["labels"][b][first:n].ne(-100).all()
            assert int(batch["labels"][b][n - 1]) == tok.eos_token_id
    assert sorted(seen) == list(range(23))
    vrows = read(val)
    vb = next(iter(dm.val_dataloader()))
    assert vb["sample_idx"].tolist() == [0, 1, 2, 3]  # validation: unshuffled
    check_row(tok, vb["input_ids"][1], vb["attention_mask"][1], vb["labels"][1], vrows[1]["prompt"],
              " " + vrows[1]["completion"] + EOS)


@pytest.mark.parametrize("chat_rows", [True, False])
def test_chat_template_labels(tiny_tok, tmp_path, chat_rows):
    data = write_tiny_sft_jsonl(tmp_path / "train.jsonl", n=10, chat=chat_rows)
    rows = read(data)
    dm = make_dm(data, tiny_tok, val_split=0.0, batch_size=3)  # use_chat_template=None -> template is used
    assert dm.chat is True
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    for b in range(3):
        r = rows[int(batch["sample_idx"][b])]
        msgs = r["messages"] if chat_rows else [
            {"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
        check_row(tok, batch["input_ids"][b], batch["attention_mask"][b], batch["labels"][b], prompt,
                  msgs[-1]["content"] + EOS)
        # the template's newline after <|im_end|> is input but not a label
        n = int(batch["attention_mask"][b].sum())
        assert tok.decode(batch["input_ids"][b][n - 1 : n]) == "\n" and int(batch["labels"][b][n - 1]) == -100
    assert dm.val_dataloader() == []  # val_split=0 -> no validation


def test_multi_turn_labels_every_assistant_turn_and_system_prompt(tiny_tok, write_jsonl):
    msgs = [
        {"role": "user", "content": "Tom has 3 apples."},
        {"role": "assistant", "content": "Ok, 3 apples."},
        {"role": "user", "content": "He buys 2 more. How many?"},
        {"role": "assistant", "content": "The answer is 5."},
    ]
    data = write_jsonl("chat.jsonl", [{"messages": msgs, "answer": "5"}] * 3)
    dm = make_dm(data, tiny_tok, val_split=0.0, system_prompt="Be brief.", batch_size=3)
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    ids, lab = batch["input_ids"][0], batch["labels"][0]
    full = [{"role": "system", "content": "Be brief."}, *msgs]
    assert tok.decode(ids) == tok.apply_chat_template(full, tokenize=False)
    # labelled runs = exactly the two assistant turns (+ eos each)
    vis = lab.ne(-100).tolist()
    runs, cur = [], []
    for j, v in enumerate(vis):
        if v:
            cur.append(int(lab[j]))
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["Ok, 3 apples." + EOS, "The answer is 5." + EOS]
    g = next(dm.generation_batches(split="train", batch_size=1))
    expect = tok.apply_chat_template(full[:-1], tokenize=False, add_generation_prompt=True)
    assert tok.decode(g["input_ids"][0]) == expect and g["answers"] == ["5"]


def test_tokenizer_without_pad_or_template_uses_eos_and_plain_format(tiny_tok_no_template, tmp_path):
    data = write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=8)
    dm = make_dm(data, tiny_tok_no_template, val_split=0.25)
    assert dm.chat is False
    assert dm.tokenizer.pad_token_id == dm.tokenizer.eos_token_id
    assert dm.stats["train_samples"] == 6 and dm.stats["val_samples"] == 2
    with pytest.raises(ValueError, match="no chat template"):
        make_dm(data, tiny_tok_no_template, use_chat_template=True)


# --------------------------------------------------------------------------------------------------------------
# truncation
# --------------------------------------------------------------------------------------------------------------


def test_truncation_counted_and_warned(tiny_tok, write_jsonl):
    long_prompt = "Tom has " + "apples and oranges and books " * 40 + "How many?"
    rows = [
        {"prompt": "Ann has 3 pens. How many pens?", "completion": "The answer is 3."},
        {"prompt": long_prompt, "completion": "The answer is 7."},
        {"prompt": "Sam has 2 cars.", "completion": "one two three four five six seven eight nine ten " * 20},
    ]
    data = write_jsonl("t.jsonl", rows)
    with pytest.warns(DataWarning, match=r"truncated 2 samples"):
        dm = make_dm(data, tiny_tok, val_split=0.0, use_chat_template=False, max_length=48, bucket_by_length=False)
    tok = dm.tokenizer
    st = dm.stats
    assert st["train_truncated_samples"] == st["truncated_samples"] == 2
    assert st["truncated_tokens"] > 0 and st["dropped_samples"] == 0 and st["train_samples"] == 3
    ex = {e["sample_idx"]: e for e in dm._examples("train")}
    assert all(len(e["input_ids"]) <= 48 for e in ex.values())
    # long prompt: cut from the left, the completion is untouched
    lab = [t for t in ex[1]["labels"] if t != -100]
    assert tok.decode(lab) == " The answer is 7." + EOS and len(ex[1]["input_ids"]) == 48
    assert tok.decode(ex[1]["input_ids"]).endswith("How many? The answer is 7." + EOS)
    # long completion: the prompt is cut away first, then the completion from the right (no eos at the end)
    assert all(t != -100 for t in ex[2]["labels"]) and ex[2]["labels"][-1] != tok.eos_token_id
    # the short row is untouched
    assert tok.decode(ex[0]["input_ids"]) == rows[0]["prompt"] + " " + rows[0]["completion"] + EOS

    # a prompt kept whole (min_prompt_length) leaves no room for the completion -> dropped and counted
    with pytest.warns(DataWarning, match=r"dropped 1"):
        dm2 = make_dm(data, tiny_tok, val_split=0.0, use_chat_template=False, max_length=48, min_prompt_length=48)
    assert dm2.stats["dropped_samples"] == dm2.stats["train_dropped_samples"] == 1
    assert dm2.stats["train_samples"] == 2
    assert sorted(int(i) for b in dm2.train_dataloader() for i in b["sample_idx"]) == [0, 2]


def test_no_warning_without_truncation(tiny_tok, tmp_path):
    data = write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataWarning)
        dm = make_dm(data, tiny_tok, max_length=512)
    assert dm.stats["truncated_samples"] == 0 and dm.stats["dropped_samples"] == 0


# --------------------------------------------------------------------------------------------------------------
# sampler
# --------------------------------------------------------------------------------------------------------------


def _spread(batches, lengths):
    return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches) / len(batches)


def test_bucketed_sampler_every_index_once_deterministic_homogeneous():
    rng = random.Random(0)
    lengths = [rng.randint(5, 500) for _ in range(203)]
    s = LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_mult=10)
    orders = {}
    for epoch in (0, 1):
        s.set_epoch(epoch)
        orders[epoch] = list(s)
        assert sorted(orders[epoch]) == list(range(203))
    assert orders[0] != orders[1]
    s2 = LengthGroupedSampler(lengths, batch_size=8, seed=3, mega_batch_mult=10)
    s2.set_epoch(1)
    assert list(s2) == orders[1]  # deterministic for (seed, epoch)
    s2.set_epoch(1)
    batches = list(BatchSampler(s2, 8, drop_last=False))
    assert batches == s2.batches(1)  # the BatchSampler reproduces the sampler's batches; partial batch last
    assert all(len(b) == 8 for b in batches[:-1]) and len(batches[-1]) == 203 % 8
    rand = LengthGroupedSampler(lengths, batch_size=8, seed=3, group_by_length=False)
    assert _spread(s2.batches(1), lengths) < 0.25 * _spread(rand.batches(1), lengths)
    # without set_epoch the epoch advances at each new iteration
    s3 = LengthGroupedSampler(lengths, batch_size=8, seed=3)
    a, b = list(s3), list(s3)
    assert a != b and s3.epoch == 1
    # DDP: global batches of batch_size * replicas, interleaved per rank, stay homogeneous
    sd = LengthGroupedSampler(lengths, batch_size=4, seed=3, num_replicas=2)
    flat = list(sd)
    rank0 = [flat[i] for i in range(0, len(flat), 2)]
    r0_batches = [rank0[i : i + 4] for i in range(0, len(rank0) - 4, 4)]
    assert _spread(r0_batches, lengths) < 0.25 * _spread(rand.batches(1), lengths)


def test_sampler_state_resume_skips_done_batches():
    lengths = list(range(50))
    s = LengthGroupedSampler(lengths, batch_size=4, seed=1)
    s.set_epoch(2)
    full = list(BatchSampler(s, 4, drop_last=False))
    r = ResumableBatchSampler(LengthGroupedSampler(lengths, batch_size=4, seed=1), 4)
    r.load_state_dict({"epoch": 2, "seed": 1, "batches_done": 5})
    r.sampler.set_epoch(2)  # what Lightning does on resume
    assert list(r) == full[5:]
    assert r.state_dict() == {"epoch": 2, "seed": 1, "batches_done": len(full)}
    r.sampler.set_epoch(3)  # the skip applied once; the next epoch is complete
    assert len(list(r)) == len(full)
    with pytest.raises(ValueError, match="seed"):
        r.load_state_dict({"epoch": 2, "seed": 7, "batches_done": 1})


def test_resume_under_distributed_wrapper():
    """DDP: Lightning re-creates the batch sampler around DistributedSamplerWrapper(our sampler) and sets the
    wrapper's epoch; the skip applies per rank and the epoch reaches our sampler."""
    from lightning.fabric.utilities.distributed import DistributedSamplerWrapper

    lengths = [(i * 37) % 101 for i in range(70)]

    def rank_batches(rank, state=None, epoch=1):
        inner = LengthGroupedSampler(lengths, batch_size=4, seed=2, num_replicas=2)
        bs = ResumableBatchSampler(DistributedSamplerWrapper(inner, num_replicas=2, rank=rank, shuffle=False), 4)
        if state:
            bs.load_state_dict(state)
        bs.sampler.set_epoch(epoch)
        return list(bs), inner

    for rank in (0, 1):
        full, inner = rank_batches(rank)
        assert inner.epoch == 1
        resumed, _ = rank_batches(rank, {"epoch": 1, "seed": 2, "batches_done": 3})
        assert resumed == full[3:]
    r0, r1 = rank_batches(0)[0], rank_batches(1)[0]
    assert sorted(sum(r0 + r1, [])) == list(range(70))


def test_datamodule_epoch_order_and_state_dict(tiny_tok, tmp_path):
    data = write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=40)
    dm = make_dm(data, tiny_tok, val_split=0.0, batch_size=4, seed=5)
    dl = dm.train_dataloader()
    dl.batch_sampler.sampler.set_epoch(1)
    assert isinstance(dl.batch_sampler, ResumableBatchSampler)
    order1 = [b["sample_idx"].tolist() for b in dl]
    dm2 = make_dm(data, tiny_tok, val_split=0.0, batch_size=4, seed=5)
    dm2.load_state_dict({"train_sampler": {"epoch": 1, "seed": 5, "batches_done": 4}})  # before the loader exists
    dl2 = dm2.train_dataloader()
    assert [b["sample_idx"].tolist() for b in dl2] == order1[4:]
    assert dm2.state_dict()["train_sampler"]["epoch"] == 1
    assert dl2.state_dict()["epoch"] == 1  # the loader is Lightning-stateful too


def test_lightning_mid_epoch_resume_reproduces_order(tiny_tok, tmp_path):
    import lightning.pytorch as pl

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen = []

        def training_step(self, batch, i):
            self.seen.append(batch["sample_idx"].tolist())
            return (self.w * batch["input_ids"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    data = write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=20)
    kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
              limit_val_batches=0, accelerator="cpu", devices=1)

    def dm():
        return SFTDataModule(data=data, tokenizer=tiny_tok, val_split=0.0, batch_size=4, max_length=128)

    full = Recorder()
    pl.Trainer(max_epochs=2, enable_checkpointing=False, **kw).fit(full, datamodule=dm())
    assert len(full.seen) == 10
    first = Recorder()
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=7, save_top_k=-1)
    pl.Trainer(max_steps=7, callbacks=[ckpt], **kw).fit(first, datamodule=dm())
    path = next((tmp_path / "ck").glob("*step=7*.ckpt"))
    rest = Recorder()
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pl.Trainer(max_epochs=2, enable_checkpointing=False, **kw).fit(rest, datamodule=dm(), ckpt_path=str(path))
    assert not [x for x in w if "not resumable" in str(x.message)]
    assert first.seen + rest.seen == full.seen


# --------------------------------------------------------------------------------------------------------------
# generation batches
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
def test_generation_batches_left_padded_with_answers(tiny_tok, tmp_path, write_jsonl, chat):
    rows = read(write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=7))
    rows[2].pop("answer")  # rows without an answer are skipped
    rows[4]["prompt"] = "Tom has 1 apple. " * 6 + "How many?"  # a longer prompt forces padding
    val = write_jsonl("val.jsonl", rows)
    data = write_tiny_sft_jsonl(tmp_path / "train.jsonl", n=4)
    dm = make_dm(data, tiny_tok, val_data=val, use_chat_template=chat, eval_batch_size=4)
    tok = dm.tokenizer
    out = list(dm.generation_batches())
    assert [len(g["answers"]) for g in out] == [4, 2]
    assert sum((g["answers"] for g in out), []) == [r["answer"] for r in rows if "answer" in r]
    assert torch.cat([g["sample_idx"] for g in out]).tolist() == [0, 1, 3, 4, 5, 6]
    g = out[0]
    assert set(g) == {"input_ids", "attention_mask", "answers", "sample_idx"}
    for b, i in enumerate(g["sample_idx"].tolist()):
        m = g["attention_mask"][b]
        n = int(m.sum())
        width = m.shape[0]
        assert m[: width - n].eq(0).all() and m[width - n :].eq(1).all()  # left padding
        assert g["input_ids"][b][: width - n].eq(tok.pad_token_id).all()
        text = tok.decode(g["input_ids"][b][width - n :])
        if chat:
            expect = tok.apply_chat_template([{"role": "user", "content": rows[i]["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
        else:
            expect = rows[i]["prompt"]
        assert text == expect
    assert int(g["attention_mask"][3].sum()) == g["attention_mask"].shape[1]  # the long prompt: no padding
    assert [len(x["answers"]) for x in dm.generation_batches(limit=3, batch_size=2)] == [2, 1]


# --------------------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------------------


def test_missing_file_and_unknown_name(tiny_tok, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data='.*nope\.jsonl'.*Known assets: .*asdiv"):
        make_dm(str(tmp_path / "nope.jsonl"), tiny_tok)
    with pytest.raises(FileNotFoundError, match=r"tokenizer='no-such-model'.*never downloads from a model hub"):
        make_dm(write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=4), "no-such-model")


def test_unknown_row_format(tiny_tok, write_jsonl):
    rows = [{"prompt": "a", "completion": "b"}] * 2 + [{"prompt": "a", "foo": 1}]
    with pytest.raises(ValueError, match=r"row 2: unknown row format, keys found: \['foo', 'prompt'\].*Accepted"):
        make_dm(write_jsonl("bad.jsonl", rows), tiny_tok, val_split=0.0)
    with pytest.raises(ValueError, match=r"row 0: 'messages' must be"):
        make_dm(write_jsonl("bad2.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}]), tiny_tok,
                val_split=0.0)
    chat = write_jsonl("chat.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": "b"}]}])
    with pytest.raises(ValueError, match="need a chat template"):
        make_dm(chat, tiny_tok, val_split=0.0, use_chat_template=False)
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        p = write_jsonl("broken.jsonl", [{"prompt": "a", "completion": "b"}])
        open(p, "a").write("{oops\n")
        make_dm(p, tiny_tok)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(batch_size=0), r"batch_size must be an integer >= 1, got 0"),
        (dict(batch_size=2.5), r"batch_size must be an integer >= 1, got 2.5"),
        (dict(val_split=1.0), r"val_split must be a float in \[0, 1\), got 1.0"),
        (dict(val_split=-0.1), r"val_split must be a float in \[0, 1\)"),
        (dict(max_length=1), r"max_length must be an integer >= 2, got 1"),
        (dict(max_length="512"), r"max_length must be an integer >= 2, got '512'"),
        (dict(eval_batch_size=0), r"eval_batch_size must be an integer >= 1 or None"),
        (dict(num_workers=-1), r"num_workers must be an integer >= 0"),
        (dict(max_train_samples=0), r"max_train_samples must be an integer >= 1 or None"),
        (dict(use_chat_template="yes"), r"use_chat_template must be True, False or None"),
        (dict(data=""), r"data must be a non-empty path or asset name"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        SFTDataModule(**kw)


def test_max_samples_and_val_split_deterministic(tiny_tok, tmp_path):
    data = write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=50)
    a = make_dm(data, tiny_tok, val_split=0.2, max_train_samples=10, max_val_samples=3, seed=1)
    b = make_dm(data, tiny_tok, val_split=0.2, max_train_samples=10, max_val_samples=3, seed=1)
    assert a.stats["train_rows"] == 40 and a.stats["val_rows"] == 10
    assert a.stats["train_samples"] == 10 and a.stats["val_samples"] == 3
    ids = [e["sample_idx"] for e in a._examples("train")]
    assert ids == [e["sample_idx"] for e in b._examples("train")] and ids == sorted(ids) and max(ids) < 40


def test_jsonargparse_reads_signature():
    from jsonargparse import ArgumentParser

    p = ArgumentParser()
    p.add_class_arguments(SFTDataModule, "data")
    cfg = p.parse_args(["--data.batch_size=3", "--data.use_chat_template=false"])
    assert cfg.data.batch_size == 3 and cfg.data.use_chat_template is False and cfg.data.data == "asdiv"
    assert "max_length" in p.format_help()


# --------------------------------------------------------------------------------------------------------------
# real assets (from the user's lit_ft cache; fetched there on first use)
# --------------------------------------------------------------------------------------------------------------


def test_lightning_ddp_sampler_injection_keeps_our_order(tiny_tok, tmp_path):
    """What Lightning does to a training loader under DDP: wrap ``loader.sampler`` and re-create the loader."""
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from lightning.pytorch.trainer.connectors.data_connector import _get_distributed_sampler
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader

    from lit_ft.data._common import ResumableDataLoader

    data = write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=30)
    dm = make_dm(data, tiny_tok, val_split=0.0, batch_size=4, seed=3)
    dl = dm.train_dataloader()
    assert isinstance(dl.sampler, LengthGroupedSampler)
    per_rank = []
    for rank in (0, 1):
        ds = _get_distributed_sampler(dl, shuffle=False, overfit_batches=0, mode=RunningStage.TRAINING,
                                      num_replicas=2, rank=rank)
        new = _update_dataloader(dl, ds, mode=RunningStage.TRAINING)
        assert isinstance(new, ResumableDataLoader) and isinstance(new.batch_sampler, ResumableBatchSampler)
        _set_sampler_epoch(new, 1)
        per_rank.append([b["sample_idx"].tolist() for b in new])
    stream = dm._train_sampler.sampler.batches(1)  # our epoch-1 order, interleaved across the two ranks
    flat = sum(stream, [])
    flat += flat[: (-len(flat)) % 2]  # DistributedSampler pads to a multiple of the world size
    assert sum(per_rank[0], []) == flat[0::2] and sum(per_rank[1], []) == flat[1::2]
    assert all(len(b) == 4 for b in per_rank[0][:-1])


@pytest.mark.slow
def test_asdiv_with_smollm2_tokenizer():
    dm = SFTDataModule(max_train_samples=64, max_val_samples=16, max_length=512, batch_size=8)
    dm.setup()
    assert dm.chat is True and dm.stats["train_rows"] > 1800 and dm.stats["val_rows"] == 200
    tok = dm.tokenizer
    batch = next(iter(dm.train_dataloader()))
    for b in range(batch["labels"].shape[0]):
        lab = batch["labels"][b]
        text = tok.decode(lab[lab.ne(-100)])
        assert text.startswith("The answer is ") and text.endswith("." + EOS)
    g = next(dm.generation_batches(batch_size=4))
    assert all(float(a) == float(a) for a in g["answers"])
    assert tok.decode(g["input_ids"][0]).endswith("<|im_start|>assistant\n")
