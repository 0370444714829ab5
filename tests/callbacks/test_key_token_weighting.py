import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F

from lit_ft.callbacks import ExcessLossSelection, KeyTokenWeighting
from lit_ft.core import BatchKeyError
from lit_ft.core.loss import TokenScores, shift_targets
from lit_ft.modules import CausalLMModule

from helpers import (
    ListDataModule, PlainHFModule, SGDModule, fit_global_batches, random_batch, tiny_config,
)


def keyed_batch(batch_size=4, seq_len=16, seed=0, p=0.15):
    """random_batch + a bool key_token_mask (label space) on some labelled tokens; row 1 has none."""
    b = random_batch(batch_size, seq_len, seed=seed)
    g = torch.Generator().manual_seed(1000 + seed)
    mask = (torch.rand(b["labels"].shape, generator=g) < p) & (b["labels"] != -100)
    mask[0, 7] = True  # at least one key token
    mask[1] = False
    b["key_token_mask"] = mask
    # TL-Training's parameter boundaries (their own class): some other labelled tokens
    b["key_boundary_mask"] = (torch.rand(b["labels"].shape, generator=g) < 0.15) & (b["labels"] != -100) & ~mask
    return b


class KeyedListDataModule(ListDataModule):
    def __init__(self, n_batches=6, batch_size=4, seq_len=16):
        super().__init__(n_batches, batch_size, seq_len)
        self.batches = [keyed_batch(batch_size, seq_len, seed=i) for i in range(n_batches)]


def _trainer(callbacks, max_steps=3, **kw):
    return pl.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, **kw,
    )


def _attach(module, cb):
    trainer = _trainer([cb], max_steps=1)
    trainer.strategy.connect(module)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    module.train()
    return trainer


def hand_weights(labels, key_mask, w_max):
    """Plain-Python reference in target space: target t = label t+1; per sample w = min(N_other/N_key, w_max)
    on key targets when 0 < N_key < N_other."""
    B, T = labels.shape
    out = torch.ones(B, T)
    for i in range(B):
        tgt = [(t, int(labels[i, t + 1]) != -100, bool(key_mask[i, t + 1])) for t in range(T - 1)]
        n_key = sum(1 for _, v, k in tgt if v and k)
        n_other = sum(1 for _, v, k in tgt if v and not k)
        if 0 < n_key < n_other:
            for t, v, k in tgt:
                if v and k:
                    out[i, t] = min(n_other / n_key, w_max)
    return out


def hand_loss(hf_model, batch, w):
    logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = shift_targets(batch["labels"])
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    valid = targets != -100
    return (nll * w * valid).sum() / valid.sum()


# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.5, 0, -1.0, float("nan"), float("inf"), "9", True])
def test_bad_w_max_is_rejected(bad):
    with pytest.raises(ValueError, match="`w_max` must be a finite number >= 1"):
        KeyTokenWeighting(preset="whole_spans", w_max=bad)


def test_defaults_follow_the_paper_and_presets():
    cb = KeyTokenWeighting()
    assert cb.preset == "tl_training" and cb.normalize == "weights"  # TL-Training: boundaries, Σ w
    assert cb.w_max == 9.0 and cb.integration == "auto" and cb.token_needs == frozenset()
    assert "key_boundary_mask" in cb.required_batch_keys
    old = KeyTokenWeighting(preset="whole_spans")
    assert old.normalize == "tokens" and "key_boundary_mask" not in old.required_batch_keys
    assert KeyTokenWeighting(preset="whole_spans", normalize="weights").normalize == "weights"
    assert KeyTokenWeighting(normalize="tokens").normalize == "tokens"
    with pytest.raises(ValueError, match="`preset` must be one of .*'everything'"):
        KeyTokenWeighting(preset="everything")
    with pytest.raises(ValueError, match="`normalize` must be one of .*'mean'"):
        KeyTokenWeighting(normalize="mean")
    with pytest.raises(ValueError, match="`normalize`='weights'.*integration='batch'"):
        KeyTokenWeighting(integration="batch")
    assert cb.state_key != old.state_key


def test_weights_match_hand_computation():
    """Per sample: capped ratio, uncapped ratio, N_key >= N_other (no up-weighting), no keys, keys on ignored
    positions (not counted); the mask is shifted to target space."""
    T = 12
    labels = torch.full((5, T), -100)
    labels[:, 2:] = 7  # 10 labels per row -> 10 valid targets (positions 1..10)
    key = torch.zeros(5, T, dtype=torch.bool)
    key[0, 5] = True  # 1 key vs 9 others -> 9 (= cap)
    key[1, [3, 4, 9]] = True  # 3 vs 7 -> 7/3
    key[2, 2:8] = True  # 6 vs 4 -> no up-weighting
    key[4, [0, 1, 6]] = True  # label 0/1 are -100 (prompt): only label 6 counts -> 1 vs 9 -> capped at w_max
    batch = {"input_ids": torch.zeros(5, T, dtype=torch.long), "labels": labels, "key_token_mask": key}
    targets = shift_targets(labels)
    cb = KeyTokenWeighting(preset="whole_spans", w_max=4.0)
    d = cb.score_tokens(TokenScores(targets=targets, valid=targets != -100, batch=batch))
    expect = hand_weights(labels, key, 4.0)
    torch.testing.assert_close(d.weights, expect)
    assert d.keep is None
    assert d.weights[0, 4] == 4.0 and d.weights[0, 5] == 1.0  # label 5 -> target 4
    assert abs(float(d.weights[1, 2]) - 7 / 3) < 1e-6 and float(d.weights[2].max()) == 1.0
    assert float(d.weights[4, 5]) == 4.0 and float(d.weights[4, :5].max()) == 1.0
    # uncapped: 9 -> 9 with the default
    d9 = KeyTokenWeighting(preset="whole_spans").score_tokens(TokenScores(targets=targets, valid=targets != -100, batch=batch))
    torch.testing.assert_close(d9.weights, hand_weights(labels, key, 9.0))
    assert float(d9.weights[0, 4]) == 9.0
    valid = targets != -100
    n_key = (key[:, 1:] & (labels[:, 1:] != -100)).sum()
    assert float(d9.metrics["key_fraction"]) == pytest.approx(int(n_key) / int(valid.sum()))
    assert float(d9.metrics["samples_with_keys"]) == pytest.approx(4 / 5)
    # rows 0, 1, 4 up-weighted (9, 7/3, 9), row 2 has keys but N_key >= N_other (w = 1)
    assert float(d9.metrics["key_weight"]) == pytest.approx((9 + 7 / 3 + 1 + 9) / 4)
    w_sum = float((d9.weights * valid).sum())
    assert float(d9.metrics["weight_mean"]) == pytest.approx(w_sum / int(valid.sum()))
    none = dict(batch, key_token_mask=torch.zeros_like(key))
    d0 = KeyTokenWeighting(preset="whole_spans").score_tokens(TokenScores(targets=targets, valid=valid, batch=none))
    assert float(d0.metrics["key_weight"]) == 1.0 and torch.all(d0.weights == 1)
    # evaluation is not weighted
    assert KeyTokenWeighting(preset="whole_spans").score_tokens(
        TokenScores(targets=targets, valid=valid, batch=batch, training=False)).weights is None


def test_loss_and_gradients_equal_hand_weighted_loss():
    """Mixin: the value and the (finalised) gradients equal Σ w ℓ / N_valid computed by hand from HF logits."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    ref = CausalLMModule(model_config=tiny_config())
    ref.load_state_dict(module.state_dict())
    cb = KeyTokenWeighting(preset="whole_spans", w_max=9.0)
    trainer = _attach(module, cb)
    batch = keyed_batch(4, 16, seed=3)
    cb.on_train_batch_start(trainer, module, batch, 0)
    out = module.compute_token_loss(batch, module.model)
    out.loss.backward()
    w = hand_weights(batch["labels"], batch["key_token_mask"], 9.0)
    assert w.max() > 1  # the batch has up-weighted tokens
    torch.testing.assert_close(out.weights[out.keep], w[out.keep])
    expected = hand_loss(ref.model, batch, w)
    expected.backward()
    torch.testing.assert_close(out.loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)
    # and it is not the unweighted gradient
    ref.zero_grad()
    hand_loss(ref.model, batch, torch.ones_like(w)).backward()
    assert not torch.allclose(module.model.lm_head.weight.grad, ref.model.lm_head.weight.grad, atol=1e-6)


def _mixin_loss(state, batch, callbacks):
    module = CausalLMModule(model_config=tiny_config())
    module.model.load_state_dict(state)
    trainer = _trainer(callbacks, max_steps=1)
    trainer.strategy.connect(module)
    module.trainer = trainer
    for cb in callbacks:
        cb.setup(trainer, module, "fit")
    module.train()
    for cb in callbacks:
        cb.on_train_batch_start(trainer, module, batch, 0)
    return module, module.compute_token_loss(batch, module.model)


def test_hook_level_plain_module_and_batch_level_match_mixin():
    torch.manual_seed(0)
    plain = PlainHFModule()
    state = plain.model.state_dict()
    batch = keyed_batch(4, 16, seed=5)
    mixin, out = _mixin_loss(state, dict(batch), [KeyTokenWeighting(preset="whole_spans")])
    out.loss.backward()

    cb = KeyTokenWeighting(preset="whole_spans")  # auto -> hook on a plain module
    trainer = _attach(plain, cb)
    assert cb.level == "hook"
    b2 = dict(batch)
    cb.on_train_batch_start(trainer, plain, b2, 0)
    loss_hook = plain.training_step(b2, 0)  # key_token_mask rides along into the HF forward's kwargs
    loss_hook.backward()
    cb.on_before_optimizer_step(trainer, plain, None)
    torch.testing.assert_close(loss_hook.detach(), out.loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain.model.lm_head.weight.grad, mixin.model.lm_head.weight.grad, rtol=1e-4, atol=1e-6)
    assert "token_weights" not in b2

    # level batch with a TokenLossMixin module: weights go into batch["token_weights"] (label space)
    cb3 = KeyTokenWeighting(preset="whole_spans", integration="batch")
    b3 = dict(batch)
    _, out3 = _mixin_loss(state, b3, [cb3])
    assert cb3.level == "batch"
    w = hand_weights(batch["labels"], batch["key_token_mask"], 9.0)
    torch.testing.assert_close(b3["token_weights"][:, 1:], w[:, :-1])
    torch.testing.assert_close(out3.loss.detach(), out.loss.detach(), rtol=1e-5, atol=1e-6)

    # level batch with a plain module: nobody would consume token_weights -> refuse
    plain4 = PlainHFModule()
    cb4 = KeyTokenWeighting(preset="whole_spans", integration="batch")
    trainer4 = _attach(plain4, cb4)
    with pytest.raises(TypeError, match="integration='auto'"):
        cb4.on_train_batch_start(trainer4, plain4, dict(batch), 0)


def test_all_false_mask_is_plain_sft():
    torch.manual_seed(0)
    state = CausalLMModule(model_config=tiny_config()).model.state_dict()
    batch = keyed_batch(4, 16, seed=2)
    batch["key_token_mask"] = torch.zeros_like(batch["key_token_mask"])
    _, out = _mixin_loss(state, dict(batch), [KeyTokenWeighting(preset="whole_spans")])
    _, plain = _mixin_loss(state, dict(batch), [])
    assert torch.all(out.weights == 1)
    torch.testing.assert_close(out.loss.detach(), plain.loss.detach(), rtol=1e-6, atol=1e-7)


def test_composes_with_excess_loss_weights_multiply_on_kept_tokens():
    torch.manual_seed(0)
    state = CausalLMModule(model_config=tiny_config()).model.state_dict()
    ref_state = CausalLMModule(model_config=tiny_config()).model.state_dict()  # a different reference
    batch = keyed_batch(4, 16, seed=4, p=0.3)

    def excess():
        return ExcessLossSelection(keep_ratio=0.5, reference="initial")

    ex_alone = excess()
    mod_a, _ = _mixin_loss(state, dict(batch), [ex_alone])
    ex_alone._ref_model.load_state_dict(ref_state)
    ex_alone.on_train_batch_start(mod_a.trainer, mod_a, batch, 0)
    out_alone = mod_a.compute_token_loss(batch, mod_a.model)

    ex_both, kt = excess(), KeyTokenWeighting(preset="whole_spans")
    mod_b, _ = _mixin_loss(state, dict(batch), [ex_both, kt])
    ex_both._ref_model.load_state_dict(ref_state)
    ex_both.on_train_batch_start(mod_b.trainer, mod_b, batch, 0)
    out = mod_b.compute_token_loss(batch, mod_b.model)

    w = hand_weights(batch["labels"], batch["key_token_mask"], 9.0)
    assert torch.equal(out.keep, out_alone.keep)  # the selection is unchanged (AND with no key-token mask)
    torch.testing.assert_close(out.weights, w)
    up = out.keep & (w > 1)
    assert up.any() and (~out.keep & (w > 1)).any()  # some up-weighted tokens kept, some dropped
    with torch.no_grad():
        from lit_ft.core.loss import causal_lm_token_nll

        nll = causal_lm_token_nll(mod_b.model, batch)
    expected = (nll * w)[out.keep].sum() / out.keep.sum()
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out.loss.detach(), out_alone.loss.detach())


def test_effect_in_a_trainer_and_metrics_logged():
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    cb = KeyTokenWeighting(preset="whole_spans")
    trainer = _trainer([cb], max_steps=3)
    trainer.fit(module, datamodule=KeyedListDataModule())
    m = trainer.callback_metrics
    assert cb.level == "mixin"
    assert 0 < float(m["lit_ft/key_token_weighting/key_fraction"]) < 0.5
    assert float(m["lit_ft/key_token_weighting/key_weight"]) > 1
    assert float(m["lit_ft/key_token_weighting/weight_mean"]) > 1
    assert float(m["lit_ft/tokens/kept_fraction"]) == 1.0
    assert torch.isfinite(m["train/loss"])


def test_end_to_end_with_sft_datamodule_tool_calls(tiny_tokenizer_path, tmp_path):
    """SFTDataModule(key_spans='tool_call') -> key_token_mask -> weights, in a real Trainer on a plain module."""
    from lit_ft.data import SFTDataModule

    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    rows = [{"messages": [{"role": "user", "content": f"Weather in town {i}?"},
                          {"role": "assistant", "content": call},
                          {"role": "user", "content": "Function result: 21"},
                          {"role": "assistant", "content": "It is 21 degrees and sunny in the town today."}]}
            for i in range(8)]
    path = tmp_path / "calls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = SFTDataModule(data=str(path), val_data=str(path), tokenizer=tiny_tokenizer_path, key_spans="tool_call",
                       batch_size=4)
    module = PlainHFModule()
    cb = KeyTokenWeighting(preset="whole_spans")
    trainer = _trainer([cb], max_steps=2)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert cb.level == "hook"
    assert float(m["lit_ft/key_token_weighting/key_fraction"]) > 0
    assert float(m["lit_ft/key_token_weighting/samples_with_keys"]) == 1.0
    assert float(m["lit_ft/key_token_weighting/key_weight"]) > 1


def test_missing_or_malformed_key_token_mask():
    module = PlainHFModule()
    cb = KeyTokenWeighting(preset="whole_spans")
    trainer = _attach(module, cb)
    batch = random_batch(2, 8)
    with pytest.raises(BatchKeyError, match=r"'key_token_mask'.*key_spans"):
        cb.on_train_batch_start(trainer, module, batch, 0)
    cb2 = KeyTokenWeighting(preset="whole_spans")
    trainer2 = _attach(module, cb2)
    bad = keyed_batch(2, 8)
    bad["key_token_mask"] = bad["key_token_mask"].long()
    with pytest.raises(TypeError, match="key_token_mask'\\] must have a bool dtype"):
        cb2.on_train_batch_start(trainer2, module, bad, 0)
    cb3 = KeyTokenWeighting(preset="whole_spans")
    trainer3 = _attach(module, cb3)
    bad = keyed_batch(2, 8)
    bad["key_token_mask"] = bad["key_token_mask"][:, :-1]
    with pytest.raises(ValueError, match="must match token for token"):
        cb3.on_train_batch_start(trainer3, module, bad, 0)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["tl_training", "whole_spans"])
def test_ddp_two_ranks_equal_one_big_batch(preset):
    torch.manual_seed(0)
    init = SGDModule(model_config=tiny_config()).state_dict()
    data = keyed_batch(8, 16, seed=2, p=0.2)
    data["labels"][:4, 3:12] = -100  # rank 0 holds far fewer tokens than rank 1
    data["key_token_mask"] &= data["labels"] != -100
    data["key_boundary_mask"] &= data["labels"] != -100
    single, _ = fit_global_batches("auto", 1, 8, init, data, [KeyTokenWeighting(preset=preset)])
    ddp, _ = fit_global_batches("ddp_spawn", 2, 4, init, data, [KeyTokenWeighting(preset=preset)])
    moved = False
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(single[name], init[name])
    assert moved


# -- the paper's preset: first name token + divergence points up-weighted, boundaries their own class, Σ w --------


def _tl_case():
    """A hand-built batch (T = 12; labels 2..11 carry a loss -> 10 valid targets per row), marks in label space."""
    T = 12
    labels = torch.full((4, T), -100)
    labels[:, 2:] = 7
    key = torch.zeros(4, T, dtype=torch.bool)
    bound = torch.zeros(4, T, dtype=torch.bool)
    key[0, 2] = True  # the first name token
    bound[0, [6, 9]] = True  # two argument values end here
    key[1, [2, 4]] = True  # first name token + where the name parts from another candidate
    bound[1, 11] = True
    bound[2, 5] = True  # no key token
    key[3, 2:7] = True  # 5 keys vs 3 others: not up-weighted
    bound[3, [8, 10]] = True
    return {"input_ids": torch.zeros(4, T, dtype=torch.long), "labels": labels, "key_token_mask": key,
            "key_boundary_mask": bound}


def test_tl_training_weights_and_sum_w_by_hand():
    """Row 0: N_key = 1, N_other = 10 - 1 - 2 boundaries = 7 -> w = 7 (whole_spans counts the boundaries as
    others: 9). Row 1: 2 keys, 1 boundary -> 7 / 2 = 3.5. Row 2: no key. Row 3: 5 keys >= 3 others -> 1.
    Σ w over the valid targets: (7 + 2 + 7) + (2·3.5 + 1 + 7) + 10 + 10 = 51."""
    batch = _tl_case()
    targets = shift_targets(batch["labels"])
    valid = targets != -100
    cb = KeyTokenWeighting()
    d = cb.score_tokens(TokenScores(targets=targets, valid=valid, batch=batch))
    expect = torch.ones(4, 12)
    expect[0, 1] = 7.0  # label 2 -> target 1
    expect[1, [1, 3]] = 3.5
    expect[:, -1] = 1.0
    torch.testing.assert_close(d.weights * valid, expect * valid)
    assert float(cb.token_normaliser(batch)) == 51.0
    # the named option keeps the earlier rule: boundaries are ordinary tokens (row 0: 1 key vs 9 others -> 9)
    old = KeyTokenWeighting(preset="whole_spans")
    d_old = old.score_tokens(TokenScores(targets=targets, valid=valid, batch=batch))
    assert float(d_old.weights[0, 1]) == 9.0 and float(d_old.weights[1, 1]) == 4.0  # 2 keys vs 8 others
    assert old.token_normaliser(batch) is None  # the valid-token count
    assert float(KeyTokenWeighting(preset="whole_spans", normalize="weights").token_normaliser(batch)) == (
        9 + 9) + (2 * 4 + 8) + 10 + 10


def _tl_hand_loss(hf_model, batch, w):
    logits = hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    targets = shift_targets(batch["labels"])
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    valid = targets != -100
    return (nll * w * valid).sum() / (w * valid).sum()


def hand_tl_weights(labels, key_mask, boundary, w_max=9.0):
    """Plain-Python reference of TL-Training's rule in target space (boundaries outside N_other)."""
    B, T = labels.shape
    out = torch.ones(B, T)
    for i in range(B):
        tgt = [(t, int(labels[i, t + 1]) != -100, bool(key_mask[i, t + 1]), bool(boundary[i, t + 1]))
               for t in range(T - 1)]
        n_key = sum(1 for _, v, k, _ in tgt if v and k)
        n_other = sum(1 for _, v, k, b in tgt if v and not k and not b)
        if 0 < n_key < n_other:
            for t, v, k, _ in tgt:
                if v and k:
                    out[i, t] = min(n_other / n_key, w_max)
    return out


@pytest.mark.parametrize("integration", ["mixin", "hook"])
def test_tl_training_loss_and_gradients_equal_sum_w_normalised_hand_loss(integration):
    """The value and the gradients equal Σ w ℓ / Σ w (TL-Training's loss) from HF logits, at both levels."""
    torch.manual_seed(0)
    if integration == "mixin":
        module = CausalLMModule(model_config=tiny_config())
        ref = CausalLMModule(model_config=tiny_config())
    else:
        module, ref = PlainHFModule(), PlainHFModule()
    ref.load_state_dict(module.state_dict())
    cb = KeyTokenWeighting(integration=integration)
    trainer = _attach(module, cb)
    batch = keyed_batch(4, 16, seed=3)
    cb.on_train_batch_start(trainer, module, batch, 0)
    loss = module.compute_token_loss(batch, module.model).loss if integration == "mixin" else \
        module.training_step(dict(batch), 0)
    loss.backward()
    w = hand_tl_weights(batch["labels"], batch["key_token_mask"], batch["key_boundary_mask"])
    assert w.max() > 1
    expected = _tl_hand_loss(ref.model, batch, w)
    expected.backward()
    torch.testing.assert_close(loss.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    for (n, p), (_, q) in zip(module.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=n)
    # not the token-count normalisation: Σ w > N, so the gradient is smaller by exactly N / Σ w
    valid = shift_targets(batch["labels"]) != -100
    ratio = float(valid.sum()) / float((w * valid).sum())
    assert ratio < 0.9
    ref.zero_grad()
    hand_loss(ref.model, batch, w).backward()
    torch.testing.assert_close(module.model.lm_head.weight.grad, ref.model.lm_head.weight.grad * ratio,
                               rtol=1e-4, atol=1e-7)


def test_sum_w_normalisation_is_exact_under_gradient_accumulation():
    """2 micro-batches x 2 (accumulate 2) train exactly like one batch of 4: Σ w is counted over the whole window
    before its first backward, not per micro-batch (the micro-batches' Σ w differ a lot here)."""
    torch.manual_seed(0)
    init = SGDModule(model_config=tiny_config()).state_dict()
    data = keyed_batch(4, 16, seed=6, p=0.2)
    data["labels"][:2, 3:13] = -100  # the first micro-batch holds far fewer tokens (and less Σ w)
    data["key_token_mask"] &= data["labels"] != -100
    data["key_boundary_mask"] &= data["labels"] != -100
    cb = KeyTokenWeighting()
    halves = [{k: v[i : i + 2] for k, v in data.items()} for i in (0, 2)]
    sums = [float(cb.token_normaliser(h)) for h in halves]
    assert sums[1] > 1.5 * sums[0]
    big, _ = fit_global_batches("auto", 1, 4, init, data, [KeyTokenWeighting()])
    acc, _ = fit_global_batches("auto", 1, 2, init, data, [KeyTokenWeighting()], accumulate=2)
    tokens, _ = fit_global_batches("auto", 1, 4, init, data, [KeyTokenWeighting(normalize="tokens")])
    differs = False
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-7, msg=name)
        differs |= not torch.allclose(tokens[name], big[name], atol=1e-6)
    assert differs  # Σ w and the token count train differently (the test can tell them apart)


def test_tl_training_needs_the_boundary_mask():
    module = PlainHFModule()
    cb = KeyTokenWeighting()
    trainer = _attach(module, cb)
    batch = keyed_batch(2, 8)
    del batch["key_boundary_mask"]
    with pytest.raises(BatchKeyError, match=r"'key_boundary_mask'.*key_spans='tl_training'.*whole_spans"):
        cb.on_train_batch_start(trainer, module, batch, 0)


def test_two_sum_w_normalisers_are_refused():
    module = CausalLMModule(model_config=tiny_config())
    a, b = KeyTokenWeighting(w_max=9.0), KeyTokenWeighting(w_max=4.0)
    trainer = _trainer([a, b], max_steps=1)
    trainer.strategy.connect(module)
    module.trainer = trainer
    a.setup(trainer, module, "fit")
    b.setup(trainer, module, "fit")
    module.train()
    with pytest.raises(ValueError, match="several token scorers normalise.*normalize='tokens'"):
        a.on_train_batch_start(trainer, module, keyed_batch(2, 8), 0)


def test_end_to_end_tl_training_with_sft_datamodule(tiny_tokenizer_path, tmp_path):
    """SFTDataModule(key_spans='tl_training') -> key_token_mask (first name token + divergence point) and
    key_boundary_mask (argument value ends) -> the default callback, in a real Trainer."""
    from lit_ft.data import SFTDataModule

    tools = "Functions:\n" + "\n".join(json.dumps({"name": n, "description": n}) for n in ("get_weather", "get_news"))
    call = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
    rows = [{"messages": [{"role": "system", "content": tools},
                          {"role": "user", "content": f"Weather in town {i}?"},
                          {"role": "assistant", "content": call},
                          {"role": "user", "content": "Function result: 21"},
                          {"role": "assistant", "content": "It is 21 degrees and sunny in the town today."}]}
            for i in range(8)]
    path = tmp_path / "calls.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = SFTDataModule(data=str(path), val_data=str(path), tokenizer=tiny_tokenizer_path, key_spans="tl_training",
                       batch_size=4)
    module = PlainHFModule()
    cb = KeyTokenWeighting()
    trainer = _trainer([cb], max_steps=2)
    trainer.fit(module, datamodule=dm)
    batch = next(iter(dm.train_dataloader()))
    assert batch["key_boundary_mask"].any(1).all() and not (batch["key_boundary_mask"] & batch["key_token_mask"]).any()
    m = trainer.callback_metrics
    assert float(m["lit_ft/key_token_weighting/samples_with_keys"]) == 1.0
    assert float(m["lit_ft/key_token_weighting/key_weight"]) > 1
