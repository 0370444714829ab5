"""MultiTokenHeads (CAFT): the heads' term vs an fp64 reference built the authors' way, schedules, Trainer effect,
heads-only pre-training, save/load, resume, exactness under accumulation and DDP, level 2, errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils._python_dispatch import TorchDispatchMode

from lit_ft.callbacks.objectives.multi_token_heads import MultiTokenHeads, schedule_value
from lit_ft.core.introspect import causal_lm_parts
from lit_ft.core.loss import ObjectiveInputs
from lit_ft.core.loss.primitives import final_hidden_states, shift_targets
from lit_ft.core.multi_token_heads import HeadsError
from lit_ft.modules import CausalLMModule
from tests.helpers import (
    ListDataModule,
    PlainHFModule,
    SGDModule,
    assert_state_dicts_equal,
    fit_and_resume,
    quiet_trainer,
    random_batch,
    snapshot_params,
    tiny_config,
)


def _module(dtype=torch.float32, **kw):
    torch.manual_seed(0)
    m = CausalLMModule(model_config=tiny_config(**kw))
    return m.to(dtype)


def _inputs(module, batch, weights=None, keep=None):
    hf = module.model
    parts = causal_lm_parts(hf)
    hidden = final_hidden_states(parts, batch)
    targets = shift_targets(batch["labels"])
    valid = targets != -100
    keep = valid if keep is None else keep & valid
    return ObjectiveInputs(targets=targets, valid=valid, keep=keep, weights=weights, batch=batch, training=True,
                           level="mixin", hidden=hidden, head=parts), hidden


def _reference(cb, module, hidden, batch, weights, keep_main):
    """The authors' formulation in fp64: every head's full logits, head k (1..K) scored on labels[:, 1+k:] against
    logits[:, :-(1+k)], mean over that head's targets, hcoef · decay^k · c per head."""
    outs = cb.heads(hidden, module.model, batch)
    w = module.model.lm_head.weight
    labels = batch["labels"]
    total = torch.zeros((), dtype=torch.float64)
    for k, out in enumerate(outs, start=1):
        logits = F.linear(out, w)[:, : -(1 + k)]
        tgt = labels[:, 1 + k:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1).clamp_min(0), reduction="none")
        ce = ce.reshape(tgt.shape)
        kept = (tgt != -100) & keep_main[:, k:-1]  # the main term's entry of the token head k predicts
        wk = weights[:, k:-1] if weights is not None else torch.ones_like(ce)
        n_k = (tgt != -100).sum()
        total = total + cb.heads_coefficient * cb.decay ** k * (torch.where(kept, ce * wk, 0.0).sum() / n_k)
    return total


@pytest.mark.parametrize("head_arch", ["transformer", "linear"])
@pytest.mark.parametrize("with_weights, with_keep", [(False, False), (True, True)])
def test_term_and_gradients_equal_the_fp64_reference(head_arch, with_weights, with_keep):
    module = _module(torch.float64)
    cb = MultiTokenHeads(num_heads=3, head_arch=head_arch, heads_coefficient=0.7, decay=0.6, chunk_size=5)
    cb.install(module)
    if head_arch == "linear":  # zero-initialised heads are the identity: give them something to do
        for p in cb.heads.parameters():
            torch.nn.init.normal_(p, std=0.3)
    batch = random_batch(batch_size=3, seq_len=11, prompt_len=2, seed=4)
    g = torch.Generator().manual_seed(1)
    weights = torch.rand(3, 11, generator=g, dtype=torch.float64) * 2 if with_weights else None
    keep = torch.rand(3, 11, generator=g) < 0.7 if with_keep else None
    inputs, hidden = _inputs(module, batch, weights, keep)
    ours = cb.objective_loss(inputs) / cb.objective_normaliser(cb.objective_counts(batch))
    ref = _reference(cb, module, hidden, batch, weights, inputs.keep)
    params = [p for p in cb.heads.parameters()] + [module.model.lm_head.weight, hidden]
    g_ours = torch.autograd.grad(ours, params, retain_graph=True, allow_unused=True)
    g_ref = torch.autograd.grad(ref, params, allow_unused=True)
    torch.testing.assert_close(ours, ref)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    assert any(a is not None and torch.count_nonzero(a) > 0 for a in g_ours[:-2])


def test_level_three_never_builds_full_logits():
    module = _module()
    cb = MultiTokenHeads(num_heads=4, chunk_size=4)
    cb.install(module)
    batch = random_batch(batch_size=2, seq_len=16, prompt_len=0, seed=1)
    inputs, _ = _inputs(module, batch)
    vocab = module.model.config.vocab_size
    vocab_wide, ops = [], []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            ops.append(str(func))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor) and t.dim() > 1 and t.shape[-1] == vocab:
                    vocab_wide.append((str(func), tuple(t.shape)))
            return out

    with Record():
        cb.objective_loss(inputs).backward()
    # every vocabulary-wide product happens inside the fused op, in [chunk, V] blocks (tests/kernels/test_token_ce.py
    # bounds them); nothing outside it has a V-wide output, so no [N, V] or [K, N, V] logits exist
    assert sum("lit_ft.token_ce" in o for o in ops) == 1
    assert not vocab_wide, vocab_wide


@pytest.mark.parametrize("schedule, step, total, expected", [
    ("rsine", 0, 10, 1.0), ("rsine", 5, 10, math.sin(math.pi / 4)), ("sine", 5, 10, math.sin(math.pi / 4)),
    ("linear", 3, 10, 0.3), ("constant", 7, 10, 1.0), ("sine_0.5", 2, 10, math.sin(0.4 * math.pi / 2)),
    ("sine_0.5", 6, 10, 1.0), ("rsine", 3, 0, 1.0),
])
def test_schedules(schedule, step, total, expected):
    assert schedule_value(schedule, step, total) == pytest.approx(expected)


def test_trainer_steps_train_the_heads_and_change_the_base_update():
    """CAFT's extra term moves the base model differently from plain SFT (same seed, data, steps), the heads train
    away from their initial copy, and the coefficient follows rsine over max_steps."""
    def run(callbacks):
        module = _module()
        trainer = quiet_trainer(callbacks, max_steps=3, limit_val_batches=0)
        trainer.fit(module, datamodule=ListDataModule(n_batches=3))
        return module, trainer

    plain, _ = run([])
    cb = MultiTokenHeads(heads_coefficient=1.0)
    caft, trainer = run([cb])
    caft_state = caft.state_dict()
    diff = max((caft_state[n] - p).abs().max().item() for n, p in plain.state_dict().items())
    assert diff > 1e-5
    # the coefficient logged at the last step (global step 2 of 3): sin(pi/2 * 1/3)
    assert float(trainer.callback_metrics["lit_ft/multi_token_heads/coefficient"]) == pytest.approx(
        math.sin(math.pi / 6))
    assert torch.isfinite(trainer.callback_metrics["lit_ft/multi_token_heads/ce_head1"])
    initial = _fresh_heads().state_dict()
    assert not all(torch.equal(initial[n], p) for n, p in cb.heads.state_dict().items())


def _fresh_heads():
    module = _module()
    cb = MultiTokenHeads()
    cb.install(module)
    return cb.heads


def test_heads_only_pretraining_freezes_the_base_then_saves_and_loads(tmp_path):
    module = _module()
    before = snapshot_params(module)
    cb = MultiTokenHeads(heads_only=True, learning_rate=1e-2, save_dir=str(tmp_path / "heads"))
    trainer = quiet_trainer([cb], max_steps=4, limit_val_batches=0)
    trainer.fit(module, datamodule=ListDataModule(n_batches=4))
    moved = {n for n, p in module.named_parameters() if n not in before or not torch.equal(p, before[n])}
    assert moved and all(n.startswith("lit_ft_heads.multi_token_heads.") for n in moved)
    assert all(p.requires_grad for p in module.model.parameters())  # the plan ends with the fit
    assert trainer.callback_metrics["lit_ft/multi_token_heads/coefficient"] == 1.0
    # saved heads load into a fresh run; inference drops them
    saved = {n: p.detach().clone() for n, p in cb.heads.named_parameters()}
    cb.remove()
    assert not any(n.startswith("lit_ft_heads") for n, _ in module.named_parameters())
    fresh = MultiTokenHeads(heads_path=str(tmp_path / "heads"))
    fresh.install(_module())
    for n, p in fresh.heads.named_parameters():
        torch.testing.assert_close(p, saved[n], rtol=0, atol=0)
    with pytest.raises(HeadsError, match="num_heads"):
        MultiTokenHeads(num_heads=2, heads_path=str(tmp_path / "heads")).install(_module())
    with pytest.raises(HeadsError, match="has no heads.safetensors"):
        MultiTokenHeads(heads_path=str(tmp_path)).install(_module())


def test_checkpoint_resume_is_identical(tmp_path):
    r = fit_and_resume(lambda: CausalLMModule(model_config=tiny_config()),
                       lambda: [MultiTokenHeads(heads_coefficient=0.5)], tmp_path, accumulate_grad_batches=2,
                       make_datamodule=lambda: ListDataModule(n_batches=4), ckpt_name="epoch=0-step=2.ckpt")
    assert any(k.startswith("lit_ft_heads.") for k in r.full.state_dict())
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())


def _data():
    data = random_batch(8, 16, prompt_len=3, seed=2)
    data["labels"][:2, 3:12] = -100  # very unequal supervised counts across micro-batches / ranks
    return data


class _GradCapture(pl.Callback):
    def __init__(self, path) -> None:
        self.path = str(path)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.is_global_zero:
            torch.save({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None},
                       self.path)


def _grads(tmp_path, batch_size, accumulate=1, strategy="auto", devices=1, make="causal"):
    data = _data()
    batches = [{k: v[i: i + batch_size] for k, v in data.items()} for i in range(0, 8, batch_size)]
    torch.manual_seed(0)
    module = SGDModule(model_config=tiny_config()) if make == "causal" else PlainHFModule()
    path = tmp_path / f"{make}-{batch_size}-{accumulate}-{devices}.pt"
    t = pl.Trainer(accelerator="cpu", strategy=strategy, devices=devices, max_steps=1,
                   accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   callbacks=[MultiTokenHeads(heads_coefficient=1.0, decay=0.9), _GradCapture(path)],
                   use_distributed_sampler=True)
    t.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return torch.load(path)


def _assert_same_grads(a, b):
    assert a.keys() == b.keys() and any(k.startswith("lit_ft_heads") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7, msg=k)
    assert all(torch.count_nonzero(a[k]) > 0 for k in a if k.startswith("lit_ft_heads"))


@pytest.mark.parametrize("make", ["causal", "plain"])
def test_exact_under_gradient_accumulation(tmp_path, make):
    """4 micro-batches of 2 with accumulation == one batch of 8 (very unequal supervised counts per micro-batch)."""
    _assert_same_grads(_grads(tmp_path, 2, accumulate=4, make=make), _grads(tmp_path, 8, make=make))


@pytest.mark.slow
def test_exact_under_two_process_ddp(tmp_path):
    """2 gloo ranks x batch 4 == 1 process x batch 8."""
    _assert_same_grads(_grads(tmp_path, 4, strategy="ddp_spawn", devices=2), _grads(tmp_path, 8))


def test_drop_in_on_a_plain_module_runs_at_level_two():
    torch.manual_seed(0)
    module = PlainHFModule()
    cb = MultiTokenHeads(heads_coefficient=1.0)
    before = None
    trainer = quiet_trainer([cb], max_steps=2)
    trainer.fit(module, datamodule=ListDataModule(n_batches=2))
    assert cb.level is None  # detached at teardown
    assert torch.isfinite(trainer.callback_metrics["lit_ft/multi_token_heads/loss"])
    assert before is None and cb._capture_handle is None


def test_level_two_term_equals_level_three():
    """The hook path (trunk output captured) and the mixin path give the same objective gradients."""
    a = _grads_on(make="causal")
    b = _grads_on(make="plain")
    for name in a:
        if name.startswith("lit_ft_heads"):
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)


def _grads_on(make):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        return _grads(Path(d), 8, make=make)


def test_packed_batches_and_missing_labels_are_refused():
    module = _module()
    cb = MultiTokenHeads()
    batch = random_batch(2, 8)
    batch["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]] * 2)
    batch["packed_sample_idx"] = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]] * 2)  # what SFTDataModule(packing=True) adds
    batch.pop("attention_mask")
    trainer = quiet_trainer([cb], max_steps=1)
    with pytest.raises(ValueError, match="packed"):
        trainer.fit(module, train_dataloaders=DataLoader([batch], batch_size=None))
    cb2 = MultiTokenHeads()
    with pytest.raises(KeyError, match="labels"):
        quiet_trainer([cb2], max_steps=1).fit(_module(), train_dataloaders=DataLoader(
            [{"input_ids": batch["input_ids"]}], batch_size=None))


@pytest.mark.parametrize("arg, value", [
    ("num_heads", 0), ("head_arch", "mlp"), ("init_layer", 1.5), ("heads_coefficient", -1.0), ("decay", 0.0),
    ("schedule", "cosine"), ("schedule", "sine_2"), ("heads_only", "yes"), ("chunk_size", 0),
])
def test_bad_arguments_are_named(arg, value):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        MultiTokenHeads(**{arg: value})


def test_init_layer_out_of_range_is_named():
    with pytest.raises(HeadsError, match="init_layer"):
        MultiTokenHeads(init_layer=50).install(_module())


def test_transformer_heads_copy_the_chosen_layer():
    module = _module()
    cb = MultiTokenHeads(num_heads=2, init_layer=-1)
    cb.install(module)
    last = module.model.model.layers[-1].state_dict()
    for head in cb.heads.heads:
        for k, v in head.state_dict().items():
            torch.testing.assert_close(v, last[k], rtol=0, atol=0)


def test_composes_with_a_token_selection_callback():
    """With ExcessLossSelection keeping 60% of the tokens, each head's count is scaled by that share and the heads
    train on the tokens it keeps."""
    from lit_ft.callbacks import ExcessLossSelection

    seen = []

    class Spy(MultiTokenHeads):
        def objective_loss(self, inputs):
            seen.append((self._keep_ratio(), int(inputs.keep.sum()), int(inputs.valid.sum())))
            return super().objective_loss(inputs)

    cb = Spy(heads_coefficient=1.0)
    trainer = quiet_trainer([ExcessLossSelection(keep_ratio=0.6, reference="initial"), cb], max_steps=2,
                            limit_val_batches=0)
    trainer.fit(_module(), datamodule=ListDataModule(n_batches=2))
    assert seen and all(r == pytest.approx(0.6) and kept < valid for r, kept, valid in seen)
    assert torch.isfinite(trainer.callback_metrics["lit_ft/multi_token_heads/ce_head2"])
