"""CriticalTokenScoring: contrastive weights in the batch, the weights file (written once, keyed by sample, stale
files refused, resume), only_neg, training the contrastive models, bad inputs."""

from __future__ import annotations

import pytest
import torch

from lit_ft.callbacks import CriticalTokenScoring
from lit_ft.callbacks.objectives._critical_cache import CriticalWeightsCache, StaleCacheError
from lit_ft.core.batch import BatchKeyError
from tests.callbacks.critical_token_checks import PairData, WeightedPairModule, pair_batch, save_tiny
from tests.helpers import ListDataModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, quiet_trainer, \
    tiny_hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("contrastive")
    return save_tiny(d / "pos", 11), save_tiny(d / "neg", 12)


def _fit(cb, steps=2, module=None, data=None):
    module = module or WeightedPairModule()
    quiet_trainer([cb], max_steps=steps).fit(module, datamodule=data or PairData())
    return module


def _dense_p(pos, neg, ids, beta=1.0):
    """p_t = softmax((1+β) z_pos − β z_neg)[y_t] on full fp64 logits, aligned with the labels (index t = label t)."""
    with torch.no_grad():
        zp = pos.double()(input_ids=ids[None]).logits[0]
        zn = neg.double()(input_ids=ids[None]).logits[0]
    p = torch.softmax((1 + beta) * zp - beta * zn, -1)[:-1].gather(1, ids[1:, None]).squeeze(1)
    return torch.cat([torch.ones(1, dtype=p.dtype), p])


@pytest.mark.parametrize("only_neg", [True, False])
def test_weights_land_in_the_batch_aligned_with_the_labels(models, tmp_path, only_neg):
    from transformers import AutoModelForCausalLM

    pos_dir, neg_dir = models
    cb = CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, only_neg=only_neg,
                              cache_path=str(tmp_path / "w.pt"), score_batch_size=3, vocab_chunk=50)
    module = _fit(cb, steps=2)
    pos, neg = AutoModelForCausalLM.from_pretrained(pos_dir), AutoModelForCausalLM.from_pretrained(neg_dir)
    batch = pair_batch(0)
    seen = module.seen[0]
    for side in ("chosen", "rejected"):
        w = seen[f"{side}_token_weights"]
        assert w.shape == batch[f"{side}_labels"].shape and w.dtype == torch.float32
        for b in range(4):
            n = int(batch[f"{side}_attention_mask"][b].sum())
            sup = batch[f"{side}_labels"][b] != -100
            sup[0] = False
            p = _dense_p(pos, neg, batch[f"{side}_input_ids"][b, :n])
            want = torch.ones(batch[f"{side}_labels"].shape[1], dtype=torch.float64)
            if side == "rejected":
                want[:n] = torch.where(sup[:n], 1 - p, want[:n])
            elif not only_neg:
                want[:n] = torch.where(sup[:n], p, want[:n])
            torch.testing.assert_close(w[b].double(), want, rtol=1e-4, atol=1e-5)
    rej = seen["rejected_token_weights"][batch["rejected_labels"] != -100]
    assert (rej < 1).all() and (rej > 0).all() and rej.std() > 0  # real, varied scores
    if only_neg:
        assert torch.equal(seen["chosen_token_weights"], torch.ones_like(seen["chosen_token_weights"]))


def test_the_file_is_written_once_read_back_and_keyed_by_sample(models, tmp_path):
    pos_dir, neg_dir = models
    path = tmp_path / "w.pt"
    first = CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, cache_path=str(path))
    m1 = _fit(first, steps=2)
    assert first.scored_now and path.is_file()
    stamp = path.stat().st_mtime_ns
    second = CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, cache_path=str(path))
    m2 = _fit(second, steps=2)
    assert not second.scored_now and path.stat().st_mtime_ns == stamp  # read, not re-scored
    for a, b in zip(m1.seen, m2.seen):
        assert torch.equal(a["rejected_token_weights"], b["rejected_token_weights"])
    # keyed by sample: the rows of another batch composition (reversed, other padding width) get their own weights
    cache = CriticalWeightsCache.load(path)
    batch = pair_batch(1)
    chosen, rejected = cache.lookup(batch, only_neg=True)
    flipped = {k: (v.flip(0) if v.dim() else v) for k, v in batch.items()}
    flipped = {k: (torch.cat([v, torch.zeros(4, 3, dtype=v.dtype) - (100 if "labels" in k else 0)], 1)
                   if v.dim() == 2 else v) for k, v in flipped.items()}
    _, rejected_f = cache.lookup(flipped, only_neg=True)
    torch.testing.assert_close(rejected_f[:, :12], rejected.flip(0), rtol=0, atol=0)
    assert torch.equal(rejected_f[:, 12:], torch.ones(4, 3))
    assert len(cache) == 8 and cache.split == "train" and not cache.has_chosen


def test_a_stale_file_is_refused_never_reused(models, tmp_path):
    pos_dir, neg_dir = models
    path = tmp_path / "w.pt"
    _fit(CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, cache_path=str(path)), steps=1)
    other = save_tiny(tmp_path / "other", 13)
    stale = [CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, cache_path=str(path), beta=2.0),
             CriticalTokenScoring(positive_model=other, negative_model=neg_dir, cache_path=str(path)),
             CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, cache_path=str(path),
                                  only_neg=False)]
    for cb, why in zip(stale, ("other contrastive models or β", "other contrastive models", "only_neg")):
        with pytest.raises(StaleCacheError, match=why):
            _fit(cb, steps=1)
    data = PairData()
    data.batches[1]["rejected_input_ids"][2, 5] += 1  # one token of one pair changed
    with pytest.raises(StaleCacheError, match="other preference data"):
        _fit(CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, cache_path=str(path)), steps=1,
             data=data)
    # the per-row check catches a batch edited after the scoring (same sample_idx, other tokens)
    cache = CriticalWeightsCache.load(path)
    edited = pair_batch(0)
    edited["rejected_labels"][1, 4] = -100
    with pytest.raises(StaleCacheError, match="sample_idx 1 has other tokens"):
        cache.lookup(edited, only_neg=True)
    unknown = pair_batch(5)
    with pytest.raises(KeyError, match="sample_idx 20 is not in the weights file"):
        cache.lookup(unknown, only_neg=True)


def test_trained_contrastive_models_resume_with_the_file_and_their_adapters_load(tmp_path):
    make = lambda: [CriticalTokenScoring(contrastive_max_steps=2, contrastive_batch_size=4, score_batch_size=4)]
    r = fit_and_resume(WeightedPairModule, make, tmp_path / "run", make_datamodule=PairData)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    (full,), (resumed,) = r.callbacks_full, r.callbacks_resumed
    assert full.scored_now and not resumed.scored_now
    assert full.state_dict() == resumed.state_dict() and full.state_dict()["fingerprint"]
    folder = tmp_path / "run" / "critical_token_scoring"
    assert (folder / "weights.pt").is_file()
    # the saved adapters are PEFT folders: loading them as the two models gives the same scores
    loaded = CriticalTokenScoring(positive_model=str(folder / "positive_adapter"),
                                  negative_model=str(folder / "negative_adapter"), cache_path=str(tmp_path / "l.pt"),
                                  score_batch_size=4)
    _fit(loaded, steps=1)
    a, b = CriticalWeightsCache.load(folder / "weights.pt"), CriticalWeightsCache.load(tmp_path / "l.pt")
    torch.testing.assert_close(a.rejected_p, b.rejected_p, rtol=1e-5, atol=1e-6)
    assert a.rejected_p.std() > 0
    # a resumed run whose file is gone cannot re-train from the base: a clear error
    (folder / "weights.pt").unlink()
    with pytest.raises(FileNotFoundError, match="weights file .* is missing"):
        fit_and_resume(WeightedPairModule, make, tmp_path / "run2", make_datamodule=PairData,
                       before_resume=lambda ckpt: (tmp_path / "run2" / "critical_token_scoring" / "weights.pt").unlink())


def test_training_a_contrastive_model_changes_it_and_leaves_the_callers_random_state_alone(tmp_path):
    from lit_ft.callbacks.objectives._critical_data import collect
    from lit_ft.callbacks.objectives._critical_models import ContrastiveTraining, base_copy, train_contrastive

    records = collect(PairData().batches, "test")
    base = tiny_hf_model(seed=0)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    cfg = ContrastiveTraining(max_steps=3, batch_size=4, learning_rate=1e-2)
    model = train_contrastive(base_copy(base), [r.chosen for r in records], cfg, torch.device("cpu"), "t",
                              tmp_path / "adapter")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, base.state_dict()[n])]
    assert moved and all("mlp" in n for n in moved)  # LoRA on the MLP projections, merged
    assert not any(p.requires_grad for p in model.parameters())
    again = train_contrastive(base_copy(base), [r.chosen for r in records], cfg, torch.device("cpu"), "t")
    assert_state_dicts_equal(model.state_dict(), again.state_dict())  # seeded: the same model twice


def test_a_batch_without_pairs_names_preference_data_module(models, tmp_path):
    pos_dir, neg_dir = models
    cb = CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, cache_path=str(tmp_path / "w.pt"))
    with pytest.raises(BatchKeyError, match="chosen_labels.*PreferenceDataModule"):
        quiet_trainer([cb], max_steps=1).fit(PlainHFModule(), datamodule=ListDataModule(n_batches=1))


@pytest.mark.parametrize("kwargs,arg", [
    (dict(beta=-1.0), "beta"), (dict(only_neg="yes"), "only_neg"), (dict(score_batch_size=0), "score_batch_size"),
    (dict(positive_model="a"), "train_contrastive"), (dict(train_contrastive=False), "train_contrastive"),
    (dict(positive_model="a", negative_model="b", train_contrastive=True), "train_contrastive"),
    (dict(contrastive_rank=0), "contrastive_rank"), (dict(contrastive_dropout=1.0), "contrastive_dropout"),
    (dict(contrastive_learning_rate=0.0), "contrastive_learning_rate"), (dict(model_dtype="int8"), "model_dtype"),
    (dict(cache_path=""), "cache_path"), (dict(contrastive_target_modules=[]), "contrastive_target_modules"),
    (dict(vocab_chunk=0), "vocab_chunk"), (dict(seed=-1), "seed"),
])
def test_bad_arguments_name_the_argument(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        CriticalTokenScoring(**kwargs)


def test_a_trainer_run_with_token_dpo_trains_on_the_weights(models, tmp_path):
    """CriticalTokenScoring + TokenDPO on PreferenceModule: the weights reach the DPO loss (the run differs from
    plain DPO) and the logged weight statistics are those of the batch."""
    from lit_ft.callbacks import TokenDPO
    from lit_ft.modules import PreferenceModule
    from tests.helpers import tiny_config

    pos_dir, neg_dir = models

    def run(callbacks):
        torch.manual_seed(0)
        module = PreferenceModule(model_config=tiny_config(), learning_rate=1e-2)
        trainer = quiet_trainer(callbacks + [TokenDPO(beta=0.5)], max_steps=2, limit_val_batches=0)
        trainer.fit(module, datamodule=PairData())
        return {n: p.detach().clone() for n, p in module.named_parameters()}, trainer

    plain, _ = run([])
    cb = CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir, cache_path=str(tmp_path / "w.pt"))
    weighted, trainer = run([cb])
    assert any(not torch.equal(plain[n], weighted[n]) for n in plain)
    mean = trainer.callback_metrics["lit_ft/critical_token_scoring/rejected_weight_mean"]
    batch = pair_batch(1)  # the second (last) step's batch
    _, rejected = cb.cache.lookup(batch, only_neg=True)
    sup = batch["rejected_labels"] != -100
    sup[:, 0] = False
    torch.testing.assert_close(mean, rejected[sup].mean())
    assert 0 < float(mean) < 1


def test_scoring_leaves_the_trainers_loader_alone(models, tmp_path):
    """The split is read through a loader of the callback's own: the Trainer's batch sampler (whose position a
    checkpoint records) is iterated exactly as often as without the callback."""
    from torch.utils.data import DataLoader

    from torch.utils.data import default_collate

    class Counting:  # batches of 4 rows in a fixed order; counts its passes
        def __init__(self, n):
            self.n, self.iters = n, 0

        def __iter__(self):
            self.iters += 1
            return iter([list(range(i, min(i + 4, self.n))) for i in range(0, self.n, 4)])

        def __len__(self):
            return (self.n + 3) // 4

    class SampledPairs(PairData):
        def train_dataloader(self):
            rows = [{k: v[b] for k, v in batch.items()} for batch in self.batches for b in range(4)]
            self.sampler = Counting(len(rows))
            return DataLoader(rows, batch_sampler=self.sampler, collate_fn=default_collate)

    pos_dir, neg_dir = models
    counts = []
    for callbacks in ([], [CriticalTokenScoring(positive_model=pos_dir, negative_model=neg_dir,
                                                cache_path=str(tmp_path / "w.pt"))]):
        data = SampledPairs()
        module = WeightedPairModule()
        quiet_trainer(callbacks, max_steps=2).fit(module, datamodule=data)
        counts.append(data.sampler.iters)
    assert counts[0] == counts[1] == 1
    assert "rejected_token_weights" in module.seen[-1]
