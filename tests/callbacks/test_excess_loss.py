import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import ExcessLossSelection
from lit_ft.core import BatchKeyError, ModelLayoutError, shift_targets
from lit_ft.core.loss import causal_lm_token_nll
from lit_ft.modules import CausalLMModule

from helpers import ListDataModule, PlainHFModule, assert_state_dicts_equal, fit_and_resume, random_batch, tiny_config


def _trainer(callbacks, max_steps=3, **kw):
    return pl.Trainer(
        max_steps=max_steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks, limit_val_batches=0, **kw,
    )


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "x"])
def test_bad_keep_ratio_is_rejected(bad):
    with pytest.raises(ValueError, match="`keep_ratio` must be a number in \\(0, 1\\]"):
        ExcessLossSelection(keep_ratio=bad)


def test_defaults():
    cb = ExcessLossSelection()
    assert cb.keep_ratio == 0.6 and cb.reference is None and cb.integration == "auto"


def test_selection_matches_hand_computed_rho1_loss():
    """The loss equals the mean NLL over the top-k tokens by (current NLL - reference NLL), computed by hand."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    ref = CausalLMModule(model_config=tiny_config())  # a different random model as the reference
    cb = ExcessLossSelection(keep_ratio=0.4)
    trainer = _trainer([cb], max_steps=1)
    trainer.strategy.connect(module)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    cb._ref_model = ref.model.eval()
    batch = random_batch(4, 16, seed=3)
    cb.on_train_batch_start(trainer, module, batch, 0)
    module.train()
    out = module.compute_token_loss(batch, module.model)

    targets = shift_targets(batch["labels"])
    valid = targets != -100
    with torch.no_grad():
        cur = causal_lm_token_nll(module.model, batch)
        refn = causal_lm_token_nll(ref.model, batch)
    excess = (cur - refn)[valid]
    k = int(torch.ceil(torch.tensor(0.4 * valid.sum().item())))
    top = torch.topk(excess, k).indices
    expected = cur[valid][top].mean()
    assert out.n_tokens.item() == k
    torch.testing.assert_close(out.loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # kept tokens are exactly the highest-excess ones
    assert out.keep.sum() == k and (cur - refn)[out.keep].min() >= (cur - refn)[valid & ~out.keep].max()


def test_dropped_tokens_get_exactly_zero_gradient():
    """Gradient w.r.t. the final hidden state is zero exactly at dropped positions."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config())
    cb = ExcessLossSelection(keep_ratio=0.5)
    trainer = _trainer([cb], max_steps=1)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    batch = random_batch(2, 12, seed=5)
    cb.on_train_batch_start(trainer, module, batch, 0)
    captured = {}
    handle = module.model.model.norm.register_forward_hook(lambda m, i, o: captured.setdefault("h", o) and None)
    h_grad = {}
    def keep_grad(m, i, o):
        o.register_hook(lambda g: h_grad.setdefault("g", g))
    handle.remove()
    handle = module.model.model.norm.register_forward_hook(keep_grad)
    out = module.compute_token_loss(batch, module.model)
    out.loss.backward()
    handle.remove()
    g = h_grad["g"].abs().sum(-1)
    assert torch.all(g[~out.keep] == 0)
    assert torch.all(g[out.keep] > 0)


class _TopExcessProbe(pl.Callback):
    """Listed after ExcessLossSelection: before each step, the Rho-1 loss computed independently — the mean current
    NLL over the ceil(ratio * N) tokens of largest (current NLL - NLL of a fresh copy of the initial weights) — and,
    after the step, the loss the step returned."""

    def __init__(self, initial_model, ratio):
        self.initial, self.ratio, self.expected, self.returned, self.gap = initial_model, ratio, [], [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        valid = shift_targets(batch["labels"]) != -100
        with torch.no_grad():
            cur = causal_lm_token_nll(pl_module.model, batch)[valid]
            ref = causal_lm_token_nll(self.initial, batch)[valid]
        k = int(torch.ceil(torch.tensor(self.ratio * int(valid.sum()))))
        order = torch.sort(cur - ref, descending=True)
        self.gap.append(float(order.values[k - 1] - order.values[k]))  # margin of the k-th token over the next
        self.expected.append(float(cur[order.indices[:k]].mean()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.returned.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


def test_effect_in_a_trainer_and_metrics_logged():
    """In a real Trainer every step trains on exactly the top-50% excess-loss tokens: the loss each step returns is
    the mean NLL over the tokens an independent computation picks (step 0 is skipped: the model still equals the
    reference there, every excess is 0 and any half is a valid pick)."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)
    initial = CausalLMModule(model_config=tiny_config())
    initial.load_state_dict(module.state_dict())
    cb = ExcessLossSelection(keep_ratio=0.5)
    probe = _TopExcessProbe(initial.model.eval(), 0.5)
    trainer = _trainer([cb, probe], max_steps=4)
    trainer.fit(module, datamodule=ListDataModule())
    m = trainer.callback_metrics
    assert cb.level == "mixin"
    assert abs(float(m["lit_ft/excess_loss/kept_fraction"]) - 0.5) < 0.05
    assert len(probe.returned) == 4
    for step in range(1, 4):
        assert probe.gap[step] > 1e-6  # the top half is well defined at this step
        assert probe.returned[step] == pytest.approx(probe.expected[step], rel=1e-5, abs=1e-6), step


def _first_step_loss(module, cb, batch):
    trainer = _trainer([cb], max_steps=1)
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    cb.on_train_batch_start(trainer, module, batch, 0)
    module.train()
    return module


def test_same_loss_at_all_three_integration_levels():
    """Mixin (fused op), HF loss hook in a plain module, and batch-level label editing select the same tokens and
    give the same loss on the same weights."""
    torch.manual_seed(0)
    plain = PlainHFModule()
    state = plain.model.state_dict()
    batch = random_batch(4, 16, seed=7)

    mixin = CausalLMModule(model_config=tiny_config())
    mixin.model.load_state_dict(state)
    cb = ExcessLossSelection(keep_ratio=0.5)
    _first_step_loss(mixin, cb, dict(batch))
    cb._ref_model = PlainHFModule().model.eval()  # same (different-from-trained) reference everywhere
    ref_state = cb._ref_model.state_dict()
    cb.on_train_batch_start(cb and mixin.trainer, mixin, dict(batch), 0)
    loss_mixin = mixin.compute_token_loss(dict(batch), mixin.model).loss.detach()

    cb2 = ExcessLossSelection(keep_ratio=0.5, integration="hook")
    _first_step_loss(plain, cb2, dict(batch))
    cb2._ref_model.load_state_dict(ref_state)
    b2 = dict(batch)
    cb2.on_train_batch_start(plain.trainer, plain, b2, 0)
    loss_hook = plain.training_step(b2, 0).detach()
    assert cb2.level == "hook"

    plain3 = PlainHFModule()
    plain3.model.load_state_dict(state)
    cb3 = ExcessLossSelection(keep_ratio=0.5, integration="batch")
    _first_step_loss(plain3, cb3, dict(batch))
    cb3._ref_model.load_state_dict(ref_state)
    b3 = dict(batch)
    cb3.on_train_batch_start(plain3.trainer, plain3, b3, 0)
    loss_batch = plain3.training_step(b3, 0).detach()
    assert (b3["labels"] == -100).sum() > (batch["labels"] == -100).sum()  # labels were edited

    torch.testing.assert_close(loss_hook, loss_mixin, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_batch, loss_mixin, rtol=1e-5, atol=1e-5)


def test_plain_module_drop_in_trains_and_hook_is_removed():
    module = PlainHFModule()
    cb = ExcessLossSelection(keep_ratio=0.5)
    trainer = _trainer([cb], max_steps=3)
    trainer.fit(module, datamodule=ListDataModule())
    assert cb.level == "hook"
    assert abs(float(trainer.callback_metrics["lit_ft/excess_loss/kept_fraction"]) - 0.5) < 0.05
    assert "_loss_function" not in module.model.__dict__  # teardown restored HF's own loss


def test_missing_labels_key_names_it():
    module = PlainHFModule()
    cb = ExcessLossSelection()
    trainer = _trainer([cb], max_steps=1)
    batch = {"input_ids": torch.randint(0, 100, (2, 8)), "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    module.trainer = trainer
    cb.setup(trainer, module, "fit")
    with pytest.raises(BatchKeyError, match="'labels'"):
        cb.on_train_batch_start(trainer, module, batch, 0)


def test_non_hf_module_gets_clear_error():
    class NotHF(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Linear(2, 2)

    cb = ExcessLossSelection()
    with pytest.raises(ModelLayoutError, match="PreTrainedModel"):
        cb.setup(_trainer([cb]), NotHF(), "fit")


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    r = fit_and_resume(lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2),
                       lambda: [ExcessLossSelection(keep_ratio=0.5)], tmp_path)
    (cb_full,), (cb_res,) = r.callbacks_full, r.callbacks_resumed
    saved = torch.load(r.ckpt, weights_only=False)
    assert "reference_state" in saved["callbacks"][cb_full.state_key]
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    # the reference stayed the *initial* weights, not the weights at the checkpoint
    torch.manual_seed(0)
    init = CausalLMModule(model_config=tiny_config())
    assert_state_dicts_equal(init.model.state_dict(), cb_res._ref_model.state_dict())
    assert not torch.equal(init.model.lm_head.weight, r.resumed.model.lm_head.weight)
