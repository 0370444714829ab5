"""TokenElimination (LeMo): exactness of the gather → layer → merge path, selection, predictors, resume, contracts."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from lit_ft.callbacks import TokenElimination
from lit_ft.callbacks.token_selection._token_elimination_parts import (
    gather_layer_inputs,
    segment_counts,
    segment_topk,
    standardised_log_score,
    topk_agreement,
)
from lit_ft.core.introspect import ModelLayoutError
from lit_ft.modules import CausalLMModule

from helpers import (
    ListDataModule, LoraModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, fit_global_batches,
    greedy_generate, random_batch, tiny_config, tiny_hf_model,
)

SMALL = dict(min_seq_len=1, segment_size=8)


def _trainer(callbacks, max_steps=3, **kw):
    kw.setdefault("limit_val_batches", 0)
    return pl.Trainer(max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=callbacks, **kw)


def _module(layers=4, attn="sdpa", seed=0, **kw):
    torch.manual_seed(seed)
    m = CausalLMModule(model_config=tiny_config(num_hidden_layers=layers), **kw)
    m.model.config._attn_implementation = attn
    return m


def _armed(cb, module, batch, step=0):
    """Set the callback up on ``module`` and open a training batch without a Trainer loop."""
    trainer = _trainer([cb])
    cb.setup(trainer, module, "fit")
    cb._step = step
    cb._arm(batch, training=True, step=step)
    return trainer


# -- arguments -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    ({"keep_ratio": 0.0}, r"`keep_ratio` must be a number in \(0, 1\], got 0.0"),
    ({"keep_ratio": 1.2}, r"`keep_ratio` must be a number in \(0, 1\]"),
    ({"layer_keep_ratios": []}, r"`layer_keep_ratios` must be a non-empty list"),
    ({"layer_keep_ratios": [1.0, 0.0]}, r"`layer_keep_ratios\[1\]` must be a number in \(0, 1\]"),
    ({"dense_layers": -1}, r"`dense_layers` must be an int >= 0"),
    ({"segment_size": 0}, r"`segment_size` must be an int >= 1"),
    ({"min_seq_len": 0}, r"`min_seq_len` must be an int >= 1"),
    ({"score": "norm"}, r"`score` must be one of"),
    ({"calibration_steps": -1}, r"`calibration_steps` must be an int >= 0"),
    ({"predictor_hidden": 0}, r"`predictor_hidden` must be an int >= 1"),
    ({"predictor_lr": 0}, r"`predictor_lr` must be a finite number > 0"),
    ({"predictor": "yes"}, r"`predictor` must be"),
])
def test_bad_arguments_name_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        TokenElimination(**kw)


def test_constructible_without_arguments_with_the_documented_defaults():
    cb = TokenElimination()
    assert (cb.keep_ratio, cb.dense_layers, cb.segment_size, cb.min_seq_len, cb.score) == (0.5, 2, 256, 1024, "attention")
    assert cb.predictor and cb.calibration_steps == 20 and not cb.apply_in_eval


def test_setup_errors_for_models_it_cannot_edit():
    with pytest.raises(ModelLayoutError, match="attn_implementation='flex_attention'"):
        TokenElimination(**SMALL).setup(_trainer([]), _module(attn="flex_attention"), "fit")
    with pytest.raises(ValueError, match=r"`dense_layers` must be an int in \[0, 3\]"):
        TokenElimination(dense_layers=4, **SMALL).setup(_trainer([]), _module(), "fit")
    with pytest.raises(ValueError, match=r"one ratio per decoder layer \(4 for this model\), got 2"):
        TokenElimination(layer_keep_ratios=[0.5, 0.5], **SMALL).setup(_trainer([]), _module(), "fit")
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(tiny_config(num_hidden_layers=2, head_dim=8))
    cfg.pop("model_type")
    gemma = pl.LightningModule()
    gemma.model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma2", **cfg), attn_implementation="eager")
    with pytest.raises(ModelLayoutError, match="TokenElimination: .*soft-capping"):
        TokenElimination(dense_layers=0, **SMALL).setup(_trainer([]), gemma, "fit")


def test_sharded_strategies_are_refused():
    from lightning.pytorch.strategies import ModelParallelStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=ModelParallelStrategy(), logger=False)
    with pytest.raises(Exception, match="TokenElimination"):
        TokenElimination(**SMALL).setup(trainer, _module(), "fit")


def test_first_batch_without_input_ids_names_the_key():
    cb = TokenElimination(**SMALL)
    with pytest.raises(Exception, match="input_ids"):
        _armed(cb, _module(), {"labels": torch.zeros(1, 4, dtype=torch.long)})


# -- selection -------------------------------------------------------------------------------------------------------
def test_segment_topk_keeps_the_top_of_every_segment_in_order():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 21, generator=g)
    idx = segment_topk(scores, 0.5, 8)
    assert idx.shape == (3, 4 + 4 + 3)  # ceil(0.5*8), ceil(0.5*8), ceil(0.5*5)
    assert bool((idx[:, 1:] > idx[:, :-1]).all())  # ascending: order preserved, no duplicates
    for b in range(3):
        for start, length, kept in segment_counts(21, 0.5, 8):
            seg = scores[b, start:start + length]
            expect = set((seg.topk(kept).indices + start).tolist())
            got = set(i for i in idx[b].tolist() if start <= i < start + length)
            assert got == expect


def test_padding_goes_first_and_ratio_one_keeps_everything():
    scores = torch.arange(8.0).repeat(2, 1)
    scores[1, 5:] = float("-inf")  # right padding
    idx = segment_topk(scores, 0.5, 8)
    assert idx[1].tolist() == [1, 2, 3, 4]
    assert segment_topk(scores, 1.0, 3).tolist() == [list(range(8))] * 2


def test_standardised_target_and_agreement():
    s = torch.tensor([[1.0, 2.0, 4.0, 8.0]])
    t = standardised_log_score(s, torch.ones(1, 4, dtype=torch.bool))
    assert torch.allclose(t.mean(), torch.tensor(0.0), atol=1e-6) and torch.allclose(t.std(unbiased=False), torch.tensor(1.0))
    assert (t[0, 1:] > t[0, :-1]).all()
    assert topk_agreement(torch.tensor([[0, 1]]), torch.tensor([[1, 3]]), 4) == 0.5


def test_gather_layer_inputs_restricts_rope_positions_and_the_4d_mask():
    B, T, d = 2, 6, 4
    cos, sin = torch.randn(1, T, d), torch.randn(1, T, d)
    mask = torch.randn(B, 1, T, T)
    idx = torch.tensor([[0, 2, 5], [1, 3, 4]])
    out = gather_layer_inputs({"position_embeddings": (cos, sin), "attention_mask": mask,
                               "position_ids": torch.arange(T)[None]}, idx, T)
    for b in range(B):
        torch.testing.assert_close(out["position_embeddings"][0][b], cos[0, idx[b]])
        torch.testing.assert_close(out["attention_mask"][b, 0], mask[b, 0][idx[b]][:, idx[b]])
        assert out["position_ids"][b].tolist() == idx[b].tolist()
    with pytest.raises(ValueError, match="only a 4-D"):
        gather_layer_inputs({"attention_mask": torch.ones(B, T)}, idx, T)


# -- exactness of the path -------------------------------------------------------------------------------------------
def _loss_and_grads(module, batch, cb=None):
    module.zero_grad()
    if cb is not None:
        _armed(cb, module, batch)
    loss = module.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    if cb is not None:
        cb._active = False
        cb.teardown(None, module, "fit")
    return loss.detach(), grads


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_ratio_one_equals_the_unmodified_model_through_the_path(attn):
    batch = random_batch(4, 24)  # ragged right padding on half the rows
    ref_loss, ref_grads = _loss_and_grads(_module(attn=attn), batch)
    cb = TokenElimination(layer_keep_ratios=[1.0] * 4, **SMALL)
    loss, grads = _loss_and_grads(_module(attn=attn), batch, cb)
    assert cb._kept and set(cb._kept) == {0, 1, 2, 3}  # the gather/merge path ran at every layer
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_eliminated_tokens_pass_on_the_residual_and_kept_tokens_see_only_kept_tokens_at_their_positions():
    module = _module(layers=3)
    hf = module.model
    batch = {k: v for k, v in random_batch(2, 32).items()}
    batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
    cb = TokenElimination(dense_layers=1, keep_ratio=0.5, **SMALL)
    seen = {}

    def spy(i):
        def pre(mod, args, kwargs):
            seen[(i, "in")] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

        def post(mod, args, kwargs, out):
            seen[(i, "out")] = (out[0] if isinstance(out, tuple) else out).detach().clone()
        return pre, post

    _armed(cb, module, batch)
    handles = []
    for i, layer in enumerate(hf.model.layers):
        pre, post = spy(i)
        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))  # before elimination
        handles.append(layer.register_forward_hook(post, with_kwargs=True))  # after the merge
    captured = {}
    orig = cb._before_layer

    def record(index, layer, args, kwargs):
        out = orig(index, layer, args, kwargs)
        captured[index] = cb._open[index][1].clone()
        return out

    cb._handles[0].remove()
    from lit_ft.core.layer_hooks import ORDER_ELIMINATE, register_layer_pre_hook
    cb._handles[0] = register_layer_pre_hook(hf, record, order=ORDER_ELIMINATE, layers=[1, 2])
    with torch.no_grad():
        module.training_step(batch, 0)
    for h in handles:
        h.remove()
    rotary = hf.model.rotary_emb
    for i in (1, 2):
        idx = captured[i]
        h_in, h_out = seen[(i, "in")], seen[(i, "out")]
        dropped = torch.ones_like(h_in[..., 0], dtype=torch.bool).scatter_(1, idx, False)
        assert int(dropped.sum()) == 2 * 16
        assert torch.equal(h_out[dropped], h_in[dropped])  # exactly the residual
        for b in range(2):  # kept rows: the layer on the compacted sequence, each token at its own position
            x = h_in[b:b + 1, idx[b]]
            pe = rotary(x, idx[b][None])
            with torch.no_grad():
                ref = hf.model.layers[i].__class__.forward(hf.model.layers[i], x, attention_mask=None,
                                                           position_embeddings=pe, position_ids=idx[b][None])
            ref = ref[0] if isinstance(ref, tuple) else ref
            torch.testing.assert_close(h_out[b, idx[b]], ref[0], rtol=1e-5, atol=1e-5)
    cb.teardown(None, module, "fit")


def test_saved_activations_of_an_eliminating_layer_shrink_with_the_kept_share():
    """Bytes autograd saves inside one eliminating layer scale with k/T (the merge and gather save only the index)."""

    def saved_bytes(cb):
        module = _module(layers=3, seed=1)
        batch = random_batch(2, 64)
        batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
        sizes = {}
        layer = module.model.model.layers[2]
        state = {"in": False}
        layer.register_forward_pre_hook(lambda *a: state.update({"in": True}))
        layer.register_forward_hook(lambda *a: state.update({"in": False}))

        def pack(t):
            if state["in"]:
                sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        if cb is not None:
            _armed(cb, module, batch)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module.training_step(batch, 0)
        if cb is not None:
            cb._active = False
        return sum(sizes.values())

    dense = saved_bytes(None)
    quarter = saved_bytes(TokenElimination(dense_layers=2, keep_ratio=0.25, **SMALL))
    # weights are not saved per token; what scales is activations: 0.25 of the rows, plus small constant terms
    assert quarter < 0.35 * dense, (quarter, dense)
    assert quarter > 0.15 * dense, (quarter, dense)


# -- training --------------------------------------------------------------------------------------------------------
def test_trainer_steps_calibrate_then_predict_and_log():
    module = _module(layers=4)
    cb = TokenElimination(dense_layers=1, keep_ratio=0.5, calibration_steps=3, check_every_n_steps=2, **SMALL)
    seen = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(dict(cb.last_metrics))

    before = {k: v.clone() for k, v in cb_predictor_init(cb, module).items()}
    _trainer([cb, Spy()], max_steps=6).fit(module, datamodule=ListDataModule(n_batches=6, seq_len=32))
    assert [m["lit_ft/token_elimination/exact_score"] for m in seen] == [1, 1, 1, 0, 1, 0]  # calib 0-2, check at 4
    assert all(abs(m["lit_ft/token_elimination/kept_fraction"] - 0.5) < 0.06 for m in seen)
    assert "lit_ft/token_elimination/predictor_agreement" in seen[4] and "predictor_loss" in str(seen[4])
    assert set(k for k in seen[0] if "/layer_" in k and "kept" in k) == {f"lit_ft/token_elimination/kept_fraction/layer_{i:02d}" for i in (1, 2, 3)}
    after = cb.predictors.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the predictors learned
    assert cb._updates == 4


def cb_predictor_init(cb, module):
    from lit_ft.callbacks.token_selection._token_elimination_parts import ScorePredictors

    return ScorePredictors([1, 2, 3], module.model.config.hidden_size, cb.predictor_hidden, cb.seed).state_dict()


def test_predictors_learn_the_exact_selection_better_than_chance():
    """With the model frozen (lr 0), the predictors' regression loss falls and their selection recovers more of the
    exact one than a random choice would (keep_ratio). On SmolLM2-135M and news text the agreement is about 0.74 at
    keep 0.5 (docs/techniques/token_elimination.md); a random tiny model's attention is much less predictable."""
    module = _module(layers=3, seed=3)
    cb = TokenElimination(dense_layers=1, keep_ratio=0.25, calibration_steps=40, check_every_n_steps=1,
                          predictor_lr=1e-2, **SMALL)
    agreements, losses = [], []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(cb.last_metrics["lit_ft/token_elimination/predictor_loss"])
            if "lit_ft/token_elimination/predictor_agreement" in cb.last_metrics:
                agreements.append(cb.last_metrics["lit_ft/token_elimination/predictor_agreement"])

    module.learning_rate = 0.0
    _trainer([cb, Spy()], max_steps=48).fit(module, datamodule=ListDataModule(n_batches=4, seq_len=64))
    assert len(agreements) == 8 and len(losses) == 48
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    assert last < 0.8 * first, (first, last)
    assert sum(agreements) / len(agreements) > 0.25 + 0.05, agreements


def test_default_regime_on_a_long_input():
    """The defaults (keep 0.5 from layer 2, segments of 256, sequences of >= 1024 tokens) on a 4-layer model."""
    module = _module(layers=4)
    cb = TokenElimination()
    _trainer([cb], max_steps=1).fit(module, datamodule=ListDataModule(n_batches=1, batch_size=1, seq_len=1024))
    m = cb.last_metrics
    assert set(k for k in m if "kept_fraction/layer_" in k) == {f"lit_ft/token_elimination/kept_fraction/layer_{i:02d}" for i in (2, 3)}
    assert abs(m["lit_ft/token_elimination/kept_fraction"] - 0.5) < 0.01 and m["lit_ft/token_elimination/exact_score"] == 1.0


def test_short_sequences_are_not_edited_by_default():
    module = _module(layers=4)
    cb = TokenElimination()
    _trainer([cb], max_steps=1).fit(module, datamodule=ListDataModule(n_batches=1, seq_len=64))
    assert cb.last_metrics == {}


def test_evaluation_and_generation_are_untouched():
    module = _module(layers=3)
    batch = random_batch(2, 32)
    module.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        ref = module.model(**inputs).loss
    ref_gen = greedy_generate(module.model, batch["input_ids"][:, :8])
    cb = TokenElimination(dense_layers=0, keep_ratio=0.25, **SMALL)
    _armed(cb, module, batch)  # armed as in a training batch: generation (a filled KV cache) is still not edited
    assert torch.equal(greedy_generate(module.model, batch["input_ids"][:, :8]), ref_gen)
    cb.on_train_batch_end(_trainer([]), module, None, batch, 0)
    cb.on_validation_batch_start(None, module, batch, 0)  # apply_in_eval=False: validation forwards are not edited
    assert not cb._active
    with torch.no_grad():
        torch.testing.assert_close(module.model(**inputs).loss, ref)
    cb.apply_in_eval = True  # asked: validation forwards are edited (predictor selection)
    cb.on_validation_batch_start(None, module, batch, 0)
    with torch.no_grad():
        edited = module.model(**inputs, use_cache=False).loss
    assert not torch.allclose(edited, ref)
    cb.on_validation_batch_end(None, module, None, batch, 0)
    cb.teardown(None, module, "fit")


def test_resume_restores_predictors_and_training_exactly(tmp_path):
    r = fit_and_resume(lambda: _module(layers=3),
                       lambda: [TokenElimination(dense_layers=1, calibration_steps=1, check_every_n_steps=3, **SMALL)],
                       tmp_path, max_steps=4, make_datamodule=lambda: ListDataModule(n_batches=2, seq_len=32))
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    a, b = r.callbacks_full[0], r.callbacks_resumed[0]
    assert_state_dicts_equal(a.predictors.state_dict(), b.predictors.state_dict())
    assert a._updates == b._updates == 2  # step 0 (calibration) and the check at step 3


def test_resume_with_a_changed_predictor_width_is_refused(tmp_path):
    from lit_ft.core.resume import ResumeArgumentError

    make = lambda: _module(layers=3)  # noqa: E731
    dm = lambda: ListDataModule(n_batches=2, seq_len=32)  # noqa: E731
    cb = TokenElimination(dense_layers=1, **SMALL)
    from lightning.pytorch.callbacks import ModelCheckpoint

    t = pl.Trainer(max_steps=2, logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                   callbacks=[cb, ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2)])
    t.fit(make(), datamodule=dm())
    ckpt = next(tmp_path.glob("*.ckpt"))
    with pytest.raises(ResumeArgumentError, match="predictor_hidden"):
        _trainer([TokenElimination(dense_layers=1, predictor_hidden=32, **SMALL)], max_steps=3).fit(
            make(), datamodule=dm(), ckpt_path=str(ckpt))


def test_gradient_checkpointing_selects_the_same_tokens():
    batch = random_batch(2, 32)

    def grads(checkpointing):
        module = _module(layers=3)
        if checkpointing:
            module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module.model.train()
        cb = TokenElimination(dense_layers=1, keep_ratio=0.5, **SMALL)
        return _loss_and_grads(module, batch, cb)

    (l1, g1), (l2, g2) = grads(False), grads(True)
    torch.testing.assert_close(l1, l2)
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-5, atol=1e-6, msg=n)


# -- drop-in and composition -------------------------------------------------------------------------------------------
def test_drop_in_on_a_plain_module_and_under_peft_lora():
    for module in (PlainHFModule(), LoraModule()):
        module.model.config._attn_implementation = "sdpa"
        cb = TokenElimination(dense_layers=1, **SMALL)
        _trainer([cb], max_steps=2).fit(module, datamodule=ListDataModule(n_batches=2, seq_len=32))
        assert cb.last_metrics["lit_ft/token_elimination/kept_fraction"] == pytest.approx(0.5, abs=0.06)


def test_alongside_token_selection_and_a_prompt():
    from lit_ft.callbacks import ExcessLossSelection, PromptTuning

    module = _module(layers=3)
    cb = TokenElimination(dense_layers=1, **SMALL)
    _trainer([ExcessLossSelection(keep_ratio=0.6, reference="initial"), PromptTuning(num_virtual_tokens=4), cb], max_steps=2).fit(
        module, datamodule=ListDataModule(n_batches=2, seq_len=32))
    assert torch.isfinite(torch.tensor(cb.last_metrics["lit_ft/token_elimination/kept_fraction"]))
    assert set(k for k in cb.last_metrics if "kept_fraction/layer_" in k) == {
        "lit_ft/token_elimination/kept_fraction/layer_01", "lit_ft/token_elimination/kept_fraction/layer_02"}


def test_plot_is_written(tmp_path):
    module = _module(layers=3)
    cb = TokenElimination(dense_layers=1, plot_every_n_steps=1, **SMALL)
    _trainer([cb], max_steps=1, default_root_dir=str(tmp_path)).fit(
        module, datamodule=ListDataModule(n_batches=1, seq_len=32))
    pngs = list(tmp_path.rglob("kept_by_layer_step0.png"))
    assert pngs and pngs[0].stat().st_size > 1000


# -- distributed -----------------------------------------------------------------------------------------------------
class _PredictorsEqualAcrossRanks(pl.Callback):
    def __init__(self, cb):
        self.cb = cb

    def on_train_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().flatten() for p in self.cb.predictors.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        if not torch.equal(gathered[0], gathered[1]):
            raise AssertionError("predictors differ across ranks")


def test_ddp_two_ranks_equal_one_process_and_share_predictors():
    torch.manual_seed(0)
    init = CausalLMModule(model_config=tiny_config()).state_dict()
    data = {k: torch.cat([random_batch(4, 32, seed=s)[k] for s in range(2)]) for k in
            ("input_ids", "attention_mask", "labels", "sample_idx")}

    def cbs():  # the exact score every step (calibration covers the run): selection does not depend on the predictor
        cb = TokenElimination(dense_layers=1, calibration_steps=10, **SMALL)
        return [cb, _PredictorsEqualAcrossRanks(cb)]

    single, _ = fit_global_batches("auto", 1, 8, init, data, [TokenElimination(dense_layers=1, calibration_steps=10, **SMALL)], steps=1)
    ddp, _ = fit_global_batches("ddp_spawn", 2, 4, init, data, cbs(), steps=1)
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
