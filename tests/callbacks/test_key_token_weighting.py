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
        KeyTokenWeighting(w_max=bad)


def test_defaults():
    cb = KeyTokenWeighting()
    assert cb.w_max == 9.0 and cb.integration == "auto" and cb.token_needs == frozenset()


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
    cb = KeyTokenWeighting(w_max=4.0)
    d = cb.score_tokens(TokenScores(targets=targets, valid=targets != -100, batch=batch))
    expect = hand_weights(labels, key, 4.0)
    torch.testing.assert_close(d.weights, expect)
    assert d.keep is None
    assert d.weights[0, 4] == 4.0 and d.weights[0, 5] == 1.0  # label 5 -> target 4
    assert abs(float(d.weights[1, 2]) - 7 / 3) < 1e-6 and float(d.weights[2].max()) == 1.0
    assert float(d.weights[4, 5]) == 4.0 and float(d.weights[4, :5].max()) == 1.0
    # uncapped: 9 -> 9 with the default
    d9 = KeyTokenWeighting().score_tokens(TokenScores(targets=targets, valid=targets != -100, batch=batch))
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
    d0 = KeyTokenWeighting().score_tokens(TokenScores(targets=targets, valid=valid, batch=none))
    assert float(d0.metrics["key_weight"]) == 1.0 and torch.all(d0.weights == 1)
    # evaluation is not weighted
    assert KeyTokenWeighting().score_tokens(
        TokenScores(targets=targets, valid=valid, batch=batch, training=False)).weights is None


def test_loss_and_gradients_equal_hand_weighted_loss():
    """Mixin: the value and the (finalised) gradients equal Σ w ℓ / N_valid computed by hand from HF logits."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    ref = CausalLMModule(model_config=tiny_config())
    ref.load_state_dict(module.state_dict())
    cb = KeyTokenWeighting(w_max=9.0)
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
    mixin, out = _mixin_loss(state, dict(batch), [KeyTokenWeighting()])
    out.loss.backward()

    cb = KeyTokenWeighting()  # auto -> hook on a plain module
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
    cb3 = KeyTokenWeighting(integration="batch")
    b3 = dict(batch)
    _, out3 = _mixin_loss(state, b3, [cb3])
    assert cb3.level == "batch"
    w = hand_weights(batch["labels"], batch["key_token_mask"], 9.0)
    torch.testing.assert_close(b3["token_weights"][:, 1:], w[:, :-1])
    torch.testing.assert_close(out3.loss.detach(), out.loss.detach(), rtol=1e-5, atol=1e-6)

    # level batch with a plain module: nobody would consume token_weights -> refuse
    plain4 = PlainHFModule()
    cb4 = KeyTokenWeighting(integration="batch")
    trainer4 = _attach(plain4, cb4)
    with pytest.raises(TypeError, match="integration='auto'"):
        cb4.on_train_batch_start(trainer4, plain4, dict(batch), 0)


def test_all_false_mask_is_plain_sft():
    torch.manual_seed(0)
    state = CausalLMModule(model_config=tiny_config()).model.state_dict()
    batch = keyed_batch(4, 16, seed=2)
    batch["key_token_mask"] = torch.zeros_like(batch["key_token_mask"])
    _, out = _mixin_loss(state, dict(batch), [KeyTokenWeighting()])
    _, plain = _mixin_loss(state, dict(batch), [])
    assert torch.all(out.weights == 1)
    torch.testing.assert_close(out.loss.detach(), plain.loss.detach(), rtol=1e-6, atol=1e-7)


def test_composes_with_excess_loss_weights_multiply_on_kept_tokens():
    torch.manual_seed(0)
    state = CausalLMModule(model_config=tiny_config()).model.state_dict()
    ref_state = CausalLMModule(model_config=tiny_config()).model.state_dict()  # a different reference
    batch = keyed_batch(4, 16, seed=4, p=0.3)

    def excess():
        return ExcessLossSelection(keep_ratio=0.5)

    ex_alone = excess()
    mod_a, _ = _mixin_loss(state, dict(batch), [ex_alone])
    ex_alone._ref_model.load_state_dict(ref_state)
    ex_alone.on_train_batch_start(mod_a.trainer, mod_a, batch, 0)
    out_alone = mod_a.compute_token_loss(batch, mod_a.model)

    ex_both, kt = excess(), KeyTokenWeighting()
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
    cb = KeyTokenWeighting()
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
    cb = KeyTokenWeighting()
    trainer = _trainer([cb], max_steps=2)
    trainer.fit(module, datamodule=dm)
    m = trainer.callback_metrics
    assert cb.level == "hook"
    assert float(m["lit_ft/key_token_weighting/key_fraction"]) > 0
    assert float(m["lit_ft/key_token_weighting/samples_with_keys"]) == 1.0
    assert float(m["lit_ft/key_token_weighting/key_weight"]) > 1


def test_missing_or_malformed_key_token_mask():
    module = PlainHFModule()
    cb = KeyTokenWeighting()
    trainer = _attach(module, cb)
    batch = random_batch(2, 8)
    with pytest.raises(BatchKeyError, match=r"'key_token_mask'.*key_spans"):
        cb.on_train_batch_start(trainer, module, batch, 0)
    cb2 = KeyTokenWeighting()
    trainer2 = _attach(module, cb2)
    bad = keyed_batch(2, 8)
    bad["key_token_mask"] = bad["key_token_mask"].long()
    with pytest.raises(TypeError, match="key_token_mask'\\] must have a bool dtype"):
        cb2.on_train_batch_start(trainer2, module, bad, 0)
    cb3 = KeyTokenWeighting()
    trainer3 = _attach(module, cb3)
    bad = keyed_batch(2, 8)
    bad["key_token_mask"] = bad["key_token_mask"][:, :-1]
    with pytest.raises(ValueError, match="must match token for token"):
        cb3.on_train_batch_start(trainer3, module, bad, 0)


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_big_batch():
    torch.manual_seed(0)
    init = SGDModule(model_config=tiny_config()).state_dict()
    data = keyed_batch(8, 16, seed=2, p=0.2)
    data["labels"][:4, 3:12] = -100  # rank 0 holds far fewer tokens than rank 1
    data["key_token_mask"] &= data["labels"] != -100
    single, _ = fit_global_batches("auto", 1, 8, init, data, [KeyTokenWeighting()])
    ddp, _ = fit_global_batches("ddp_spawn", 2, 4, init, data, [KeyTokenWeighting()])
    moved = False
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(single[name], init[name])
    assert moved
