"""ProMoT: stage 1 trains only the prompt, stage 2 the model with the prompt attached (frozen unless asked);
optimizer groups/state at the switch; evaluation without the prompt; resume in either stage."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from lit_ft.callbacks import ProMoT
from lit_ft.callbacks._param_plan import param_plans_for
from lit_ft.core.frozen import frozen_copy
from lit_ft.core.optim import verify_optimizer
from lit_ft.modules import CausalLMModule
from tests.helpers import (
    AdamWPlain, ListDataModule, LoraModule, PlainHFModule, assert_state_dicts_equal, check_generation,
    fit_and_resume, tiny_config,
)

N = 4
PROMPT = "lit_ft_prompts.prompt.embedding.weight"


def make_module(kind):
    torch.manual_seed(0)
    if kind == "causal":
        return CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    return {"plain": AdamWPlain, "peft": LoraModule}[kind]()


class Snapshots(pl.Callback):
    """State after every step (runs after ProMoT's on_train_batch_end, so the step-k snapshot is post-switch)."""

    def __init__(self):
        self.states, self.opt_views = [], []

    def on_train_start(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        opt = trainer.optimizers[0]
        names = {id(p): n for n, p in pl_module.named_parameters()}
        groups = {names[id(p)]: (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
        state = {names[id(p)]: int(s["step"]) for p, s in opt.state.items() if "step" in s}
        self.opt_views.append((groups, state))
        promot = next(c for c in trainer.callbacks if isinstance(c, ProMoT))
        if promot.stage == 2:  # after the switch the optimizer holds exactly what the composed plan trains
            verify_optimizer(opt, pl_module, param_plans_for(pl_module).composed)


def fit(module, callbacks, max_steps=4, n_batches=2, **kw):
    t = pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", limit_val_batches=0, **kw)
    t.fit(module, datamodule=ListDataModule(n_batches=n_batches))
    return t


def moved(a, b, keys):
    return [k for k in keys if not torch.equal(a[k], b[k])]


@pytest.mark.parametrize("kind", ["causal", "plain", "peft"])
def test_stage1_trains_the_prompt_stage2_the_model(kind):
    module = make_module(kind)
    cb = ProMoT(num_virtual_tokens=N, learning_rate=0.05, prompt_steps=2, model_learning_rate=3e-3)
    snap = Snapshots()
    t = fit(module, [cb, snap])
    s = snap.states  # s[0] = start, s[k] = after step k
    model_keys = [k for k in s[0] if not k.startswith("lit_ft_")]
    trainable_model = [n for n, p in module.named_parameters() if p.requires_grad and not n.startswith("lit_ft_")]
    assert cb.stage == 2 and cb.switch_step == 2
    for k in (1, 2):  # stage 1: the backbone (and LoRA) bit-identical under AdamW(weight_decay=0.1); the prompt moves
        assert moved(s[0], s[k], model_keys) == []
        assert not torch.equal(s[k][PROMPT], s[k - 1][PROMPT])
    # stage 2: the prompt is frozen (bit-identical), every tensor the module trains moves
    for k in (3, 4):
        assert torch.equal(s[k][PROMPT], s[2][PROMPT])
    assert trainable_model and set(moved(s[2], s[4], trainable_model)) == set(trainable_model)
    if kind == "peft":  # PEFT's frozen base weights stay frozen: ProMoT never unfreezes what the module froze
        assert all("lora_" in n for n in trainable_model)
        base = [k for k in model_keys if "lora_" not in k]
        assert moved(s[0], s[4], base) == []
    assert not cb.source.embedding.weight.requires_grad
    assert t.callback_metrics["lit_ft/promot/stage"] == 2.0


def test_optimizer_groups_and_state_at_the_switch():
    module = make_module("causal")
    cb = ProMoT(num_virtual_tokens=N, learning_rate=0.05, prompt_steps=2, model_learning_rate=3e-3,
                model_weight_decay=0.2)
    snap = Snapshots()
    fit(module, [cb, snap])
    groups1, state1 = snap.opt_views[0]  # after step 1 (stage 1)
    assert set(groups1) == {PROMPT} and groups1[PROMPT][0] == 0.05 and state1 == {PROMPT: 1}
    groups2, state2 = snap.opt_views[1]  # right after the switch (end of step 2)
    assert PROMPT not in groups2 and state2 == {}  # the prompt's state deleted; the model starts fresh
    model = [n for n, p in module.named_parameters() if not n.startswith("lit_ft_")]
    assert set(groups2) == set(model)
    for n in model:
        lr, wd = groups2[n]
        assert lr == 3e-3
        no_decay = "norm" in n or "embed" in n or n.endswith("bias")
        assert wd == (0.0 if no_decay else 0.2), n
    _, state3 = snap.opt_views[2]
    assert state3 == {n: 1 for n in model}


def test_train_prompt_in_stage2_keeps_its_state_and_lr():
    module = make_module("causal")
    cb = ProMoT(num_virtual_tokens=N, learning_rate=0.05, prompt_steps=2, train_prompt_in_stage2=True)
    snap = Snapshots()
    fit(module, [cb, snap])
    groups2, state2 = snap.opt_views[1]
    assert groups2[PROMPT][0] == 0.05 and state2 == {PROMPT: 2}  # kept: lr and Adam moments
    # model lr defaults to the optimizer's base lr (CausalLMModule learning_rate) and its weight decay
    assert groups2["model.model.layers.0.self_attn.q_proj.weight"] == (1e-2, 0.1)
    assert not torch.equal(snap.states[4][PROMPT], snap.states[2][PROMPT])


def test_prompt_epochs_switch_at_epoch_start():
    module = make_module("causal")
    cb = ProMoT(num_virtual_tokens=N, prompt_epochs=1)
    snap = Snapshots()
    fit(module, [cb, snap], max_steps=4, n_batches=2)
    assert cb.switch_step == 2 and cb.stage == 2
    assert snap.opt_views[1][0].keys() == {PROMPT}  # end of epoch 0: still stage 1
    assert PROMPT not in snap.opt_views[2][0]


class CaptureVal(PlainHFModule):
    def validation_step(self, batch, batch_idx):
        self.val_logits = self.model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        return None


@pytest.mark.parametrize("eval_prompt", ["with", "without"])
def test_eval_without_prompt_runs_the_bare_model(eval_prompt):
    torch.manual_seed(0)
    module = CaptureVal()
    cb = ProMoT(num_virtual_tokens=N, prompt_steps=1, eval_prompt=eval_prompt)
    t = pl.Trainer(max_steps=2, callbacks=[cb], logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, accelerator="cpu", limit_val_batches=1, val_check_interval=2,
                   num_sanity_val_steps=0)
    t.fit(module, datamodule=ListDataModule(n_batches=2))
    batch = ListDataModule(n_batches=2).batches[0]
    hf = module.model.eval()
    bare = frozen_copy(hf)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if eval_prompt == "without":
        torch.testing.assert_close(module.val_logits, bare, rtol=0, atol=0)
    else:
        assert not torch.allclose(module.val_logits, bare)
    assert cb.injector.enabled and cb.injector.active  # training runs with the prompt again
    assert not torch.allclose(hf(input_ids=batch["input_ids"]).logits, frozen_copy(hf)(input_ids=batch["input_ids"]).logits)


@pytest.mark.parametrize("prompt_steps", [3, 2], ids=["resume_in_stage1", "resume_in_stage2"])
def test_resume_equals_uninterrupted(tmp_path, prompt_steps):
    r = fit_and_resume(
        lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1, warmup_steps=3),
        lambda: [ProMoT(num_virtual_tokens=N, learning_rate=0.05, prompt_steps=prompt_steps, model_learning_rate=3e-3)],
        tmp_path)
    ckpt = torch.load(r.ckpt, weights_only=False)
    saved_stage = next(v for k, v in ckpt["callbacks"].items() if "ProMoT" in k)["stage"]
    assert saved_stage == (1 if prompt_steps == 3 else 2)
    (cb_full,), (cb_res,) = r.callbacks_full, r.callbacks_resumed
    assert cb_full.stage == cb_res.stage == 2 and cb_full.switch_step == cb_res.switch_step == prompt_steps
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    o_full, o_res = r.trainer_full.optimizers[0], r.trainer_resumed.optimizers[0]
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in o_full.param_groups] == \
        [(g["lr"], g["weight_decay"], len(g["params"])) for g in o_res.param_groups]
    full_state = o_full.state_dict()["state"]
    res_state = o_res.state_dict()["state"]
    assert full_state.keys() == res_state.keys()
    for k in full_state:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(full_state[k][name], res_state[k][name], rtol=0, atol=0)


def test_state_dict_round_trip():
    cb = ProMoT()
    cb.stage, cb.switch_step = 2, 7
    other = ProMoT()
    other.load_state_dict(cb.state_dict())
    assert (other.stage, other.switch_step) == (2, 7)
    assert ProMoT().prompt_steps == 100 and ProMoT(prompt_epochs=2).prompt_steps is None


def test_prompt_steps_and_prompt_epochs_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        ProMoT(prompt_steps=3, prompt_epochs=1)


def test_artifact_and_generate_with_the_trained_model(tmp_path):
    from lit_ft.core.prompts import attach_prompt

    module = make_module("causal")
    cb = ProMoT(num_virtual_tokens=N, learning_rate=0.05, prompt_steps=2, save_dir=str(tmp_path / "art"))
    fit(module, [cb])
    hf = module.model.eval()
    ids = torch.randint(3, 300, (2, 6))
    ref = hf(input_ids=ids).logits
    fresh = frozen_copy(hf)  # the stage-2 weights, no lit_ft hooks
    assert not torch.allclose(fresh(input_ids=ids).logits, ref)
    attach_prompt(fresh, str(tmp_path / "art"))  # the stage-1 prompt saved at fit end
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)
    check_generation(hf, ids[:1], steps=4)


def test_wrong_seed_type_names_the_class_and_argument():
    """The matrix's fuzz column found a text seed raising int()'s ValueError without the argument's name."""
    with pytest.raises(ValueError, match="ProMoT: `seed` must be an int"):
        ProMoT(seed="x1")
