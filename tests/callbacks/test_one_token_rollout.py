"""OneTokenRollout (OTR, arXiv 2509.26313): the Gumbel-max sampler against softmax + multinomial, the loss against a
direct full-logits reference (fp64 gradcheck, ignored tokens, weights, keep-mask), its expected gradient, the
cross-entropy mix, training at levels 2 and 3, checkpoint -> resume under gradient accumulation, argument errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lit_ft.callbacks import OneTokenRollout
from lit_ft.kernels.gumbel_sampler import gumbel_max_sample
from lit_ft.callbacks.objectives.one_token_rollout import otr_chunk_sum
from lit_ft.kernels import chunked_linear_loss
from lit_ft.modules import CausalLMModule
from tests.helpers import ListDataModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, quiet_trainer, random_batch, \
    tiny_config

Z = torch.tensor([1.0, 0.2, -1.0, 2.0, 0.0, 0.5, -2.0, 0.9])


def reference_sample(logits: torch.Tensor, k: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The distribution the Gumbel-max sampler must draw from: softmax(z / temperature) + multinomial."""
    return torch.multinomial(torch.softmax(logits / temperature, -1), k, replacement=True, generator=generator)


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square critical value, 7 degrees of freedom, p = 1e-4 (the test fails by chance once in 10 000 seeds)
CHI2_7DF = 29.88


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("vocab_chunk_size", [3, None])
def test_gumbel_frequencies_match_tempered_softmax(temperature, vocab_chunk_size):
    n, k = 6000, 4
    ids = gumbel_max_sample(Z.expand(n, -1), k, seed=7, row_ids=torch.arange(n), temperature=temperature,
                            vocab_chunk_size=vocab_chunk_size)
    counts = torch.bincount(ids.flatten(), minlength=Z.numel()).double()
    target = torch.softmax(Z.double() / temperature, -1)
    assert chi2(counts, target) < CHI2_7DF
    # the same test tells a wrong temperature apart (what the sampler would draw at temperature 1 or squared)
    wrong = torch.softmax(Z.double() / (temperature * 1.6), -1)
    assert chi2(counts, wrong) > 5 * CHI2_7DF
    # and the reference sampler (softmax + multinomial) passes the same test
    ref = reference_sample(Z.expand(n, -1), k, temperature, torch.Generator().manual_seed(0))
    assert chi2(torch.bincount(ref.flatten(), minlength=Z.numel()).double(), target) < CHI2_7DF


def test_samples_depend_on_seed_and_row_only():
    torch.manual_seed(0)
    logits = torch.randn(10, 50)
    rows = torch.arange(100, 110)
    full = gumbel_max_sample(logits, 5, seed=3, row_ids=rows, temperature=0.8)
    for chunk in (1, 7, 49, 50):  # vocabulary chunk boundaries anywhere, including one column per block
        assert torch.equal(gumbel_max_sample(logits, 5, 3, rows, 0.8, vocab_chunk_size=chunk), full)
    # a row's draws do not depend on the other rows of its block (level 2: all rows; level 3: chunks of rows)
    assert torch.equal(gumbel_max_sample(logits[4:7], 5, 3, rows[4:7], 0.8), full[4:7])
    assert not torch.equal(gumbel_max_sample(logits, 5, 4, rows, 0.8), full)  # another seed, other draws
    # the K draws of a row are independent, not copies
    assert (full != full[:, :1]).any()


def reference_loss(hidden, weight, targets, weights, row_ids, *, seed, k, temperature, negative_reward, baseline,
                   ce_weight, otr_weight):
    """The OTR sum written directly on the full [N, V] logits, one row at a time."""
    logits = hidden @ weight.T
    ids = gumbel_max_sample(logits.detach(), k, seed, row_ids, temperature)
    total = logits.new_zeros(())
    for i in range(logits.shape[0]):
        logp = torch.log_softmax(logits[i], -1)
        r = torch.tensor([1.0 if int(a) == int(targets[i]) else negative_reward for a in ids[i]], dtype=logp.dtype)
        if baseline:
            r = r - r.mean()
        term = -otr_weight * (r * logp[ids[i]]).sum() / k + (ce_weight - 1.0) * -logp[targets[i]]
        total = total + weights[i] * term
    return total


@pytest.mark.parametrize("baseline, ce_weight, otr_weight", [(False, 0.0, 1.0), (True, 0.5, 2.0), (False, 1.0, 1.0)])
def test_loss_equals_reference_and_gradcheck(baseline, ce_weight, otr_weight):
    torch.manual_seed(0)
    n, d, v = 9, 5, 11
    hidden = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,))
    keep = torch.tensor([1, 1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool)  # ignored / deselected tokens
    weights = torch.rand(n, dtype=torch.float64) + 0.5
    row_ids = torch.arange(n) + 40
    kw = dict(seed=5, num_samples=3, temperature=1.3, negative_reward=-0.25, baseline=baseline,
              ce_weight=ce_weight, weight=otr_weight)

    def ours(h, w):
        return chunked_linear_loss(h, w, lambda z, **r: otr_chunk_sum(z, **r, **kw),
                                   {"targets": targets, "weights": weights, "row_ids": row_ids}, keep=keep,
                                   chunk_size=2)

    ref = reference_loss(hidden[keep], weight, targets[keep], weights[keep], row_ids[keep], seed=5, k=3,
                         temperature=1.3, negative_reward=-0.25, baseline=baseline, ce_weight=ce_weight,
                         otr_weight=otr_weight)
    got = ours(hidden, weight)
    torch.testing.assert_close(got, ref)
    g_ours = torch.autograd.grad(got, (hidden, weight))
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(g_ours[0], g_ref[0])
    assert torch.equal(g_ours[0][~keep], torch.zeros_like(g_ours[0][~keep]))  # dropped rows get no gradient
    torch.testing.assert_close(g_ours[1], g_ref[1])
    assert torch.autograd.gradcheck(ours, (hidden, weight))


def test_expected_gradient_is_scaled_gold_probability_gradient():
    """E[∂loss/∂z] = -(1 - negative_reward) ∂π(y)/∂z: rewards' sign, the 1/K and the temperature-1 log-probs."""
    n, k, beta = 4000, 4, -0.5
    z = Z.double().expand(n, -1).clone().requires_grad_(True)
    y = torch.full((n,), 5)
    loss = otr_chunk_sum(z, y, torch.ones(n), torch.arange(n), seed=11, num_samples=k, temperature=1.0,
                         negative_reward=beta, baseline=False, ce_weight=1.0)
    (g,) = torch.autograd.grad(loss / n, z)
    p = torch.softmax(Z.double(), -1)
    expected = -(1 - beta) * p[5] * (F.one_hot(torch.tensor(5), Z.numel()).double() - p)
    torch.testing.assert_close(g.sum(0), expected, atol=0.01, rtol=0)  # loss / n: the sum over rows is the mean


def test_ce_weight_scales_the_cross_entropy_exactly():
    """weight=0: the term only cancels (1 - ce_weight) of the token cross-entropy, so with SGD ce_weight=0.5 at twice
    the learning rate trains like plain SFT (level 2, a plain HF module)."""
    def fit(lr, callbacks):
        torch.manual_seed(0)
        module = PlainHFModule(lr=lr)
        quiet_trainer(callbacks, max_steps=2, limit_val_batches=0).fit(module, datamodule=ListDataModule(n_batches=2))
        return module.state_dict()

    plain = fit(1e-2, [])
    mixed = fit(2e-2, [OneTokenRollout(weight=0.0, ce_weight=0.5)])
    for name in plain:
        torch.testing.assert_close(mixed[name], plain[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("make, level", [("causal", "mixin"), ("plain", "hook")])
def test_term_is_logged_and_trains(make, level):
    def module():
        torch.manual_seed(0)
        return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2) if make == "causal" else PlainHFModule()

    base = module()
    quiet_trainer([], max_steps=2, limit_val_batches=0).fit(base, datamodule=ListDataModule(n_batches=2))
    m = module()
    cb = OneTokenRollout(num_samples=4)
    seen = {}

    class Spy(pl_callback()):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["level"] = cb.level

    t = quiet_trainer([cb, Spy()], max_steps=2, limit_val_batches=0)
    t.fit(m, datamodule=ListDataModule(n_batches=2))
    assert seen["level"] == level
    assert torch.isfinite(t.callback_metrics["lit_ft/one_token_rollout/loss"])
    rate = float(t.callback_metrics["lit_ft/one_token_rollout/hit_rate"])
    assert 0.0 <= rate <= 1.0
    assert any(not torch.equal(p, base.state_dict()[n]) for n, p in m.state_dict().items())


def pl_callback():
    from lightning.pytorch.callbacks import Callback

    return Callback


def test_resume_is_identical_under_gradient_accumulation(tmp_path):
    r = fit_and_resume(lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2),
                       lambda: [OneTokenRollout(num_samples=3, seed=2)], tmp_path, max_steps=4,
                       make_datamodule=lambda: ListDataModule(n_batches=4), accumulate_grad_batches=2)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())



@pytest.mark.parametrize("arg, value", [("num_samples", 0), ("num_samples", 2.0), ("temperature", -1.0),
                                        ("negative_reward", 0.1), ("negative_reward", float("-inf")),
                                        ("ce_weight", -0.5), ("weight", -1.0), ("seed", -3),
                                        ("vocab_chunk_size", 0), ("baseline", 1), ("integration", "batch")])
def test_bad_arguments_are_named(arg, value):
    with pytest.raises(ValueError, match=f"`?{arg}`?"):
        OneTokenRollout(**{arg: value})


def test_baseline_needs_two_samples():
    with pytest.raises(ValueError, match="num_samples"):
        OneTokenRollout(num_samples=1, baseline=True)


def test_draws_follow_the_sample_and_the_step_not_the_row_or_the_forward():
    from lit_ft.callbacks.objectives.one_token_rollout import position_keys, step_seed

    whole = {"sample_idx": torch.tensor([10, 11, 12, 13])}
    half = {"sample_idx": torch.tensor([12, 13])}
    k_whole, k_half = position_keys(whole, (4, 6), torch.device("cpu")), position_keys(half, (2, 6), torch.device("cpu"))
    assert torch.equal(k_whole[2:], k_half)  # a sample keeps its keys on another rank / in another micro-batch
    assert len(set(k_whole.flatten().tolist())) == 24  # every (sample, position) its own key
    no_idx = position_keys({}, (2, 6), torch.device("cpu"))
    assert torch.equal(no_idx, position_keys({"sample_idx": torch.tensor([0, 1])}, (2, 6), torch.device("cpu")))
    assert step_seed(0, 3) == step_seed(0, 3) and step_seed(0, 3) != step_seed(0, 4) != step_seed(1, 4)


def test_two_micro_batches_train_exactly_like_one_batch(tmp_path):
    """Gradient accumulation over two halves = one step on the whole batch (same draws, same normaliser; SGD so the
    update is the gradient): the draws follow each sample's ``sample_idx``. Keyed by the row in its micro-batch
    instead (no ``sample_idx``), the halves draw other tokens and the update differs."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    full = random_batch(4, 10, seed=3)
    full["sample_idx"] = torch.arange(4)
    halves = [{k: v[:2] for k, v in full.items()}, {k: v[2:] for k, v in full.items()}]

    class Data(pl.LightningDataModule):
        def __init__(self, batches):
            super().__init__()
            self.batches = batches

        def train_dataloader(self):
            return DataLoader(self.batches, batch_size=None)

    class SGDModule(CausalLMModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1.0)

    def run(batches, accumulate):
        torch.manual_seed(0)
        module = SGDModule(model_config=tiny_config())
        quiet_trainer([OneTokenRollout(num_samples=3, seed=5)], max_steps=1, accumulate_grad_batches=accumulate,
                      default_root_dir=str(tmp_path)).fit(module, datamodule=Data(batches))
        return dict(module.named_parameters())

    def max_diff(a, b):
        return max(float((a[n] - b[n]).abs().max()) for n in a)

    one, two = run([full], 1), run(halves, 2)
    assert max_diff(one, two) < 1e-6
    drop = [{k: v for k, v in h.items() if k != "sample_idx"} for h in halves]
    assert max_diff(one, run(drop, 2)) > 1e-3
