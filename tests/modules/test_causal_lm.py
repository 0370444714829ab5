import lightning.pytorch as pl
import pytest
import torch

from lit_ft.core.loss import TokenPipeline, install_token_loss_hook, remove_token_loss_hook
from lit_ft.modules import CausalLMModule, ClassificationModule

from helpers import ListDataModule, PlainHFModule, random_batch, tiny_config


def test_token_loss_equals_hf_loss():
    module = CausalLMModule(model_config=tiny_config())
    batch = random_batch(4, 16)
    module.eval()
    with torch.no_grad():
        ours = module.compute_token_loss(batch, module.model).loss
        hf = module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)


def test_training_gradients_equal_hf_loss_gradients():
    module = CausalLMModule(model_config=tiny_config())
    batch = random_batch(4, 16)
    module.train()
    module.compute_token_loss(batch, module.model).loss.backward()
    ours = {n: p.grad.clone() for n, p in module.model.named_parameters()}
    module.zero_grad()
    module.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
    for n, p in module.model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_weight_grad_accumulation_reaches_the_fused_op(monkeypatch):
    """bf16 model, 'input' accumulation: the training loss goes through the op with that setting and the lm_head
    gradient stays bf16 and close to the fp32-accumulated one."""
    import lit_ft.kernels

    real_op, seen = lit_ft.kernels.fused_linear_token_ce, []

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weight_grad_accumulation"))
        return real_op(*args, **kwargs)

    monkeypatch.setattr(lit_ft.kernels, "fused_linear_token_ce", spy)
    torch.manual_seed(0)
    grads = {}
    batch = random_batch(4, 16)
    for mode in ("fp32", "input"):
        torch.manual_seed(0)
        m = CausalLMModule(model_config=tiny_config(), torch_dtype="bfloat16", loss_weight_grad_accumulation=mode)
        m.train()
        m.compute_token_loss(batch, m.model).loss.backward()
        grads[mode] = m.model.lm_head.weight.grad
    assert seen == ["fp32", "input"]
    assert grads["input"].dtype == torch.bfloat16
    torch.testing.assert_close(grads["input"].float(), grads["fp32"].float(), rtol=0,
                               atol=2e-2 * grads["fp32"].abs().max().item())


class _HFLossModule(CausalLMModule):
    """The same module, optimiser and logging, but the loss is transformers' own (logits + F.cross_entropy)."""

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                          labels=batch["labels"]).loss
        self.log("train/loss", loss.detach(), batch_size=batch["input_ids"].shape[0])
        return loss


class _LossCurve(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(trainer.callback_metrics["train/loss"].item())


def test_twenty_adamw_steps_follow_the_hf_loss_curve():
    """A tiny Llama trained 20 AdamW steps through the fused op (no logits tensor) and through the HF loss from the
    same weights on the same batches: the loss curves agree step by step, and the loss does go down."""
    torch.manual_seed(0)
    fused = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, loss_impl="torch")
    hf = _HFLossModule(model_config=tiny_config(), learning_rate=1e-2)
    hf.load_state_dict(fused.state_dict())
    fused.model.lm_head.forward = None  # the fused path must not call the lm_head module (logits)
    curves = {}
    for name, module in (("fused", fused), ("hf", hf)):
        curve = _LossCurve()
        trainer = pl.Trainer(max_steps=20, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, callbacks=[curve])
        trainer.fit(module, datamodule=ListDataModule(n_batches=5))
        curves[name] = torch.tensor(curve.losses)
    assert len(curves["fused"]) == 20
    assert curves["fused"][-1] < curves["fused"][0] - 1.0
    torch.testing.assert_close(curves["fused"], curves["hf"], rtol=2e-3, atol=2e-3)


def test_no_logits_tensor_in_a_training_step():
    """The lm_head module is never called: the loss comes from hidden states + lm_head.weight via the fused op."""
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2)

    def boom(*a, **k):
        raise AssertionError("lm_head forward was called: logits were materialised")

    module.model.lm_head.forward = boom
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_training_reduces_loss():
    module = CausalLMModule(model_config=tiny_config(), learning_rate=2e-2)
    trainer = pl.Trainer(max_epochs=8, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, limit_val_batches=1)
    dm = ListDataModule(n_batches=2)
    before = module.compute_token_loss(dm.batches[0], module.model).mean.item()
    trainer.fit(module, datamodule=dm)
    after = module.compute_token_loss(dm.batches[0], module.model).mean.item()
    assert after < before - 0.5


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    a = CausalLMModule(model_config=tiny_config())
    b = CausalLMModule(model_config=tiny_config(), gradient_checkpointing=True)
    b.load_state_dict(a.state_dict())
    batch = random_batch(2, 12)
    for m in (a, b):
        m.train()
        m.compute_token_loss(batch, m.model).loss.backward()
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_weight_decay_groups_exclude_norms_and_embeddings():
    module = CausalLMModule(model_config=tiny_config(), weight_decay=0.1)
    opt = module.configure_optimizers()
    by_decay = {g["weight_decay"]: g["param_names"] for g in opt.param_groups}
    assert any("norm" in n for n in by_decay[0.0]) and any("embed" in n for n in by_decay[0.0])
    assert all("norm" not in n and "embed" not in n for n in by_decay[0.1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"learning_rate": 0}, "learning_rate"),
        ({"weight_decay": -1}, "weight_decay"),
        ({"torch_dtype": "float8"}, "torch_dtype"),
        ({"loss_impl": "cuda"}, "loss_impl"),
        ({"loss_weight_grad_accumulation": "bf16"}, "loss_weight_grad_accumulation"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"model_config": {"hidden_size": 8}}, "model_type"),
        # wrong types (found by the matrix's fuzz column): named, not a bare TypeError from a comparison
        ({"learning_rate": None}, "`learning_rate`"),
        ({"weight_decay": float("nan")}, "`weight_decay`"),
        ({"warmup_steps": 1.5}, "`warmup_steps`"),
        ({"torch_dtype": [-1]}, "`torch_dtype`"),
        ({"loss_impl": None}, "`loss_impl`"),
        ({"num_hidden_layers": "2"}, "`num_hidden_layers`"),
        ({"num_hidden_layers": 2 ** 40}, "`num_hidden_layers` keeps the first N of the model's 2"),
        ({"eval_exact_match": None}, "`eval_exact_match`"),
        ({"max_new_tokens": 0}, "`max_new_tokens`"),
        ({"gradient_checkpointing": 1}, "`gradient_checkpointing`"),
        ({"eval_before_training": "yes"}, "`eval_before_training`"),
        ({"model": ""}, "`model`"),
        ({"model_config": [1]}, "`model_config`"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs.setdefault("model_config", tiny_config())
    with pytest.raises(ValueError, match=match):
        CausalLMModule(**kwargs)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(Exception, match="(?i)asset|not found|no such"):
        CausalLMModule(model="definitely-not-a-model")


def test_hf_loss_hook_install_and_remove_restore_hf_loss():
    plain = PlainHFModule()
    batch = random_batch(2, 10)
    plain.eval()
    with torch.no_grad():
        before = plain.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        pipe = TokenPipeline()
        install_token_loss_hook(plain.model, pipe)
        assert install_token_loss_hook(plain.model, pipe) is plain.model.loss_function  # idempotent
        hooked = plain.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
        remove_token_loss_hook(plain.model)
        after = plain.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(hooked, before, rtol=1e-5, atol=1e-6)  # no scorer: plain mean CE
    assert torch.equal(after, before)
    with pytest.raises(RuntimeError, match="another LightningModule"):
        install_token_loss_hook(plain.model, pipe)
        install_token_loss_hook(plain.model, TokenPipeline())


def test_classification_module_trains():
    cfg = {"model_type": "bert", "vocab_size": 384, "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64}
    module = ClassificationModule(model_config=cfg, num_labels=2, learning_rate=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 384, (16, 10), generator=g)
    labels = torch.arange(16) % 2
    ids[:, 0] = 100 + labels  # learnable signal in the first token
    batches = [{"input_ids": ids[i:i + 4], "attention_mask": torch.ones(4, 10, dtype=torch.long),
                "labels": labels[i:i + 4], "sample_idx": torch.arange(i, i + 4)} for i in range(0, 16, 4)]
    dl = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer = pl.Trainer(max_epochs=15, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, train_dataloaders=dl, val_dataloaders=dl)
    assert float(trainer.callback_metrics["val/acc"]) == 1.0
    with pytest.raises(ValueError, match="num_labels"):
        ClassificationModule(model_config=cfg, num_labels=1)


@pytest.mark.parametrize("kwargs, name", [
    ({"learning_rate": None}, "learning_rate"), ({"weight_decay": "0"}, "weight_decay"),
    ({"num_labels": [2]}, "num_labels"), ({"num_labels": 2.0}, "num_labels"), ({"model": 3}, "model"),
    ({"model_config": "bert"}, "model_config"),
])
def test_classification_module_wrong_types_are_named(kwargs, name):
    """A wrong type is refused naming the argument, not with a comparison's bare TypeError (the matrix's fuzz rule)."""
    kwargs.setdefault("model_config", {"model_type": "bert", "vocab_size": 384, "hidden_size": 32,
                                       "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64})
    with pytest.raises(ValueError, match=f"ClassificationModule: `{name}` must be"):
        ClassificationModule(**kwargs)
