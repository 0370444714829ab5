import copy
import types

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import ExcessLossSelection, MaskedThought
from lit_ft.core import BatchKeyError
from lit_ft.core.loss import causal_lm_token_nll
from lit_ft.modules import CausalLMModule

from helpers import VOCAB, ListDataModule, PlainHFModule, SGDModule, random_batch, tiny_config


def _trainer(callbacks, max_steps=3, **kw):
    kw.setdefault("limit_val_batches", 0)
    return pl.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, **kw,
    )


class Recorder(pl.Callback):
    """Placed after MaskedThought: records what the training step receives (and what validation receives)."""

    def __init__(self):
        self.train, self.val = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train[trainer.global_step] = {k: v.clone() for k, v in batch.items()}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(batch["input_ids"].clone())


def _ready(cb, seed=0, mask_id=1, vocab=VOCAB):
    """A callback with its lazily resolved state filled in, for calling mask_batch directly."""
    cb._seed = seed
    cb._mask_id = mask_id
    cb._candidates = torch.arange(vocab)
    return cb


def _big_batch(n=64, t=512):
    return {
        "input_ids": torch.full((n, t), 5, dtype=torch.long),
        "labels": torch.full((n, t), 5, dtype=torch.long),
        "sample_idx": torch.arange(n),
    }


# -- arguments ---------------------------------------------------------------------------------------------------
def test_defaults():
    cb = MaskedThought()
    assert (cb.max_rate, cb.warmup_fraction, cb.mode, cb.rate_sampling) == (0.4, 0.66, "random", "fixed")
    assert cb.mask_token_id is None and cb.seed is None and cb.require_sample_idx


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, "x", True])
def test_bad_max_rate(bad):
    with pytest.raises(ValueError, match=r"`max_rate` must be a number in \[0, 1\)"):
        MaskedThought(max_rate=bad)


@pytest.mark.parametrize("bad", [-0.01, 1.01, "half"])
def test_bad_warmup_fraction(bad):
    with pytest.raises(ValueError, match=r"`warmup_fraction` must be a number in \[0, 1\]"):
        MaskedThought(warmup_fraction=bad)


def test_bad_mode_names_the_choices_and_the_value():
    with pytest.raises(ValueError, match="`mode` must be one of .*'bert'"):
        MaskedThought(mode="bert")


# -- the math ----------------------------------------------------------------------------------------------------
def test_only_response_tokens_replaced_labels_and_source_untouched():
    cb = _ready(MaskedThought(mode="mask"), mask_id=1)
    batch = random_batch(4, 16, seed=3)
    source = copy.deepcopy(batch)
    orig_ids = batch["input_ids"]
    masked = cb.mask_batch(batch, step=5, rate=0.5)
    response = source["labels"] != -100
    assert masked.any() and not (masked & ~response).any()
    changed = batch["input_ids"] != source["input_ids"]
    assert torch.equal(changed, masked)  # ids 3.. never equal the mask id 1
    assert torch.all(batch["input_ids"][masked] == 1)
    assert torch.equal(batch["labels"], source["labels"])  # labels keep the original tokens
    assert torch.equal(orig_ids, source["input_ids"]) and batch["input_ids"] is not orig_ids  # no in-place edit


@pytest.mark.parametrize("p", [0.05, 0.3, 0.4])
def test_masked_fraction_matches_rate(p):
    cb = _ready(MaskedThought(mode="mask"), seed=11)
    masked = cb.mask_batch(_big_batch(), step=7, rate=p)  # 32768 tokens: sd <= 0.003
    assert abs(masked.float().mean().item() - p) < 0.012
    # fresh noise per step, independent of the previous step: overlap ~ p^2
    again = cb.mask_batch(_big_batch(), step=8, rate=p)
    assert not torch.equal(masked, again)
    assert abs((masked & again).float().mean().item() - p * p) < 0.012
    # rows (samples) are not copies of each other, nor columns (positions)
    assert not torch.equal(masked[0], masked[1]) and not torch.equal(masked[:, 0], masked[:, 1])


def test_rate_zero_masks_nothing():
    cb = _ready(MaskedThought(mode="mask"))
    b = _big_batch(8, 64)
    assert not cb.mask_batch(b, step=3, rate=0.0).any() and torch.all(b["input_ids"] == 5)


def test_schedule_ramp_and_plateau():
    cb = MaskedThought(max_rate=0.4, warmup_fraction=0.66)
    assert cb.scheduled_rate(0, 100) == 0.0
    assert cb.scheduled_rate(33, 100) == pytest.approx(0.2)
    assert cb.scheduled_rate(66, 100) == pytest.approx(0.4)
    assert cb.scheduled_rate(99, 100) == pytest.approx(0.4)
    assert MaskedThought(max_rate=0.2, warmup_fraction=0.0).scheduled_rate(0, 100) == pytest.approx(0.2)
    assert MaskedThought(max_rate=0.2, warmup_fraction=1.0).scheduled_rate(25, 100) == pytest.approx(0.05)


def test_uniform_rate_sampling_draws_below_the_schedule():
    cb = MaskedThought(max_rate=0.4, warmup_fraction=0.0, rate_sampling="uniform")
    cb._seed = 3
    rates = torch.tensor([cb.rate_at(s, 1000) for s in range(1000)])
    assert rates.min() >= 0 and rates.max() < 0.4
    assert abs(rates.mean().item() - 0.2) < 0.015  # U(0, 0.4)
    assert cb.rate_at(17, 1000) == cb.rate_at(17, 1000)  # one value per step (same on every rank)
    fixed = MaskedThought(max_rate=0.4, warmup_fraction=0.0)
    fixed._seed = 3
    assert fixed.rate_at(17, 1000) == 0.4


def test_random_mode_draws_uniform_vocabulary_tokens():
    cb = _ready(MaskedThought(mode="random"), vocab=VOCAB)
    b = _big_batch(32, 256)
    masked = cb.mask_batch(b, step=2, rate=0.4)
    drawn = b["input_ids"][masked]
    assert drawn.min() >= 0 and drawn.max() < VOCAB
    counts = torch.bincount(drawn, minlength=VOCAB).float()
    assert (counts > 0).float().mean() > 0.99  # ~8.5 draws per id: nearly all ids appear
    assert counts.std() / counts.mean() < 0.5  # and roughly evenly
    assert torch.all(b["input_ids"][~masked] == 5)


def test_exclude_special_tokens_in_random_mode():
    module = PlainHFModule()
    tok = types.SimpleNamespace(all_special_ids=[0, 3])
    trainer = types.SimpleNamespace(datamodule=types.SimpleNamespace(tokenizer=tok))
    cb = MaskedThought(mode="random", exclude_special_tokens=True)
    cand = cb._resolve_candidates(trainer, module)
    cfg = module.model.config  # bos 1, eos 2
    assert cand.numel() == VOCAB - 4 and not any(i in cand.tolist() for i in (0, 1, 2, 3))
    assert MaskedThought(mode="random")._resolve_candidates(trainer, module).numel() == VOCAB
    assert cfg.vocab_size == VOCAB


def test_mask_id_defaults(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    module = PlainHFModule()
    tr = lambda tok: types.SimpleNamespace(datamodule=types.SimpleNamespace(tokenizer=tok))  # noqa: E731
    cb = MaskedThought(mode="mask")
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)  # no unk: pad (= <|im_end|>)
    assert tok.unk_token_id is None and cb._resolve_mask_id(tr(tok), module) == tok.pad_token_id
    assert cb._resolve_mask_id(tr(types.SimpleNamespace(unk_token_id=9, pad_token_id=7)), module) == 9
    assert cb._resolve_mask_id(tr(types.SimpleNamespace(unk_token_id=None, pad_token_id=None, eos_token_id=4)), module) == 4
    assert MaskedThought(mode="mask", mask_token_id=42)._resolve_mask_id(tr(None), module) == 42
    with pytest.raises(ValueError, match="no mask token id. Set mask_token_id"):
        cb._resolve_mask_id(tr(None), module)  # tiny config has no pad_token_id
    module.model.config.pad_token_id = 6
    assert cb._resolve_mask_id(tr(None), module) == 6


def test_masks_do_not_depend_on_batch_layout_or_padding():
    cb = _ready(MaskedThought(mode="mask"), seed=5)
    full = random_batch(8, 16, seed=2)
    m_full = cb.mask_batch(dict(full), step=4, rate=0.4)
    halves = [cb.mask_batch({k: v[i : i + 4] for k, v in full.items()}, step=4, rate=0.4) for i in (0, 4)]
    assert torch.equal(torch.cat(halves), m_full)
    shuffled = torch.tensor([3, 0, 7, 1])  # any subset, any order: each sample keeps its own mask
    m_sub = cb.mask_batch({k: v[shuffled] for k, v in full.items()}, step=4, rate=0.4)
    assert torch.equal(m_sub, m_full[shuffled])
    padded = {k: v for k, v in full.items()}
    padded["input_ids"] = torch.cat([full["input_ids"], torch.zeros(8, 5, dtype=torch.long)], 1)
    padded["labels"] = torch.cat([full["labels"], torch.full((8, 5), -100)], 1)
    assert torch.equal(cb.mask_batch(padded, step=4, rate=0.4)[:, :16], m_full)
    other_seed = _ready(MaskedThought(mode="mask"), seed=6)
    assert not torch.equal(other_seed.mask_batch(dict(full), step=4, rate=0.4), m_full)


# -- in a Trainer ------------------------------------------------------------------------------------------------
def test_plain_module_trains_on_masked_input():
    module = PlainHFModule()
    dm = ListDataModule(n_batches=3)
    source = copy.deepcopy(dm.batches)
    rec = Recorder()
    mt = MaskedThought(max_rate=0.4, warmup_fraction=0.0, mode="random", seed=1)
    trainer = _trainer([mt, rec], max_steps=3)
    seen = []
    handle = module.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"].clone()) if m.training else None, with_kwargs=True
    )
    trainer.fit(module, datamodule=dm)
    handle.remove()
    for b, s in zip(dm.batches, source):  # the DataLoader's cached tensors are unchanged
        assert torch.equal(b["input_ids"], s["input_ids"]) and torch.equal(b["labels"], s["labels"])
    assert len(seen) == 3
    for step in range(3):
        got, src = rec.train[step], source[step]
        assert torch.equal(seen[step], got["input_ids"])  # the model's forward saw the masked ids
        changed = got["input_ids"] != src["input_ids"]
        response = src["labels"] != -100
        assert changed.any() and not (changed & ~response).any()
        assert torch.equal(got["labels"], src["labels"])
    m = trainer.callback_metrics
    assert float(m["lit_ft/masked_thought/rate"]) == pytest.approx(0.4)
    last, src = rec.train[2], source[2]
    resp = src["labels"] != -100
    # masked_fraction counts replaced positions (a random draw may equal the original: <= changed)
    assert float(m["lit_ft/masked_thought/masked_fraction"]) >= ((last["input_ids"] != src["input_ids"]) & resp).sum() / resp.sum() - 1e-6
    assert 0.15 < float(m["lit_ft/masked_thought/masked_fraction"]) < 0.7


def test_ramp_in_a_trainer_mask_mode_validation_untouched():
    module = CausalLMModule(model_config=tiny_config())
    rec = Recorder()
    mt = MaskedThought(max_rate=0.3, warmup_fraction=0.5, mode="mask", mask_token_id=2)
    trainer = _trainer([mt, rec], max_steps=4, limit_val_batches=2, val_check_interval=4, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=ListDataModule(n_batches=4))
    src = ListDataModule(n_batches=4).batches
    assert len(rec.val) == 2 and all(torch.equal(v, s["input_ids"]) for v, s in zip(rec.val, src))
    assert torch.equal(rec.train[0]["input_ids"], src[0]["input_ids"])  # p = 0 at step 0
    for s in (1, 2, 3):
        changed = rec.train[s]["input_ids"] != src[s]["input_ids"]
        assert changed.any() and torch.all(rec.train[s]["input_ids"][changed] == 2)
    assert mt._total_steps == 4 and mt._rate == pytest.approx(0.3)  # ramp over 2 steps, then the plateau
    assert mt._seed == 0  # no seed_everything, no seed: 0


def test_missing_sample_idx_names_it_and_fallback():
    module = PlainHFModule()
    batch = random_batch(2, 8)
    del batch["sample_idx"]
    cb = MaskedThought(max_rate=0.3, warmup_fraction=0.0)
    trainer = _trainer([cb], max_steps=1)
    with pytest.raises(BatchKeyError, match=r"'sample_idx'.*SFTDataModule.*require_sample_idx=False"):
        cb.on_train_batch_start(trainer, module, dict(batch), 0)
    with pytest.raises(BatchKeyError, match="'labels'"):
        MaskedThought().on_train_batch_start(trainer, module, {"input_ids": batch["input_ids"], "sample_idx": torch.arange(2)}, 0)
    ok = MaskedThought(max_rate=0.5, warmup_fraction=0.0, require_sample_idx=False, seed=0)
    ok.setup(trainer, module, "fit")
    outs = []
    for _ in range(2):
        b = {k: v.clone() for k, v in batch.items()}
        ok.on_train_batch_start(trainer, module, b, 0)
        outs.append(b["input_ids"])
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], batch["input_ids"])


def test_composes_with_excess_loss_reference_sees_masked_input():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    mt = MaskedThought(max_rate=0.4, warmup_fraction=0.0, seed=2)
    ex = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    trainer = _trainer([mt, ex], max_steps=1)
    module.trainer = trainer
    for cb in (mt, ex):
        cb.setup(trainer, module, "fit")
    batch = random_batch(4, 16, seed=1)
    clean = dict(batch)
    for cb in (mt, ex):
        cb.on_train_batch_start(trainer, module, batch, 0)
    assert not torch.equal(batch["input_ids"], clean["input_ids"])
    with torch.no_grad():
        on_masked = causal_lm_token_nll(ex._ref_model, batch)
        on_clean = causal_lm_token_nll(ex._ref_model, clean)
    torch.testing.assert_close(ex._ref_nll, on_masked)
    assert not torch.allclose(ex._ref_nll, on_clean)


def test_both_active_in_one_trainer_metrics_logged():
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    mt = MaskedThought(max_rate=0.4, warmup_fraction=0.0)
    ex = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    trainer = _trainer([mt, ex], max_steps=3)
    trainer.fit(module, datamodule=ListDataModule())
    m = trainer.callback_metrics
    assert abs(float(m["lit_ft/excess_loss/kept_fraction"]) - 0.5) < 0.05
    assert abs(float(m["lit_ft/tokens/kept_fraction"]) - 0.5) < 0.05
    assert 0.15 < float(m["lit_ft/masked_thought/masked_fraction"]) < 0.7
    assert torch.isfinite(m["train/loss"])


def test_warns_when_a_token_scorer_comes_first():
    module = CausalLMModule(model_config=tiny_config())
    mt, ex = MaskedThought(), ExcessLossSelection(reference="initial")
    trainer = _trainer([ex, mt], max_steps=1)
    with pytest.warns(UserWarning, match=r"after \['ExcessLossSelection'\].*Put MaskedThought first"):
        mt.setup(trainer, module, "fit")


# -- checkpoint / resume -----------------------------------------------------------------------------------------
def _resume_run(seed, ckpt_path=None, save_dir=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    mt = MaskedThought(max_rate=0.4, warmup_fraction=0.5, rate_sampling="uniform", seed=seed)
    rec = Recorder()
    callbacks = [mt, rec]
    if save_dir:
        callbacks.append(ModelCheckpoint(dirpath=save_dir, every_n_train_steps=2, save_top_k=-1))
    trainer = pl.Trainer(
        max_steps=4, logger=False, enable_checkpointing=bool(save_dir), enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0,
    )
    # 2 batches per epoch: the step-2 checkpoint falls on an epoch boundary, so data order is the same
    trainer.fit(module, datamodule=ListDataModule(n_batches=2), ckpt_path=ckpt_path)
    return module, mt, rec


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    full, mt_full, rec_full = _resume_run(seed=7, save_dir=tmp_path)
    ckpt = tmp_path / "epoch=0-step=2.ckpt"
    state = torch.load(ckpt, weights_only=False)["callbacks"][mt_full.state_key]
    assert state["seed"] == 7 and state["total_steps"] == 4 and state["step"] == 1
    # constructed with another seed: the checkpoint's seed wins, so the masks continue the same stream
    with pytest.warns(UserWarning, match="checkpoint's seed 7"):
        resumed, mt_res, rec_res = _resume_run(seed=99, ckpt_path=str(ckpt))
    assert mt_res._seed == 7 and sorted(rec_res.train) == [2, 3]
    for s in (2, 3):
        assert torch.equal(rec_res.train[s]["input_ids"], rec_full.train[s]["input_ids"])
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    # the masks matter: another seed gives other masks and other weights
    other, _, rec_other = _resume_run(seed=99)
    assert not torch.equal(rec_other.train[3]["input_ids"], rec_full.train[3]["input_ids"])
    assert not torch.equal(other.model.lm_head.weight, full.model.lm_head.weight)


# -- DDP ---------------------------------------------------------------------------------------------------------
class _DumpInputs(pl.Callback):
    def __init__(self, path):
        self.path, self.seen = path, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append(batch["input_ids"].clone())

    def on_train_end(self, trainer, pl_module):
        torch.save(self.seen, f"{self.path}/inputs_{trainer.world_size}_{trainer.global_rank}.pt")


class _RankSlices(torch.utils.data.Dataset):
    """Step i's global batch of 8, sliced by rank (no sampler involved, so the split is exactly 4 + 4)."""

    def __init__(self, steps, per_rank):
        self.steps, self.per_rank = steps, per_rank

    def __len__(self):
        return len(self.steps)

    def __getitem__(self, i):
        r = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return {k: v[r * self.per_rank : (r + 1) * self.per_rank] for k, v in self.steps[i].items()}


def _ddp_fit(tmp_path, devices, batch_size, init_state, steps):
    module = SGDModule(model_config=tiny_config())
    module.load_state_dict(init_state)
    mt = MaskedThought(max_rate=0.4, warmup_fraction=0.0, mode="random", seed=3)
    trainer = pl.Trainer(
        accelerator="cpu", strategy="ddp_spawn" if devices > 1 else "auto", devices=devices, max_steps=len(steps),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[mt, _DumpInputs(str(tmp_path))], use_distributed_sampler=False,
    )
    loader = torch.utils.data.DataLoader(_RankSlices(steps, batch_size), batch_size=None)
    trainer.fit(module, train_dataloaders=loader)
    return module.state_dict()


@pytest.mark.slow
def test_ddp_two_ranks_mask_exactly_like_one_process(tmp_path):
    torch.manual_seed(0)
    init = SGDModule(model_config=tiny_config()).state_dict()
    steps = [random_batch(8, 16, prompt_len=3, seed=2), random_batch(8, 16, prompt_len=3, seed=3)]
    single = _ddp_fit(tmp_path, 1, 8, init, steps)
    ddp = _ddp_fit(tmp_path, 2, 4, init, steps)
    one = torch.load(tmp_path / "inputs_1_0.pt")
    r0, r1 = torch.load(tmp_path / "inputs_2_0.pt"), torch.load(tmp_path / "inputs_2_1.pt")
    assert len(one) == len(r0) == len(r1) == 2
    for s in range(2):
        assert not torch.equal(one[s], steps[s]["input_ids"])  # something was masked
        assert torch.equal(torch.cat([r0[s], r1[s]]), one[s])  # 2 x 4 masks exactly what 1 x 8 masks
    moved = False
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(single[name], init[name])
    assert moved
