"""BlackBoxPromptLearning: the policy-gradient estimator against the exact gradient, the black box never differentiated,
training, resume, bad inputs, progress."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.core.batch import BatchKeyError
from lit_ft.modules.black_box import BlackBox, LocalBlackBox
from lit_ft.modules.black_box_prompt import BlackBoxPromptLearning
from lit_ft.modules.black_box_prompt_math import (candidate_vocabulary, exact_expected_gradient, pick_demonstrations,
                                                  sample_prompts, select_reliable, vr_policy_gradient)
from tests.helpers import assert_state_dicts_equal, fit_and_resume, quiet_trainer
from tests.modules.black_box_data import TINY_KWARGS, tiny_data, tiny_dir, two_batch_data


def make(**kw) -> BlackBoxPromptLearning:
    torch.manual_seed(0)
    return BlackBoxPromptLearning(**{**TINY_KWARGS, **kw})


# -- the estimator -------------------------------------------------------------------------------------------------
L, K, I, R = 2, 3, 5, 6000  # odd sizes; R independent estimates


def _table(seed: int = 0) -> dict[tuple[int, ...], float]:
    g = torch.Generator().manual_seed(seed)
    return {(a, b): float(torch.rand((), generator=g, dtype=torch.float64)) * 2 + a * 0.3
            for a in range(K) for b in range(K)}


def _estimates(logits: torch.Tensor, table: dict, divide_by_i: bool = False, baseline: bool = True) -> torch.Tensor:
    """``R`` independent estimates ``[R, L, K]`` (vectorised VR-PGE; the variants are the negative controls)."""
    g = torch.Generator().manual_seed(123)
    p = torch.softmax(logits.double(), -1)
    samples = torch.stack([torch.multinomial(p[l], R * I, replacement=True, generator=g) for l in range(L)], -1)
    samples = samples.view(R, I, L)
    loss_grid = torch.tensor([[table[(a, b)] for b in range(K)] for a in range(K)], dtype=torch.float64)
    losses = loss_grid[samples[..., 0], samples[..., 1]]  # [R, I]
    score = torch.nn.functional.one_hot(samples, K).double() - p  # [R, I, L, K]
    adv = losses - losses.mean(1, keepdim=True) if baseline else losses
    return (adv[..., None, None] * score).sum(1) / (I if divide_by_i or not baseline else I - 1)


def _z(estimates: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    return ((estimates.mean(0) - exact) / se.clamp_min(1e-12)).abs()


def test_vr_policy_gradient_matches_the_exact_gradient_of_the_expected_loss():
    """E[VR-PGE] = d E_s[loss(s)] / d theta, the expectation taken by enumerating all K**L prompts (fp64 autograd);
    statistically: every entry within 4.5 standard errors of R = 6000 estimates."""
    logits = torch.tensor([[0.3, -0.5, 0.9], [-0.2, 0.4, 0.1]], dtype=torch.float64)
    table = _table()
    exact = exact_expected_gradient(logits, table)
    # the closed form as a second reference: sum_s P(s) loss(s) (onehot(s_l) - p_l)
    p = torch.softmax(logits, -1)
    closed = torch.zeros(L, K, dtype=torch.float64)
    for (a, b), v in table.items():
        prob = p[0, a] * p[1, b]
        closed += prob * v * (torch.nn.functional.one_hot(torch.tensor([a, b]), K).double() - p)
    torch.testing.assert_close(exact, closed, rtol=1e-12, atol=1e-12)
    est = _estimates(logits, table)
    assert _z(est, exact).max() < 4.5, (est.mean(0), exact)
    # the module's function computes the same estimate as the vectorised one
    g = torch.Generator().manual_seed(5)
    s = sample_prompts(logits, I, g)
    losses = torch.tensor([table[tuple(x)] for x in s.tolist()], dtype=torch.float64)
    mine = vr_policy_gradient(logits, s, losses)
    score = torch.nn.functional.one_hot(s, K).double() - p
    torch.testing.assert_close(mine, ((losses - losses.mean())[:, None, None] * score).sum(0) / (I - 1))


def test_the_statistical_check_rejects_a_wrong_estimator():
    """The same check fails for a biased estimator (mean baseline but divided by I: E = (I-1)/I of the gradient),
    so it can tell a wrong estimate; and the baseline lowers the variance against plain REINFORCE."""
    logits = torch.tensor([[0.3, -0.5, 0.9], [-0.2, 0.4, 0.1]], dtype=torch.float64)
    table = _table()
    exact = exact_expected_gradient(logits, table)
    assert _z(_estimates(logits, table, divide_by_i=True), exact).max() > 4.5
    plain = _estimates(logits, table, baseline=False)
    assert _z(plain, exact).max() < 4.5  # unbiased too ...
    assert _estimates(logits, table).var(0).sum() < 0.5 * plain.var(0).sum()  # ... with a larger variance


def test_sample_prompts_follows_the_distributions():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    s = sample_prompts(logits, 30000, torch.Generator().manual_seed(0))
    freq = torch.stack([torch.bincount(s[:, l], minlength=3) for l in range(2)]).double() / 30000
    torch.testing.assert_close(freq, torch.softmax(logits.double(), -1), atol=0.015, rtol=0)
    with pytest.raises(ValueError, match=">= 2 sampled prompts"):
        vr_policy_gradient(logits, s[:1], torch.zeros(1))


# -- pseudo-labels, demonstrations, candidates ----------------------------------------------------------------------
def test_select_reliable_is_balanced_for_a_biased_model():
    # a model that says class 0 for every text: the prior correction still finds class-1 examples (the relatively
    # most class-1 texts), each class gets per_class reliable examples
    p1 = torch.tensor([0.10, 0.30, 0.05, 0.20, 0.25, 0.02, 0.15])
    probs = torch.stack([1 - p1, p1], -1)
    labels, reliable = select_reliable(probs, 2)
    assert reliable.sum() == 4 and (labels[reliable] == 0).sum() == 2
    assert set(torch.nonzero(reliable & (labels == 1)).flatten().tolist()) == {1, 4}
    assert set(torch.nonzero(reliable & (labels == 0)).flatten().tolist()) == {5, 2}
    with pytest.raises(ValueError, match="reliable_per_class"):
        select_reliable(probs, 4)


def test_pick_demonstrations_excludes_the_query_and_is_balanced():
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    reliable = torch.tensor([True, True, True, True, False, False])
    conf = torch.tensor([0.1, 0.9, 0.8, 0.2, 1.0, 1.0])
    assert pick_demonstrations(labels, reliable, 2, 1, None, None, conf) == [2, 1]
    for seed in range(10):
        got = pick_demonstrations(labels, reliable, 2, 1, 2, torch.Generator().manual_seed(seed))
        assert 2 not in got and 0 in got and sorted(labels[got].tolist()) == [0, 1]


def test_candidate_vocabulary_leaves_out_the_pattern_and_is_deterministic():
    texts = [f"Headline: {t} ? Answer:" for t in
             ["red apples fall", "red apples rise", "green pens fall", "blue cars rise", "old books sing",
              "new birds sing"]]
    v = candidate_vocabulary(texts, 4)
    assert v == candidate_vocabulary(list(texts), 4) and len(v) == 4
    assert "red apples" in v and not {"headline", "answer"} & set(" ".join(v).split())
    with pytest.raises(ValueError, match="num_candidates"):
        candidate_vocabulary(texts, 50)


# -- the black box ---------------------------------------------------------------------------------------------------
def test_local_black_box_gives_the_label_words_probabilities():
    """class_probs = the next-token distribution after the text restricted to the label words, renormalised and
    summed per class (reference: the full lm_head, fp64)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir() / "tok"))
    torch.manual_seed(0)
    words = [["books", "pens"], ["apples"]]
    box = LocalBlackBox(words, tok, model_config=TINY_KWARGS["model_config"], batch_size=2)
    assert isinstance(box, BlackBox)
    texts = ["Tom has apples ? Answer:", "the books", "Ann bought three pens and books ? Answer:"]
    got = box.class_probs(texts)
    ids = [[tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in ws] for ws in words]
    model = box.scorer.model.double()
    for i, t in enumerate(texts):
        x = torch.tensor([tok(t)["input_ids"]])
        logits = model(input_ids=x).logits[0, -1]
        flat = torch.tensor([j for ws in ids for j in ws])
        p = torch.softmax(logits[flat], -1)
        ref = torch.stack([p[:2].sum(), p[2:].sum()])
        torch.testing.assert_close(got[i].double(), ref, rtol=1e-5, atol=1e-6)
    assert box.queries == 3


def test_the_model_is_never_differentiated():
    m = make()
    trainer = quiet_trainer([], max_steps=3, limit_val_batches=1, val_check_interval=2)
    trainer.fit(m, datamodule=tiny_data())
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["prompt_logits"]
    params = list(m.box.parameters())
    assert params and all(not p.requires_grad and p.grad is None for p in params)
    assert not any(k.startswith("box") or "model." in k for k in m.state_dict())  # the LM is not in checkpoints


# -- training ----------------------------------------------------------------------------------------------------------
def test_training_moves_the_prompt_relabels_and_logs(tmp_path):
    m = make()
    from lightning.pytorch.loggers import CSVLogger

    trainer = pl.Trainer(max_steps=4, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1,
                         val_check_interval=4, log_every_n_steps=1, default_root_dir=str(tmp_path))
    trainer.fit(m, datamodule=tiny_data())
    assert not torch.equal(m.prompt_logits.detach(), torch.zeros_like(m.prompt_logits))
    assert bool(m.initialized) and m.reliable.sum() == 2 * 2
    assert sorted(m.pseudo_labels[m.reliable].tolist()) == [0, 0, 1, 1]
    logged = trainer.callback_metrics
    for k in ("train/loss", "val/loss", "val/acc", "lit_ft/black_box_prompt/prompt_entropy",
              "lit_ft/black_box_prompt/pseudo_label_changes"):
        assert k in logged, sorted(logged)
    assert m.box.queries == 16 + 4 * 4 * 3 + 8  # zero-shot pass + 4 steps x 4 texts x 3 prompts + validation
    preds = torch.cat(trainer.predict(m, datamodule=tiny_data()))
    assert preds.shape == (8,) and preds.dtype == torch.long


def test_training_never_reads_the_labels():
    """Scrambling the training labels changes nothing: the prompt, pseudo-labels and demonstrations are equal."""
    def run(scramble: bool) -> BlackBoxPromptLearning:
        m = make()
        dm = tiny_data()
        if scramble:
            dm.setup("fit")
            for e in dm._examples("train"):
                e["label"] = 1 - e["label"]
        quiet_trainer([], max_steps=2, limit_val_batches=0).fit(m, datamodule=dm)
        return m

    a, b = run(False), run(True)
    assert_state_dicts_equal(a.state_dict(), b.state_dict())


@pytest.mark.parametrize("data", [tiny_data, two_batch_data], ids=["mid_epoch", "epoch_boundary"])
def test_resume_mid_loop_is_identical(tmp_path, data):
    r = fit_and_resume(lambda: make(), lambda: [], tmp_path, make_datamodule=data)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    assert r.full.prediction_demonstrations() == r.resumed.prediction_demonstrations()
    assert r.full.candidates == r.resumed.candidates
    opt_a, opt_b = r.trainer_full.optimizers[0].state_dict(), r.trainer_resumed.optimizers[0].state_dict()
    torch.testing.assert_close(opt_a["state"], opt_b["state"], rtol=0, atol=0)
    # the resumed run did not redo the zero-shot pass: it asked the black box only for its own 2 steps
    assert r.resumed.box.queries == 2 * 4 * 3


def test_resume_refuses_other_candidates(tmp_path):
    with pytest.raises(ValueError, match="candidate phrases differ"):
        fit_and_resume(lambda: make(), lambda: [], tmp_path, make_datamodule=two_batch_data,
                       before_resume=lambda ckpt: _swap_candidates(ckpt))


def _swap_candidates(ckpt):
    from lit_ft.modules.black_box_prompt import CANDIDATES_KEY

    state = torch.load(ckpt, weights_only=False)
    state[CANDIDATES_KEY] = list(reversed(state[CANDIDATES_KEY]))
    torch.save(state, ckpt)


def test_the_zero_shot_pass_shows_progress(monkeypatch):
    import lit_ft.modules.black_box_prompt as mod

    seen = []
    real = mod.progress

    def spy(iterable, desc, **kw):
        seen.append(desc)
        return real(iterable, desc, **kw)

    monkeypatch.setattr(mod, "progress", spy)
    quiet_trainer([], max_steps=1, limit_val_batches=0).fit(make(), datamodule=tiny_data())
    assert seen == ["black_box_prompt: zero-shot pseudo-labels"]


# -- bad inputs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arg,value", [
    ("num_samples", 1), ("prompt_length", 0), ("num_candidates", 1), ("candidates", ["a", "a"]),
    ("learning_rate", 0.0), ("optimizer", "lbfgs"), ("clip_grad_norm", -1.0), ("reliable_per_class", 0),
    ("demonstrations_per_class", 9), ("prompt_position", "end"), ("label_words", [["yes"]]),
    ("label_words", [["yes"], []]), ("prior_correction", "yes"), ("seed", -1), ("query_batch_size", 0),
])
def test_bad_arguments_name_the_argument(arg, value):
    with pytest.raises(ValueError, match=arg):
        BlackBoxPromptLearning(**{arg: value})


def test_an_unlabelled_set_smaller_than_a_batch_is_refused():
    with pytest.raises(ValueError, match=r"6 texts, fewer than one batch \(`batch_size`=8\)"):
        quiet_trainer([], max_steps=1).fit(make(), datamodule=tiny_data(n_train=6, batch_size=8))


def test_too_few_texts_for_the_reliable_set_are_refused():
    with pytest.raises(ValueError, match="reliable_per_class`=5 x 2 classes"):
        quiet_trainer([], max_steps=1).fit(make(reliable_per_class=5, demonstrations_per_class=1),
                                           datamodule=tiny_data(n_train=8))


def test_no_label_words_is_refused():
    class NoNames(pl.LightningDataModule):
        tokenizer = None
        label_names = None

        def train_dataloader(self):
            return []

    with pytest.raises(ValueError, match="no label words"):
        quiet_trainer([], max_steps=1).fit(make(label_words=None), datamodule=NoNames())


def test_a_batch_without_sample_idx_names_the_key():
    m = make()
    quiet_trainer([], max_steps=1, limit_val_batches=0).fit(m, datamodule=tiny_data())
    with pytest.raises(BatchKeyError, match="sample_idx"):
        m.training_step({"input_ids": torch.ones(2, 3, dtype=torch.long)}, 0)


def test_more_than_one_process_is_refused():
    from types import SimpleNamespace

    m = make()
    m._trainer = SimpleNamespace(world_size=2)
    with pytest.raises(ValueError, match="world_size=2"):
        m.setup("fit")
