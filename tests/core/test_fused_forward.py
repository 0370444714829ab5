"""lit_ft.core.loss.fused_forward (patch_fused_loss) and the FusedLoss callback: the patched model's loss and
gradients equal HF's own for every supported family, no [N, V] tensor is built, the level-2 token pipeline keeps
working through it, and unpatching restores the model exactly."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lit_ft.callbacks import FusedLoss
from lit_ft.callbacks.token_selection import ExcessLossSelection
from lit_ft.core.loss import installed_hook, token_pipeline_for
from lit_ft.core.loss.fused_forward import (
    FusedLossUnsupportedError,
    fused_patch_of,
    patch_fused_loss,
    unpatch_fused_loss,
)

from helpers import ListDataModule, PlainHFModule, quiet_trainer, random_batch, tiny_hf_model

V = 96
_COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": _COMMON,
    "qwen2": _COMMON,
    "mistral": _COMMON,
    "gemma": dict(_COMMON, head_dim=8),
    "gemma2": dict(_COMMON, head_dim=8, final_logit_softcapping=3.0),  # soft-cap (small, so it bites)
    "phi3": dict(_COMMON, pad_token_id=0),
    "cohere": dict(_COMMON, logit_scale=0.5),  # logit scale
    "gpt2": dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_neox": dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64),
    "qwen3": dict(_COMMON, head_dim=8),
    "olmo2": _COMMON,
    "gemma3_text": dict(_COMMON, head_dim=8, final_logit_softcapping=3.0),
    "phi": dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    # MoE: the router's auxiliary loss is added to the loss the way the model's forward adds it
    "mixtral": dict(_COMMON, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True),
}


def _model(family: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**FAMILIES.get(family, _COMMON), **overrides})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    for m in model.modules():  # dropout off (train mode for the loss path; random masks would differ between runs)
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.train()


def _batch(seed: int = 0, b: int = 3, t: int = 12) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, t), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    attn = torch.ones_like(ids)
    attn[0, t - 4:] = 0  # right padding
    labels[0, t - 4:] = -100
    labels[1, 5:7] = -100  # ignored tokens mid-sequence
    return {"input_ids": ids, "attention_mask": attn, "labels": labels}


def _loss_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    out = model(**batch, **kw)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _assert_same(ref, got, grads_ref, grads_got, what=""):
    torch.testing.assert_close(got.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=1e-6, msg=f"{what} loss")
    assert grads_ref.keys() == grads_got.keys() and len(grads_ref) > 0
    for name in grads_ref:
        torch.testing.assert_close(grads_got[name], grads_ref[name], rtol=1e-4, atol=2e-6, msg=f"{what} {name}")


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_loss_and_gradients_equal_hf(family):
    model = _model(family)
    batch = _batch()
    ref, g_ref = _loss_and_grads(model, batch)
    full_logits = ref.logits.detach()
    with patch_fused_loss(model) as patch:
        got, g_got = _loss_and_grads(model, batch)
        assert patch.calls == 1 and patch.keeps_one_logit
        # only the last position's logits were built, and they are the model's own
        assert got.logits.shape == (3, 1, V)
        torch.testing.assert_close(got.logits.detach(), full_logits[:, -1:], rtol=1e-5, atol=1e-5)
    _assert_same(ref, got, g_ref, g_got, family)
    assert type(got) is type(ref) and got.to_tuple()[0] is got.loss  # loss first, as HF returns it
    if family == "mixtral":
        assert got.aux_loss is not None  # precondition: the aux term is part of both losses


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_num_items_in_batch_and_shift_labels_follow_hf(family):
    model = _model(family)
    batch = _batch(1)
    n = torch.tensor(37)  # HF divides the summed loss by it (its gradient-accumulation normaliser)
    ref, g_ref = _loss_and_grads(model, batch, num_items_in_batch=n)
    with patch_fused_loss(model):
        got, g_got = _loss_and_grads(model, batch, num_items_in_batch=n)
        _assert_same(ref, got, g_ref, g_got, "num_items")
        shifted = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
        b2 = {k: v for k, v in batch.items() if k != "labels"}
        got2, g_got2 = _loss_and_grads(model, b2, shift_labels=shifted, num_items_in_batch=n)
        _assert_same(ref, got2, g_ref, g_got2, "shift_labels")
        # labels given positionally (LlamaForCausalLM.forward: input_ids, attention_mask, position_ids,
        # cache, inputs_embeds, labels) are found too
        model.zero_grad(set_to_none=True)
        got3 = model(batch["input_ids"], batch["attention_mask"], None, None, None, batch["labels"],
                     num_items_in_batch=n)
        torch.testing.assert_close(got3.loss, ref.loss, rtol=1e-5, atol=1e-6)
    ref_mean, _ = _loss_and_grads(model, batch)
    assert not torch.isclose(ref_mean.loss, ref.loss)  # precondition: num_items changes the value


def test_peft_lora_model_through_the_inner_model():
    """Under PEFT the innermost transformers model is patched (PEFT's forward reaches it by attribute): the LoRA
    gradients equal the unpatched ones."""
    from helpers import LoraModule

    from lit_ft.core.introspect import find_hf_model

    try:
        module = LoraModule()
    except ImportError as err:  # peft refuses an installed torchao it does not support (an environment problem)
        pytest.skip(f"peft cannot build a LoRA model here: {err}")
    batch = random_batch(3, 12, seed=3)
    batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    ref, g_ref = _loss_and_grads(module.model, batch)
    inner = find_hf_model(module, require_lm_head=True)
    with patch_fused_loss(inner) as patch:
        got, g_got = _loss_and_grads(module.model, batch)
        assert patch.calls == 1
    assert any("lora_" in n for n in g_ref)
    _assert_same(ref, got, g_ref, g_got, "lora")


def test_a_callers_logits_to_keep_is_kept():
    model = _model("llama")
    batch = _batch()
    ref, g_ref = _loss_and_grads(model, batch)
    with patch_fused_loss(model):
        got, g_got = _loss_and_grads(model, batch, logits_to_keep=0)  # HF: 0 = every position
    assert got.logits.shape == ref.logits.shape
    _assert_same(ref, got, g_ref, g_got, "logits_to_keep=0")


def test_calls_without_labels_are_the_original_forward():
    model = _model("llama").eval()
    ids = _batch()["input_ids"]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with patch_fused_loss(model) as patch:
            out = model(input_ids=ids)
            gen = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            assert patch.calls == 0
        gen_ref = model.generate(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1]), max_new_tokens=3,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
    assert out.loss is None and out.logits.shape == ref.shape
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=0)
    assert gen.tolist() == gen_ref.tolist()


def test_unpatch_restores_the_exact_forward_and_a_second_patch_is_refused():
    model = _model("llama")
    cls_forward = type(model).forward
    assert "forward" not in model.__dict__
    patch = patch_fused_loss(model, chunk_size=8)
    assert "forward" in model.__dict__ and fused_patch_of(model) is patch
    assert model.forward.__wrapped__.__func__ is cls_forward  # functools.wraps: the signature is the original's
    with pytest.raises(RuntimeError, match="already patched"):
        patch_fused_loss(model)
    assert unpatch_fused_loss(model) is True
    assert "forward" not in model.__dict__ and model.forward.__func__ is cls_forward
    assert fused_patch_of(model) is None and unpatch_fused_loss(model) is False
    # the trunk hook went too: the trunk has no forward hooks left
    assert not model.model._forward_hooks
    # an instance-level forward that was there before (another wrapper) comes back as the same object
    def other(*args, **kwargs):
        return cls_forward(model, *args, **kwargs)

    model.forward = other
    with pytest.warns(UserWarning, match="no `logits_to_keep`"):  # (*args, **kwargs): nothing to tell
        patch = patch_fused_loss(model)
    with patch:
        assert model.forward is not other
    assert model.__dict__["forward"] is other


def test_refuses_logit_transforms_the_op_does_not_apply():
    # Granite's logits_scaling and FalconH1's lm_head_multiplier are supported (lit_ft.core.introspect, tested in
    # tests/reliability/test_logit_transforms.py); on a model type that does not use them they are refused
    with pytest.raises(FusedLossUnsupportedError, match=r"`logits_scaling`=4\.0"):
        patch_fused_loss(_model("llama", logits_scaling=4.0))
    with pytest.raises(FusedLossUnsupportedError, match=r"`lm_head_multiplier`=0\.5"):
        patch_fused_loss(_model("llama", lm_head_multiplier=0.5))
    model = _model("llama")
    model.config.output_multiplier = 2.0
    with pytest.raises(FusedLossUnsupportedError, match="output_multiplier"):
        patch_fused_loss(model)
    assert "forward" not in model.__dict__  # refused before anything was installed
    model.config.output_multiplier = 1.0  # a factor of 1 changes nothing: accepted
    unpatch_fused_loss(patch_fused_loss(model).hf_model)
    # attn_logit_softcapping acts inside attention, not on the output: gemma2 is accepted (tested above)


def test_an_unknown_logit_transform_is_caught_at_the_first_call():
    """A transform no config key names (here a hook doubling the lm_head's output) is caught by comparing the
    model's own last-position logits with lm_head(hidden): the call raises and the model is left unpatched."""
    model = _model("llama")
    model.lm_head.register_forward_hook(lambda mod, args, out: out * 2.0)
    patch_fused_loss(model)
    with pytest.raises(FusedLossUnsupportedError, match="transforms its logits"):
        model(**_batch())
    assert fused_patch_of(model) is None and "forward" not in model.__dict__


class _LargeTensors(TorchDispatchMode):
    """Records every op output with a dimension of size V and at least N * V elements."""

    def __init__(self, n: int, v: int) -> None:
        super().__init__()
        self.n, self.v, self.seen = n, v, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.v in t.shape and t.numel() >= self.n * self.v:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_no_n_by_v_tensor_is_built():
    """Forward + backward of the patched model create no tensor with a V-sized dimension and >= N·V elements (the
    unpatched model does: its logits); N > hidden size, so the [V, D] weight and its gradient stay below N·V."""
    model = _model("llama", vocab_size=512)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (4, 16), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    n = ids.numel()
    assert n > 32  # precondition: N > D
    with _LargeTensors(n, 512) as control:
        model(**batch).loss.backward()
    assert control.seen  # the check sees the unpatched model's logits
    with patch_fused_loss(model):
        with _LargeTensors(n, 512) as mode:
            model(**batch).loss.backward()
    assert mode.seen == []


# -- level 2 (the HF loss hook) through the patched forward ------------------------------------------------------


class _Capture(pl.Callback):
    """Keeps the gradients before each optimizer step, the loss of each step and the patch in use."""

    def __init__(self) -> None:
        self.grads, self.losses, self.patches, self.hooked = [], [], [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].detach().clone())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.patches.append(fused_patch_of(pl_module.model))
        self.hooked.append(installed_hook(pl_module.model) is not None)


def _fit(callbacks, state, steps=3, accumulate=1):
    torch.manual_seed(0)
    module = PlainHFModule(lr=0.5)
    module.model.load_state_dict(state)
    cap = _Capture()
    trainer = quiet_trainer(callbacks + [cap], max_steps=steps, accumulate_grad_batches=accumulate,
                            limit_val_batches=0)
    trainer.fit(module, datamodule=ListDataModule(n_batches=6))
    return module, cap


def test_hook_level_selection_through_the_fused_forward_equals_the_hook_path(tmp_path):
    """ExcessLossSelection attached at the hook level to a plain module: with FusedLoss the loss goes through the same
    token pipeline from hidden states (top-k by excess loss against a saved reference, window normalisation with
    gradient accumulation) and the losses, gradients and weights equal the unpatched hook path's."""
    reference = tmp_path / "ref"
    tiny_hf_model(seed=1).save_pretrained(reference)  # a different model: excess losses far from ties
    state = tiny_hf_model(seed=0).state_dict()

    def cbs():
        return [ExcessLossSelection(keep_ratio=0.5, reference=str(reference), integration="hook")]

    plain, cap_plain = _fit(cbs(), state, steps=2, accumulate=2)
    fused = FusedLoss()
    patched, cap_fused = _fit(cbs() + [fused], state, steps=2, accumulate=2)
    assert all(p is None for p in cap_plain.patches) and all(cap_plain.hooked)
    assert all(p is not None for p in cap_fused.patches) and all(cap_fused.hooked)
    assert cap_fused.patches[-1].calls == 4  # every micro-batch went through the fused forward
    assert fused.patch is None and "forward" not in patched.model.__dict__  # unpatched at teardown
    assert installed_hook(patched.model) is None
    for a, b in zip(cap_plain.losses, cap_fused.losses):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(cap_plain.grads, cap_fused.grads):
        assert ga.keys() == gb.keys() and ga
        for name in ga:
            torch.testing.assert_close(gb[name], ga[name], rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), patched.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
    # precondition: the selection really dropped tokens
    kept = token_pipeline_for(patched).last_metrics["lit_ft/tokens/kept_fraction"]
    assert 0.3 < float(kept) < 0.7


def test_a_trainer_run_with_fused_loss_equals_the_run_without():
    state = tiny_hf_model(seed=0).state_dict()
    plain, cap_plain = _fit([], state)
    fused, cap_fused = _fit([FusedLoss(chunk_size=16)], state)
    assert cap_fused.patches[0] is not None and cap_fused.patches[0].chunk_size == 16
    assert cap_fused.patches[-1].calls == 3
    moved = False
    for (name, a), b, init in zip(plain.state_dict().items(), fused.state_dict().values(), state.values()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(a, init)
    assert moved  # precondition: training changed the weights


def test_fused_loss_callback_arguments():
    cb = FusedLoss()
    assert cb.chunk_size == 0 and cb.weight_grad_accumulation == "fp32" and cb.patch is None
    assert FusedLoss(chunk_size=128, weight_grad_accumulation="input").weight_grad_accumulation == "input"
    with pytest.raises(ValueError, match=r"FusedLoss: `chunk_size` must be an int >= 0, got -1"):
        FusedLoss(chunk_size=-1)
    with pytest.raises(ValueError, match="`chunk_size`"):
        FusedLoss(chunk_size=True)
    with pytest.raises(ValueError, match="`chunk_size`"):
        FusedLoss(chunk_size=1.5)
    with pytest.raises(ValueError, match=r"`weight_grad_accumulation` must be one of \('fp32', 'input'\), got 'bf16'"):
        FusedLoss(weight_grad_accumulation="bf16")
    model = _model("llama")
    with pytest.raises(ValueError, match="`chunk_size` must be an int >= 1"):
        patch_fused_loss(model, chunk_size=0)
    with pytest.raises(ValueError, match="`weight_grad_accumulation`"):
        patch_fused_loss(model, weight_grad_accumulation="fp16")
    assert fused_patch_of(model) is None


def test_fused_loss_from_yaml_class_path():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--cb", type=pl.Callback)
    cfg = parser.parse_args(["--cb", '{"class_path": "lit_ft.callbacks.FusedLoss"}'])
    cb = parser.instantiate_classes(cfg).cb
    assert isinstance(cb, FusedLoss) and cb.chunk_size == 0


def test_a_model_without_logits_to_keep_is_patched_with_a_warning():
    model = _model("llama")
    original = type(model).forward

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):  # no logits_to_keep
        return original(self, input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    model.forward = forward.__get__(model)
    batch = _batch()
    ref, g_ref = _loss_and_grads(model, batch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        patch = patch_fused_loss(model)
    assert any("logits_to_keep" in str(w.message) for w in caught) and not patch.keeps_one_logit
    got, g_got = _loss_and_grads(model, batch)
    assert got.logits.shape == ref.logits.shape  # full logits: the forward cannot keep fewer
    _assert_same(ref, got, g_ref, g_got, "no logits_to_keep")
    patch.remove()
