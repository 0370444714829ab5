"""The token-loss engine's objective contract and its normalisation (lit_ft.core.loss): an objective's sum is divided
by its own window count at levels 2 and 3; a term the user adds to the loss trains exactly as without lit_ft; the
window look-ahead counts what Lightning will actually run."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_ft.callbacks._token_scorer import TokenScorerCallback
from lit_ft.core.loss import Objective, TokenDecision, shift_targets, supervised_count, token_pipeline_for
from lit_ft.core.loss.attach import attach
from lit_ft.modules import CausalLMModule
from tests.helpers import PlainHFModule, random_batch, tiny_config


class SquaredLogits(Objective):
    """``c · Σ_rows mean_v z²`` over the supervised positions; default normaliser (supervised tokens) makes the
    term ``c · mean(z²)``. ``per_sequence`` switches to its own unit: sequences."""

    objective_name = "squared_logits"

    def __init__(self, c: float, per_sequence: bool = False) -> None:
        self.c = c
        self.per_sequence = per_sequence
        self.seen = []

    def objective_counts(self, batch):
        if self.per_sequence:
            return {"sequences": torch.tensor(float(batch["labels"].shape[0]))}
        return super().objective_counts(batch)

    def objective_normaliser(self, totals):
        return totals["sequences"] if self.per_sequence else totals["tokens"]

    def objective_loss(self, inputs):
        self.seen.append(inputs)
        return self.c * inputs.chunked_loss(lambda z: z.pow(2).mean(-1).sum(), inputs.valid, chunk_size=3)


def _module():
    torch.manual_seed(0)
    m = CausalLMModule(model_config=tiny_config(), loss_impl="torch")
    m.train()
    return m


def _hand(m, batch, c, per_sequence=False):
    logits = m.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = shift_targets(batch["labels"])
    valid = targets != -100
    ce = F.cross_entropy(logits[valid], targets[valid])
    sq = logits[valid].pow(2).mean(-1).sum()
    return ce, c * sq / (batch["labels"].shape[0] if per_sequence else valid.sum())


@pytest.mark.parametrize("per_sequence", [False, True])
def test_objective_value_and_gradient_level3(per_sequence):
    m = _module()
    obj = SquaredLogits(0.3, per_sequence)
    token_pipeline_for(m).register_objective(obj)
    batch = random_batch(batch_size=3, seq_len=9, prompt_len=2)
    out = m.compute_token_loss(batch, m.model)
    ce, extra = _hand(m, batch, 0.3, per_sequence)
    torch.testing.assert_close(out.loss.detach(), (ce + extra).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.mean, ce.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.objectives["squared_logits"], extra.detach(), rtol=1e-5, atol=1e-6)
    assert obj.seen[-1].level == "mixin" and obj.seen[-1].training
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (ce + extra).backward()
    for n, p in m.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-7, msg=n)


def test_objective_level2_through_the_hf_hook_equals_level3():
    torch.manual_seed(0)
    plain = PlainHFModule()
    trainer = pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    obj = SquaredLogits(0.3)
    att = attach(trainer, plain, obj, "auto")
    assert att.level == "hook"
    batch = random_batch(batch_size=3, seq_len=9, prompt_len=2)
    att.bind(batch)
    plain.train()
    loss = plain.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    ce, extra = _hand(plain, batch, 0.3)
    torch.testing.assert_close(loss.detach(), (ce + extra).detach(), rtol=1e-5, atol=1e-6)
    assert obj.seen[-1].level == "hook"


def test_objective_registration_errors():
    pipe = token_pipeline_for(_module())
    with pytest.raises(TypeError, match="objective_loss"):
        pipe.register_objective(object())
    pipe.register_objective(SquaredLogits(1.0))
    with pytest.raises(ValueError, match="already registered"):
        pipe.register_objective(SquaredLogits(2.0))

    class Vector(Objective):
        objective_name = "vector"

        def objective_loss(self, inputs):
            return torch.ones(2)

    m = _module()
    token_pipeline_for(m).register_objective(Vector())
    with pytest.raises(ValueError, match="scalar"):
        m.compute_token_loss(random_batch(), m.model)


# -- a user's own loss term is left alone -------------------------------------------------------------------------
class KeepAll(TokenScorerCallback):
    """A token callback that changes nothing: the engine runs (level 2 on a plain module), scores are all kept."""

    scorer_name = "keep_all"

    def score_tokens(self, scores):
        return TokenDecision()


class RegularisedModule(PlainHFModule):
    """What a user writes: the HF loss plus their own L2 term."""

    def __init__(self, reg: float) -> None:
        super().__init__(lr=1.0)
        self.reg = reg

    def training_step(self, batch, batch_idx):
        loss = self.model(**batch).loss
        return loss + self.reg * sum(p.pow(2).sum() for p in self.model.parameters())

    def on_before_optimizer_step(self, optimizer):
        self.captured = {n: p.grad.detach().clone() for n, p in self.named_parameters() if p.grad is not None}


def _user_grads(reg, callbacks, accumulate=2):
    torch.manual_seed(0)
    m = RegularisedModule(reg)
    data = random_batch(4, 12, prompt_len=3, seed=4)
    data["labels"][:1, 3:10] = -100
    batches = [{k: v[i: i + 2] for k, v in data.items()} for i in range(0, 4, 2)]
    t = pl.Trainer(max_steps=1, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    t.fit(m, train_dataloaders=DataLoader(batches, batch_size=None))
    return m.captured


def test_a_users_extra_term_trains_exactly_as_without_lit_ft():
    """The L2 term's gradient contribution (with − without the term) is the same with a lit_ft token callback as
    without one. Before the engine counted normalisers ahead, it was divided by the window's token count."""
    plain_with, plain_without = _user_grads(0.01, []), _user_grads(0.0, [])
    ours_with, ours_without = _user_grads(0.01, [KeepAll()]), _user_grads(0.0, [KeepAll()])
    for n in plain_with:
        expected = plain_with[n] - plain_without[n]
        assert torch.count_nonzero(expected) > 0, n
        torch.testing.assert_close(ours_with[n] - ours_without[n], expected, rtol=1e-4, atol=1e-8, msg=n)


# -- the window look-ahead ----------------------------------------------------------------------------------------
class _CountProbe(pl.Callback):
    def __init__(self):
        self.totals = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.totals.append(float(token_pipeline_for(pl_module).window.totals["token"]))


@pytest.mark.parametrize("limit", [None, 3])
def test_window_counts_what_lightning_runs(limit):
    """5 micro-batches, accumulate 2: windows of 2, 2 and the epoch's last 1 (or, with limit_train_batches=3, 2
    and 1); the look-ahead neither skips nor repeats a batch."""
    torch.manual_seed(0)
    batches = [random_batch(2, 8, prompt_len=1 + i, seed=i) for i in range(5)]
    counts = [float(supervised_count(b)) for b in batches]
    seen = []

    class Recorder(CausalLMModule):
        def training_step(self, batch, batch_idx):
            seen.append(float(supervised_count(batch)))
            return super().training_step(batch, batch_idx)

    probe = _CountProbe()
    m = Recorder(model_config=tiny_config())
    t = pl.Trainer(max_epochs=1, accumulate_grad_batches=2, limit_train_batches=limit, logger=False,
                   enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[probe])
    t.fit(m, train_dataloaders=DataLoader(batches, batch_size=None))
    n = limit or 5
    assert seen == counts[:n]
    windows = [counts[:n][i: i + 2] for i in range(0, n, 2)]
    assert len(windows[-1]) == 1  # the epoch's (or limit's) last window is short
    assert probe.totals == [sum(w) for w in windows]


def test_a_module_that_skips_the_window_count_is_refused_under_accumulation():
    """Overriding on_train_batch_start without super() would leave the window uncounted: with accumulation the
    engine refuses (a per-batch count would train inexactly) and says what to do."""

    class Forgetful(CausalLMModule):
        def on_train_batch_start(self, batch, batch_idx):
            return None  # no super()

    torch.manual_seed(0)
    t = pl.Trainer(max_steps=1, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="call super"):
        t.fit(Forgetful(model_config=tiny_config()),
              train_dataloaders=DataLoader([random_batch(2, 8, seed=i) for i in range(2)], batch_size=None))


def test_mid_epoch_resume_with_accumulation_and_the_resumable_sampler(tiny_tokenizer_path, tmp_path):
    """The look-ahead takes micro-batches from the loader early; a mid-epoch checkpoint (after 2 optimizer steps =
    4 of 5 micro-batches, accumulate 2) must still resume into the same batches and the same weights."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lit_ft.data import SFTDataModule
    from lit_ft.testing import write_tiny_sft_jsonl

    data = write_tiny_sft_jsonl(tmp_path / "t.jsonl", n=20)

    class Recorder(CausalLMModule):
        def training_step(self, batch, batch_idx):
            self.seen = getattr(self, "seen", []) + [batch["sample_idx"].tolist()]
            return super().training_step(batch, batch_idx)

    def run(max_steps, ckpt_path=None, ckpt_dir=None):
        torch.manual_seed(0)
        m = Recorder(model_config=tiny_config(), learning_rate=1e-2)
        cbs = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_top_k=-1)] if ckpt_dir else []
        t = pl.Trainer(max_steps=max_steps, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                       enable_model_summary=False, enable_checkpointing=bool(ckpt_dir), limit_val_batches=0,
                       num_sanity_val_steps=0, callbacks=cbs)
        dm = SFTDataModule(data=data, tokenizer=tiny_tokenizer_path, val_split=0.0, batch_size=4, max_length=128)
        t.fit(m, datamodule=dm, ckpt_path=ckpt_path)
        return m

    full = run(5)
    first = run(2, ckpt_dir=tmp_path / "ck")
    rest = run(5, ckpt_path=str(next((tmp_path / "ck").glob("*step=2*.ckpt"))))
    # epoch 0: 5 micro-batches in windows of 2, 2, 1 (3 steps); epoch 1: two more windows of 2 reach step 5
    assert len(first.seen) == 4 and len(full.seen) == 9 and first.seen + rest.seen == full.seen
    for (n, a), (_, b) in zip(full.state_dict().items(), rest.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
