import math
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import ExcessLossSelection, QTuning
from lit_ft.callbacks.token_selection.qtuning import _corners, smoothed_log_score, triage, write_eu_plane_png
from lit_ft.core import BatchKeyError, ModelLayoutError, global_topk_mask, shift_targets
from lit_ft.core.loss import causal_lm_token_nll
from lit_ft.modules import CausalLMModule

from helpers import (
    ListDataModule, PlainHFModule, SGDModule, assert_state_dicts_equal, fit_and_resume, fit_global_batches,
    random_batch, tiny_config,
)


def _trainer(callbacks, max_steps=3, **kw):
    kw.setdefault("logger", False)
    return pl.Trainer(
        max_steps=max_steps, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, **kw,
    )


def _attach(module, cb):
    trainer = _trainer([cb], max_steps=1)
    trainer.strategy.connect(module)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    module.train()
    return trainer


# -- arguments ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sample_ratio": 0.0}, "`sample_ratio` must be a number in \\(0, 1\\]"),
        ({"sample_ratio": 1.5}, "`sample_ratio` must be a number in \\(0, 1\\]"),
        ({"token_ratio": 0}, "`token_ratio` must be a number in \\(0, 1\\]"),
        ({"smoothing": -0.1}, "`smoothing` must be a number in \\[0, 1\\]"),
        ({"quadrants": "Q1Q3"}, "`quadrants` must be one of \\('paper', 'swap_entropy'\\)"),
        ({"scoring": "inline", "integration": "batch"}, "integration='batch' goes with scoring='separate'"),
        ({"plot_every_n_steps": -1}, "`plot_every_n_steps` must be an int >= 0"),
    ],
)
def test_bad_arguments_name_the_argument_and_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QTuning(**kwargs)


def test_defaults():
    cb = QTuning()
    assert (cb.sample_ratio, cb.token_ratio, cb.smoothing) == (0.25, 0.5, 0.5)
    assert (cb.quadrants, cb.top_up, cb.scoring, cb.integration, cb.plot_every_n_steps) == (
        "paper", True, "separate", "auto", 100)
    assert cb.token_needs == frozenset()  # separate scoring asks nothing of the training forward
    assert QTuning(scoring="inline").token_needs == frozenset({"nll", "entropy"})


# -- stage 1 math -------------------------------------------------------------------------------------------------
# A..D sit in the four corners, E..H in the middle band
HAND_PPL = torch.tensor([100.0, 1.0, 90.0, 2.0, 10.0, 11.0, 12.0, 13.0], dtype=torch.float64)
HAND_ENT = torch.tensor([0.1, 5.0, 4.9, 0.2, 2.0, 3.0, 2.5, 3.5], dtype=torch.float64)


def test_triage_hand_example_paper_quadrants():
    tri = triage(HAND_PPL, HAND_ENT, torch.ones(8, dtype=torch.bool), sample_ratio=0.25, quadrants="paper")
    # first bisection point a = 0.25 already keeps round(0.25 * 8) = 2 samples
    assert tri.alpha == tri.beta == 0.25
    # linear-interpolation quantiles, by hand: position q * (n - 1) in the sorted values
    assert tri.ppl_hi == pytest.approx(13 + 0.25 * (90 - 13))  # Q_0.75(PPL) = 32.25
    assert tri.ppl_lo == pytest.approx(2 + 0.75 * (10 - 2))  # Q_0.25(PPL) = 8
    assert tri.ent_lo == pytest.approx(0.2 + 0.75 * (2.0 - 0.2))  # Q_0.25(Ent) = 1.55
    assert tri.ent_hi == pytest.approx(3.5 + 0.25 * (4.9 - 3.5))  # Q_0.75(Ent) = 3.85
    assert tri.quadrant.tolist() == [2, 4, 1, 3, 0, 0, 0, 0]
    assert tri.keep_q2.nonzero().squeeze(1).tolist() == [0]  # high PPL, low Ent
    assert tri.keep_q4.nonzero().squeeze(1).tolist() == [1]  # low PPL, high Ent
    assert tri.topped_up == 0 and tri.bisect_kept == tri.target == 2


def test_triage_hand_example_swapped_entropy_axis():
    tri = triage(HAND_PPL, HAND_ENT, torch.ones(8, dtype=torch.bool), sample_ratio=0.25, quadrants="swap_entropy")
    assert tri.quadrant.tolist() == [1, 3, 2, 4, 0, 0, 0, 0]
    assert tri.keep_q2.nonzero().squeeze(1).tolist() == [2]  # high PPL, high Ent
    assert tri.keep_q4.nonzero().squeeze(1).tolist() == [3]  # low PPL, low Ent


def test_bisection_hits_the_ratio_exactly_on_an_independent_plane():
    g = torch.Generator().manual_seed(1)
    ppl = torch.exp(torch.rand(200, generator=g, dtype=torch.float64) * 3)
    ent = torch.rand(200, generator=g, dtype=torch.float64) * 4
    hits = 0
    for ratio in (0.1, 0.25, 0.4):
        tri = triage(ppl, ent, torch.ones(200, dtype=torch.bool), ratio, top_up=False)
        hits += tri.bisect_kept == round(ratio * 200)
        target = round(ratio * 200)
        # one alpha step moves four thresholds, so the count can jump by 2: the bisection must land on the
        # closest count any alpha achieves (a fine scan of alpha says which)
        best = min(abs(int((q2 | q4).sum()) - target)
                   for a in torch.linspace(0, 0.5, 1001).tolist()
                   for _, q2, _, q4, _ in [_corners(ppl, ent, a, "paper")])
        assert abs(tri.bisect_kept - target) == best <= 1, (ratio, tri.bisect_kept)
        assert int((tri.keep_q2 | tri.keep_q4).sum()) == tri.bisect_kept
        assert 0.0 < tri.alpha <= 0.5
        # the kept samples really are the corners the thresholds describe
        q2 = (ppl > tri.ppl_hi) & (ent <= tri.ent_lo)
        q4 = (ppl <= tri.ppl_lo) & (ent > tri.ent_hi)
        assert torch.equal(q2, tri.keep_q2) and torch.equal(q4, tri.keep_q4)
    assert hits >= 2  # usually exact
    # with top-up the kept count is then exactly the target
    tri = triage(ppl, ent, torch.ones(200, dtype=torch.bool), 0.4, top_up=True)
    assert int((tri.keep_q2 | tri.keep_q4).sum()) in (80, 81)


def test_correlated_plane_is_topped_up_to_the_target_or_left_short():
    ppl = torch.tensor([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0], dtype=torch.float64)
    ent = torch.log(ppl)  # perfectly correlated: both kept corners are empty at every alpha
    counted = torch.ones(8, dtype=torch.bool)
    short = triage(ppl, ent, counted, 0.5, top_up=False)
    assert short.bisect_kept == 0 and not (short.keep_q2 | short.keep_q4).any()
    full = triage(ppl, ent, counted, 0.5, top_up=True)
    assert full.topped_up == 4 and int((full.keep_q2 | full.keep_q4).sum()) == 4
    # top-up picks the largest |p_hat - e_hat| (min-max normalised); p_hat > e_hat goes to Q2
    pn = (ppl - 1) / 127
    en = ent / ent.max()
    expect = torch.sort((pn - en).abs(), descending=True, stable=True).indices[:4]
    assert sorted((full.keep_q2 | full.keep_q4).nonzero().squeeze(1).tolist()) == sorted(expect.tolist())
    assert torch.equal(full.keep_q2, (full.keep_q2 | full.keep_q4) & (pn >= en))


def test_samples_without_targets_are_not_counted():
    counted = torch.tensor([True] * 7 + [False])
    tri = triage(HAND_PPL, HAND_ENT, counted, 0.5)
    assert tri.quadrant[7] == -1 and not tri.keep_q2[7] and not tri.keep_q4[7]
    assert tri.target == round(0.5 * 7)


# -- stage 2 math -------------------------------------------------------------------------------------------------
def test_smoothed_score_by_hand():
    ppl = torch.tensor([[7.0, 1.0, 4.0, 2.0, 8.0, 1.0, 3.0]])
    valid = torch.tensor([[False, True, True, True, True, True, False]])
    s = torch.exp(smoothed_log_score(torch.log(ppl), valid, 0.5).double())
    # invalid neighbours (prompt at t=0, padding at t=6) count 0
    expected = [0.5 * 1 + 0.5 * (0 + 4), 0.5 * 4 + 0.5 * (1 + 2), 0.5 * 2 + 0.5 * (4 + 8),
                0.5 * 8 + 0.5 * (2 + 1), 0.5 * 1 + 0.5 * (8 + 0)]
    torch.testing.assert_close(s[0, 1:6], torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=0)
    assert s[0, 0] == 0 and s[0, 6] == 0
    # lambda = 0: plain token PPL; lambda = 1: neighbours only; huge losses do not overflow
    torch.testing.assert_close(torch.exp(smoothed_log_score(torch.log(ppl), valid, 0.0))[valid], ppl[valid])
    big = smoothed_log_score(torch.full((1, 4), 1000.0), torch.ones(1, 4, dtype=torch.bool), 1.0)
    assert torch.isfinite(big).all() and big[0, 0] == pytest.approx(1000.0)


def _rows_from_plane(T=8):
    """Per-token NLL / entropy for the 8 hand samples: mean NLL = log PPL_i, entropy = Ent_i on valid targets."""
    g = torch.Generator().manual_seed(0)
    nll = torch.zeros(8, T)
    valid = torch.zeros(8, T, dtype=torch.bool)
    valid[:, 1:7] = True
    d = torch.randn(8, 6, generator=g)
    d = d - d.mean(1, keepdim=True)
    nll[:, 1:7] = torch.log(HAND_PPL.float())[:, None] + d
    ent = torch.where(valid, HAND_ENT.float()[:, None].expand(8, T), torch.zeros(8, T))
    return nll, ent, valid


def test_select_prunes_only_q2_tokens_lowest_smoothed_score():
    nll, ent, valid = _rows_from_plane()
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    sample_keep, token_keep = cb.select(nll, ent, valid)
    assert sample_keep.tolist() == [True, True] + [False] * 6
    # Q4 (row 1) keeps every valid token; dropped rows keep none
    assert torch.equal(token_keep[1], valid[1]) and not token_keep[2:].any()
    # Q2 (row 0): the 3 of 6 tokens with the lowest s_t, computed here in float64
    p = torch.exp(nll[0].double()) * valid[0]
    s = 0.5 * p + 0.5 * (torch.cat([p.new_zeros(1), p[:-1]]) + torch.cat([p[1:], p.new_zeros(1)]))
    s[~valid[0]] = math.inf
    expect = torch.zeros(8, dtype=torch.bool)
    expect[torch.topk(s, 3, largest=False).indices] = True
    assert torch.equal(token_keep[0], expect)
    m = cb.last_triage.metrics
    assert m["sample_fraction"] == 0.25 and m["q2_token_fraction"] == 0.5
    assert m["kept_token_fraction"] == pytest.approx((3 + 6) / 48)
    assert (m["q1"], m["q2"], m["q3"], m["q4"], m["middle"]) == (1, 1, 1, 1, 4)


# -- the callback on a model --------------------------------------------------------------------------------------
def test_separate_removes_dropped_samples_and_loss_is_mean_over_selected_tokens():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5)
    trainer = _attach(module, cb)
    batch = random_batch(8, 16, seed=4)
    original = {k: v.clone() for k, v in batch.items()}
    cb.on_train_batch_start(trainer, module, batch, 0)
    rows = cb.last_sample_keep.nonzero().squeeze(1)
    assert rows.numel() == 2  # round(0.25 * 8); top-up makes it exact
    for key in ("input_ids", "attention_mask", "sample_idx"):
        assert torch.equal(batch[key], original[key][rows]), key
    # the edited labels are the original ones where the token is selected, -100 elsewhere
    keep = cb.last_token_keep
    expect_labels = original["labels"].clone()
    expect_labels[:, 1:][~keep[:, :-1]] = -100
    assert torch.equal(batch["labels"], expect_labels[rows])
    assert (batch["labels"] != -100).sum() < (original["labels"][rows] != -100).sum()  # tokens were pruned

    out = module.compute_token_loss(batch, module.model)
    with torch.no_grad():
        nll = causal_lm_token_nll(module.model, original)
    assert out.n_tokens.item() == keep.sum().item()
    torch.testing.assert_close(out.loss.detach(), nll[keep].mean(), rtol=1e-5, atol=1e-6)


def test_inline_selects_the_same_tokens_as_separate_on_the_same_model():
    torch.manual_seed(0)
    plain = PlainHFModule()
    state = plain.model.state_dict()
    batch = random_batch(8, 16, seed=11)

    sep_module = CausalLMModule(model_config=tiny_config())
    sep_module.model.load_state_dict(state)
    sep = QTuning(sample_ratio=0.5, token_ratio=0.5)
    trainer = _attach(sep_module, sep)
    b_sep = dict(batch)
    sep.on_train_batch_start(trainer, sep_module, b_sep, 0)
    loss_sep = sep_module.compute_token_loss(b_sep, sep_module.model).loss.detach()

    inl_module = CausalLMModule(model_config=tiny_config())
    inl_module.model.load_state_dict(state)
    inl = QTuning(sample_ratio=0.5, token_ratio=0.5, scoring="inline")
    trainer = _attach(inl_module, inl)
    b_inl = dict(batch)
    inl.on_train_batch_start(trainer, inl_module, b_inl, 0)
    assert b_inl["input_ids"].shape[0] == 8  # inline never edits the batch
    out = inl_module.compute_token_loss(b_inl, inl_module.model)
    assert inl.level == "mixin"
    assert torch.equal(out.keep, sep.last_token_keep)
    assert torch.equal(inl.last_sample_keep, sep.last_sample_keep)
    torch.testing.assert_close(out.loss.detach(), loss_sep, rtol=1e-5, atol=1e-6)

    # the HF loss hook of a plain module (entropy from its own logits) selects the same tokens too
    hook = QTuning(sample_ratio=0.5, token_ratio=0.5, scoring="inline")
    trainer = _attach(plain, hook)
    b_hook = dict(batch)
    hook.on_train_batch_start(trainer, plain, b_hook, 0)
    loss_hook = plain.training_step(b_hook, 0).detach()
    assert hook.level == "hook"
    assert torch.equal(hook.last_token_keep, sep.last_token_keep)
    torch.testing.assert_close(loss_hook, loss_sep, rtol=1e-5, atol=1e-5)
    hook.teardown(trainer, plain, "fit")


class _RecordingModule(CausalLMModule):
    def training_step(self, batch, batch_idx):
        self.seen_rows = getattr(self, "seen_rows", []) + [batch["input_ids"].shape[0]]
        return super().training_step(batch, batch_idx)


def test_effect_in_a_trainer_metrics_and_png(tmp_path):
    module = _RecordingModule(model_config=tiny_config(), learning_rate=1e-2)
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, plot_every_n_steps=2)
    trainer = _trainer([cb], max_steps=3, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=ListDataModule(batch_size=8))
    m = trainer.callback_metrics
    # step 0 is a measured step: the FLOPs probe runs training_step once on the whole batch (a side computation);
    # every real training forward sees only the kept samples
    assert module.seen_rows == [8, 2, 2, 2]
    # measured: scoring forward of 8 rows + the step on 2 rows, against a plain step on 8 rows
    assert 0.3 < float(m["lit_ft/qtuning/flops_fraction"]) < 0.8
    assert [s for s, _, _ in cb._flops.measurements] == [0]
    assert float(m["lit_ft/qtuning/sample_fraction"]) == 0.25
    assert 0.0 < float(m["lit_ft/qtuning/kept_token_fraction"]) < 0.25
    assert float(m["lit_ft/qtuning/kept_q2"]) + float(m["lit_ft/qtuning/kept_q4"]) == 2
    assert float(m["lit_ft/qtuning/ppl_lo"]) <= float(m["lit_ft/qtuning/ppl_hi"])
    assert torch.isfinite(m["train/loss"])
    pngs = sorted(p.name for p in (tmp_path / "qtuning").glob("*.png"))
    assert pngs == ["eu_plane_step0.png", "eu_plane_step2.png"]
    assert (tmp_path / "qtuning" / "eu_plane_step0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_goes_to_wandb_when_attached(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    class RecordingWandb(WandbLogger):
        def log_image(self, key, images, step=None, **kw):
            self.logged = (key, images, step)

    wandb = RecordingWandb.__new__(RecordingWandb)  # no W&B run needed: only isinstance + log_image matter
    cb = QTuning()
    cb.last_triage = triage(HAND_PPL, HAND_ENT, torch.ones(8, dtype=torch.bool), 0.25)
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True,
                              loggers=[wandb])
    cb._plot(trainer, 300)
    key, images, step = wandb.logged
    assert key == "lit_ft/qtuning/eu_plane" and step == 300
    assert images == [str(tmp_path / "qtuning" / "eu_plane_step300.png")]
    assert (tmp_path / "qtuning" / "eu_plane_step300.png").stat().st_size > 5000
    # swapped labelling also renders
    write_eu_plane_png(cb.last_triage, str(tmp_path / "swap.png"), quadrants="swap_entropy")
    assert (tmp_path / "swap.png").is_file()


def test_plain_module_drop_in_separate_and_batch_levels():
    for integration, level in (("auto", "hook"), ("batch", "batch")):
        torch.manual_seed(0)
        module = PlainHFModule()
        cb = QTuning(sample_ratio=0.5, integration=integration, plot_every_n_steps=0)
        trainer = _trainer([cb], max_steps=2)
        trainer.fit(module, datamodule=ListDataModule(batch_size=4))
        assert cb.level == level
        assert float(trainer.callback_metrics["lit_ft/qtuning/sample_fraction"]) == 0.5
        assert cb.last_sample_keep.sum() == 2
        assert "_loss_function" not in module.model.__dict__  # the hook (if any) was removed at teardown


def test_rank_with_every_sample_dropped_keeps_a_graph_connected_zero():
    """Under DDP another rank may hold all kept samples: this rank keeps one row with no target; the loss is an
    exact zero that still reaches every parameter (so DDP's all-reduce does not hang)."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    cb = QTuning()
    trainer = _attach(module, cb)
    batch = random_batch(4, 12, seed=2)
    cb.select = lambda nll, ent, valid: (torch.zeros(valid.shape[0], dtype=torch.bool),
                                         torch.zeros_like(valid))
    cb.last_triage = triage(HAND_PPL, HAND_ENT, torch.ones(8, dtype=torch.bool), 0.25)
    cb.on_train_batch_start(trainer, module, batch, 0)
    assert batch["input_ids"].shape[0] == 1 and (batch["labels"] == -100).all()
    out = module.compute_token_loss(batch, module.model)
    assert out.loss.item() == 0.0 and out.loss.requires_grad
    out.loss.backward()
    assert module.model.lm_head.weight.grad is not None
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())


def test_composes_with_excess_loss_selection():
    torch.manual_seed(0)
    batch = random_batch(8, 16, seed=9)
    # inline: both scorers in one pipeline, keep-masks AND
    module = CausalLMModule(model_config=tiny_config())
    qt = QTuning(sample_ratio=0.5, scoring="inline")
    el = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    trainer = _trainer([qt, el], max_steps=1)
    module.trainer = trainer
    qt.setup(trainer, module, "fit")
    el.setup(trainer, module, "fit")
    el._ref_model = PlainHFModule().model.eval()
    b = dict(batch)
    qt.on_train_batch_start(trainer, module, b, 0)
    el.on_train_batch_start(trainer, module, b, 0)
    module.train()
    out = module.compute_token_loss(b, module.model)
    targets = shift_targets(batch["labels"])
    valid = targets != -100
    with torch.no_grad():
        excess = causal_lm_token_nll(module.model, batch) - causal_lm_token_nll(el._ref_model, batch)
    el_keep = global_topk_mask(excess, valid, 0.5)
    assert torch.equal(out.keep, qt.last_token_keep & el_keep)
    assert 0 < out.keep.sum() < qt.last_token_keep.sum()

    # separate: QTuning edits the batch first, then Rho-1 selects half of what is left
    module2 = CausalLMModule(model_config=tiny_config())
    qt2 = QTuning(sample_ratio=0.5)
    el2 = ExcessLossSelection(keep_ratio=0.5, reference="initial")
    trainer2 = _trainer([qt2, el2], max_steps=1)
    trainer2.strategy.connect(module2)
    module2.trainer = trainer2
    qt2.setup(trainer2, module2, "fit")
    el2.setup(trainer2, module2, "fit")
    b2 = dict(batch)
    qt2.on_train_batch_start(trainer2, module2, b2, 0)
    el2.on_train_batch_start(trainer2, module2, b2, 0)
    module2.train()
    out2 = module2.compute_token_loss(b2, module2.model)
    left = int((shift_targets(b2["labels"]) != -100).sum())
    assert b2["input_ids"].shape[0] == 4 and out2.n_tokens.item() == math.ceil(0.5 * left)


def test_missing_labels_and_non_hf_module_errors():
    module = PlainHFModule()
    cb = QTuning()
    trainer = _attach(module, cb)
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    with pytest.raises(BatchKeyError, match="'labels'"):
        cb.on_train_batch_start(trainer, module, batch, 0)

    class NotHF(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

    cb2 = QTuning()
    with pytest.raises(ModelLayoutError, match="PreTrainedModel"):
        cb2.setup(_trainer([cb2]), NotHF(), "fit")


def test_refused_when_listed_after_a_batch_start_reader():
    # ExcessLossSelection's reference NLL would be for the rows QTuning removes (lit_ft.core.loss.batch_order)
    module = CausalLMModule(model_config=tiny_config())
    el, qt = ExcessLossSelection(reference="initial"), QTuning()
    trainer = _trainer([el, qt], max_steps=1)
    with pytest.raises(ValueError, match=r"Fix: list QTuning\(scoring='separate'\) before ExcessLossSelection"):
        qt.setup(trainer, module, "fit")


@pytest.mark.parametrize("scoring", ["inline"])  # separate (the default) is the contract suite's resume check
def test_checkpoint_resume_equals_uninterrupted(tmp_path, scoring):
    r = fit_and_resume(lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2),
                       lambda: [QTuning(sample_ratio=0.5, scoring=scoring, plot_every_n_steps=0)], tmp_path,
                       make_datamodule=lambda: ListDataModule(n_batches=2, batch_size=8))
    torch.manual_seed(0)
    init = CausalLMModule(model_config=tiny_config())
    assert not torch.equal(init.model.lm_head.weight, r.full.model.lm_head.weight)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())


# -- DDP ----------------------------------------------------------------------------------------------------------
_METRICS = ("sample_fraction", "kept_token_fraction", "alpha", "ppl_lo", "ppl_hi", "ent_lo", "ent_hi",
            "q1", "q2", "q3", "q4", "kept_q2", "kept_q4", "topped_up")


def _fit(strategy, devices, batch_size, init_state, datas, scoring):
    merged = {k: torch.cat([d[k] for d in datas]) for k in datas[0]}  # step i = datas[i]
    cb = QTuning(sample_ratio=0.25, token_ratio=0.5, scoring=scoring, plot_every_n_steps=0)
    state, trainer = fit_global_batches(strategy, devices, batch_size, init_state, merged, [cb], steps=len(datas))
    metrics = {k: float(trainer.callback_metrics[f"lit_ft/qtuning/{k}"]) for k in _METRICS}
    return state, metrics


@pytest.mark.slow
@pytest.mark.parametrize("scoring", ["separate"])  # inline runs the same select(); one spawn keeps this file fast
def test_ddp_two_ranks_select_what_one_big_batch_selects(scoring):
    """Step 1: both kept samples (Q2, token-pruned across them) sit on rank 1, so rank 0 trains on the
    no-target fallback row; step 2: the kept samples are split across the ranks."""
    torch.manual_seed(0)
    init = SGDModule(model_config=tiny_config()).state_dict()
    datas = []
    for seed in (2, 4):
        data = random_batch(8, 16, prompt_len=3, seed=seed)
        data["labels"][:4, 3:12] = -100  # rank 0 holds far fewer tokens than rank 1
        datas.append(data)
    single, m_single = _fit("auto", 1, 8, init, datas, scoring)
    ddp, m_ddp = _fit("ddp_spawn", 2, 4, init, datas, scoring)
    assert m_single["sample_fraction"] == 0.25
    assert m_ddp == pytest.approx(m_single, rel=1e-6)  # same thresholds, same quadrant counts, same fractions
    moved = False
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(single[name], init[name])
    assert moved
