"""ParallelAdapters and MAM (He et al., arXiv 2110.04366): the parallel adapter's math against a reference written
here, outputs unchanged at the LoRA-style init, the fused FFN path equal to the hooked one (gated Llama MLP and
GPT-2's Conv1D MLP, outputs and gradients), merge refused, a frozen backbone bit-identical under AdamW with weight
decay, save -> load, checkpoint -> resume, plain / PEFT / classification modules, MAM's two parts (prefix through the
prompt injector + FFN adapters) against the same parts installed separately, clear errors."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_ft.callbacks import MAM, ParallelAdapters, PrefixTuning
from lit_ft.callbacks.adapters._parallel import build_parallel_adapters
from lit_ft.callbacks.adapters.mam import attach_mam
from lit_ft.core.adapters import AdapterError, AdapterSet, AdapterTarget, load_adapters, save_adapters
from lit_ft.core.parallel_adapter import FusedParallelAdapterSet, ParallelAdapter
from lit_ft.core.prefix import PrefixEncoder
from lit_ft.core.prompts import PromptError, attach_prompt, injector_for, model_geometry
from lit_ft.modules import CausalLMModule
from tests.callbacks.adapter_checks import (
    assert_plain_module_backbone_untouched,
    assert_resume_equals_uninterrupted,
    fit_on_peft_lora,
)
from tests.helpers import (
    ListDataModule,
    quiet_trainer,
    random_batch,
    tiny_config,
    tiny_hf_model,
)


def _reference_delta(a: ParallelAdapter, x: torch.Tensor) -> torch.Tensor:
    """s·(ReLU(x W_down + b_down) W_up + b_up), written out (the authors' Adapter_Layer with no layer norm)."""
    return a.scale * (torch.relu(x @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias)


def _randomise(adapters: AdapterSet, seed: int = 3, std: float = 0.2) -> None:
    """Non-zero up-projections and biases (after the LoRA init every adapter outputs 0, which tests nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapters.adapters.parameters():  # the adapters' own tensors only
            p.copy_(torch.randn(p.shape, generator=g) * std)


def _copies(adapters: AdapterSet) -> dict:
    """Independent copies of a set's adapters, by target."""
    return {t: copy.deepcopy(adapters.adapter(t)) for t in adapters.targets}


def _pa(model, targets=("mlp",), r=8, s=4.0, init="lora", fused=False, seed=0):
    return build_parallel_adapters(model, list(targets), r, s, init, seed, fused, "test")


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _gpt2(seed=0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


# -- the adapter ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets, path", [(("mlp",), "mlp"), (("attention",), "self_attn"),
                                           (("mlp.down_proj",), "mlp.down_proj")])
def test_parallel_adapter_adds_the_reference_delta_from_the_sublayer_input(targets, path):
    model = tiny_hf_model().eval()
    adapters = _pa(model, targets)
    _randomise(adapters)
    module = model.model.layers[0].get_submodule(path)  # layer 0: its input is the same with and without adapters
    seen = {}
    adapters.attach(model)
    handle = module.register_forward_hook(  # registered after the adapter's hook: sees the new output
        lambda m, args, kwargs, out: seen.update(x=(args[0] if args else kwargs["hidden_states"]),
                                                 y=out[0] if isinstance(out, tuple) else out), with_kwargs=True)
    ids = random_batch(2, 9)["input_ids"]
    _logits(model, ids)
    x, y_new = seen["x"], seen["y"]
    with adapters.disabled():
        _logits(model, ids)
    assert torch.equal(seen["x"], x)
    a = adapters.adapter(AdapterTarget(0, path))
    assert a.in_features == x.shape[-1]
    with torch.no_grad():
        torch.testing.assert_close(y_new, seen["y"] + _reference_delta(a, x), rtol=1e-5, atol=1e-6)
    handle.remove()


def test_lora_init_leaves_outputs_identical_bert_init_moves_them():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    before = _logits(model, ids)
    for fused in (False, True):
        zero = _pa(model, fused=fused)
        a = zero.adapter(AdapterTarget(0, "mlp"))
        assert a.down.weight.abs().sum() > 0 and not a.up.weight.any() and not a.up.bias.any() \
            and not a.down.bias.any()
        bound = 1 / a.in_features ** 0.5  # kaiming_uniform(a=sqrt(5)) on [r, d]: U(-1/sqrt(d), 1/sqrt(d))
        assert a.down.weight.abs().max() <= bound
        zero.attach(model)
        assert torch.equal(_logits(model, ids), before)
        zero.detach()
    bert = _pa(model, init="bert")
    bert.attach(model)
    moved = _logits(model, ids)
    assert (moved - before).abs().max() > 1e-5
    with bert.disabled():
        assert torch.equal(_logits(model, ids), before)
    bert.detach()
    assert torch.equal(_logits(model, ids), before)


# -- fused FFN path ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: tiny_hf_model().eval(), lambda: tiny_hf_model(mlp_bias=True).eval(),
                                  _gpt2], ids=["llama_gated", "llama_gated_bias", "gpt2_conv1d"])
def test_fused_ffn_equals_the_hooked_adapter_outputs_and_gradients(make):
    model = make()
    hooked = _pa(model, r=6)
    _randomise(hooked)
    fused = FusedParallelAdapterSet(_copies(hooked))
    ids = torch.randint(0, 64, (2, 7))

    def run(adapters):
        adapters.attach(model)
        model.zero_grad(set_to_none=True)
        adapters.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in adapters.adapters.named_parameters()}
        base_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "mlp" in n}
        adapters.detach()
        return out.logits.detach(), grads, base_grads

    want, g_want, b_want = run(hooked)
    got, g_got, b_got = run(fused)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for n in g_want:
        torch.testing.assert_close(g_got[n], g_want[n], rtol=1e-5, atol=1e-5, msg=n)
    for n in b_want:
        torch.testing.assert_close(b_got[n], b_want[n], rtol=1e-5, atol=1e-5, msg=n)
    # detached: the blocks run their own forward again
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_fused_no_grad_cache_follows_weight_changes_and_disabled_runs_the_block():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    before = _logits(model, ids)
    fused = _pa(model, fused=True)
    fused.attach(model)
    assert isinstance(fused, FusedParallelAdapterSet)
    assert torch.equal(_logits(model, ids), before) or torch.allclose(_logits(model, ids), before, atol=1e-6)
    _randomise(fused)  # in-place: the cached concatenated weights must be rebuilt
    first = _logits(model, ids)
    assert (first - before).abs().max() > 1e-4
    assert torch.equal(_logits(model, ids), first)
    with fused.disabled():
        assert torch.equal(_logits(model, ids), before)
    hooked = AdapterSet(_copies(fused))
    fused.detach()
    hooked.attach(model)
    torch.testing.assert_close(_logits(model, ids), first, rtol=1e-5, atol=1e-5)


def test_fused_refuses_what_it_cannot_fuse_naming_it():
    with pytest.raises(ValueError, match=r"`fused` applies to FFN blocks only .*\['attention'\]"):
        ParallelAdapters(targets=["mlp", "attention"], fused=True)
    with pytest.raises(AdapterError, match=r"dropout \[\('dropout', 0.1\)\].*fused=false"):
        _pa(_gpt2(resid_pdrop=0.1), fused=True)
    with pytest.raises(AdapterError, match=r"fused=true needs an FFN block.*LlamaAttention has"):
        _pa(tiny_hf_model(), targets=["self_attn"], fused=True)


# -- merge ---------------------------------------------------------------------------------------------------------
def test_merge_is_refused_clearly_and_changes_nothing():
    model = tiny_hf_model().eval()
    adapters = _pa(model)
    _randomise(adapters)
    adapters.attach(model)
    ids = random_batch(2, 9)["input_ids"]
    want = _logits(model, ids)
    with pytest.raises(AdapterError, match="not a linear map of their target's output and cannot be merged"):
        adapters.merge()
    with pytest.raises(AdapterError, match="not linear in x"):
        adapters.adapter(AdapterTarget(0, "mlp")).merge_into(model.model.layers[0].mlp)
    assert adapters.attached and torch.equal(_logits(model, ids), want)
    for cb in (ParallelAdapters(), MAM()):
        with pytest.raises(AdapterError, match="cannot be merged into the base weights"):
            cb.merge()


# -- training life cycle -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_trainer_trains_only_the_adapters_backbone_bit_identical_then_reloads(tmp_path, fused):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = ParallelAdapters(bottleneck=4, fused=fused, save_dir="pa")
    quiet_trainer([cb], max_steps=3, default_root_dir=str(tmp_path)).fit(module, datamodule=ListDataModule(n_batches=3))
    owned = cb.owned_param_names(module)
    assert len(owned) == 8 and all(n.startswith("lit_ft_adapters.parallel_adapters.adapters.layer") for n in owned)
    for n, p in module.named_parameters():
        if n in owned:
            continue
        assert torch.equal(p, base[n]), f"backbone tensor {n} moved"
    assert any(p.abs().sum() > 0 for n, p in module.named_parameters() if n.endswith("up.weight"))
    # the artifact (written by either path) reloads as hooked adapters onto a fresh base: the same outputs
    fresh = CausalLMModule(model_config=tiny_config())
    fresh.load_state_dict(base)
    loaded = load_adapters(fresh.model, tmp_path / "pa")
    assert type(loaded) is AdapterSet
    ids = random_batch(2, 9)["input_ids"]
    torch.testing.assert_close(_logits(fresh.model.eval(), ids), _logits(module.model.eval(), ids),
                               rtol=1e-5, atol=1e-5)


def test_save_load_gives_the_same_outputs(tmp_path):
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    adapters = _pa(model, targets=("mlp", "attention"))
    _randomise(adapters)
    adapters.attach(model)
    want = _logits(model, ids)
    save_adapters(adapters, tmp_path)
    fresh = tiny_hf_model().eval()
    load_adapters(fresh, tmp_path)
    assert torch.equal(_logits(fresh, ids), want)


@pytest.mark.parametrize("make_cb", [lambda: ParallelAdapters(bottleneck=4, fused=True, learning_rate=5e-3),
                                     lambda: MAM(num_virtual_tokens=3, mid_dim=8, bottleneck=4, learning_rate=5e-3)],
                         ids=["parallel_fused", "mam"])
def test_checkpoint_resume_equals_uninterrupted(tmp_path, make_cb):
    assert_resume_equals_uninterrupted(make_cb, tmp_path)


@pytest.mark.parametrize("Callback, kwargs", [(ParallelAdapters, {"bottleneck": 4}),
                                              (MAM, {"num_virtual_tokens": 2, "mid_dim": 8, "bottleneck": 4})])
def test_drop_in_on_plain_and_peft_modules(Callback, kwargs):
    assert_plain_module_backbone_untouched(lambda: Callback(**kwargs))
    cb = fit_on_peft_lora(lambda: Callback(**kwargs))
    assert len(cb.adapters.targets) == 2  # found through the PEFT wrapper
    assert all(a.up.weight.abs().sum() > 0 for a in cb.adapters.adapters.values())  # trained from their zero init


def test_classification_head_trains_with_the_adapters():
    from tests.contract.cases import ClassificationData, classification_module

    module = classification_module()
    cb = ParallelAdapters(bottleneck=4)
    quiet_trainer([cb], max_steps=1).fit(module, datamodule=ClassificationData())
    head = cb.extra_trainable(module)
    assert head and all(".score." in n or ".classifier." in n for n in head)


# -- MAM -----------------------------------------------------------------------------------------------------------
def _fit_mam(tmp_path, **kw):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = MAM(**{"num_virtual_tokens": 3, "mid_dim": 8, "bottleneck": 4, "save_dir": "mam", **kw})
    quiet_trainer([cb], max_steps=3, default_root_dir=str(tmp_path)).fit(module, datamodule=ListDataModule(n_batches=3))
    return module, base, cb


def test_mam_is_the_prefix_plus_the_ffn_adapters_installed_separately(tmp_path):
    module, base, cb = _fit_mam(tmp_path)
    hf = module.model.eval()
    prefix = cb.prefix
    g = model_geometry(hf)
    # the paper's prefix: an [l, kv] table through Linear(kv, mid_dim) -> tanh -> Linear(mid_dim, 2 L kv)
    assert isinstance(prefix, PrefixEncoder) and prefix.embedding.weight.shape == (3, g.kv_dim)
    assert [tuple(m.weight.shape) for m in prefix.transform if hasattr(m, "weight")] == \
        [(8, g.kv_dim), (2 * g.num_layers * g.kv_dim, 8)]
    assert injector_for(hf).source is prefix
    owned = set(cb.owned_param_names(module))
    assert {n for n in owned if n.startswith("lit_ft_prompts.mam.")} and \
        {n for n in owned if n.startswith("lit_ft_adapters.mam.")}
    for n, p in module.named_parameters():  # both parts trained, the backbone did not move
        if n not in owned:
            assert torch.equal(p, base[n]), f"backbone tensor {n} moved"
    assert all(not torch.equal(p, torch.zeros_like(p)) for n, p in module.named_parameters()
               if n.endswith("up.weight"))
    ids = random_batch(2, 9)["input_ids"]
    want = _logits(hf, ids)
    # reference: a fresh copy of the base with the same prefix (prompt injector) and the same adapters (hooks)
    fresh = CausalLMModule(model_config=tiny_config())
    fresh.load_state_dict(base)
    ref = fresh.model.eval()
    attach_prompt(ref, copy.deepcopy(prefix))
    AdapterSet(_copies(cb.adapters)).attach(ref)
    torch.testing.assert_close(_logits(ref, ids), want, rtol=1e-5, atol=1e-5)
    # the prefix matters, and so do the adapters
    with cb.injector.disabled():
        assert (_logits(hf, ids) - want).abs().max() > 1e-4
    with cb.adapters.disabled():
        assert (_logits(hf, ids) - want).abs().max() > 1e-4
    # the artifact holds both parts; attach_mam on a fresh base gives the trained outputs
    names = {p.name for p in (tmp_path / "mam").iterdir()}
    assert {"adapters.safetensors", "adapter_config.json", "prompt.safetensors", "prompt_config.json"} <= names
    assert "adapter_model.safetensors" not in names  # no PEFT prefix-only adapter: it would not reproduce MAM
    fresh2 = CausalLMModule(model_config=tiny_config())
    fresh2.load_state_dict(base)
    attach_mam(fresh2.model, tmp_path / "mam")
    torch.testing.assert_close(_logits(fresh2.model.eval(), ids), want, rtol=1e-5, atol=1e-5)
    cb.remove()
    assert not hasattr(module, "lit_ft_adapters") and not hasattr(module, "lit_ft_prompts")
    assert injector_for(hf).source is None


def test_mam_fused_equals_mam_hooked(tmp_path):
    a, _, _ = _fit_mam(tmp_path / "a")
    b, _, _ = _fit_mam(tmp_path / "b", fused=True)
    ids = random_batch(2, 9)["input_ids"]
    torch.testing.assert_close(_logits(b.model.eval(), ids), _logits(a.model.eval(), ids), rtol=1e-4, atol=1e-5)


def test_mam_refuses_gradient_checkpointing_and_a_second_prompt():
    module = CausalLMModule(model_config=tiny_config())
    module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(PromptError, match="gradient checkpointing"):
        quiet_trainer([MAM(num_virtual_tokens=2, mid_dim=8, bottleneck=4)], max_steps=1).fit(
            module, datamodule=ListDataModule(n_batches=1))
    with pytest.raises(PromptError, match="MAM: the model already runs the prompt of another technique"):
        quiet_trainer([PrefixTuning(num_virtual_tokens=2), MAM(num_virtual_tokens=2, mid_dim=8, bottleneck=4)],
                      max_steps=1).fit(CausalLMModule(model_config=tiny_config()),
                                       datamodule=ListDataModule(n_batches=1))


# -- errors --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("Callback, kwargs, match", [
    (ParallelAdapters, {"bottleneck": 0}, "`bottleneck` must be an int >= 1"),
    (ParallelAdapters, {"scale": 0.0}, "`scale` must be a finite number > 0"),
    (ParallelAdapters, {"targets": []}, "`targets` must be a non-empty list"),
    (ParallelAdapters, {"init": "zeros"}, r"`init` must be one of \('lora', 'bert'\)"),
    (ParallelAdapters, {"fused": "yes"}, "`fused` must be true or false"),
    (ParallelAdapters, {"seed": -1}, "`seed`"),
    (ParallelAdapters, {"learning_rate": 0.0}, "`learning_rate`"),
    (MAM, {"num_virtual_tokens": 0}, "`num_virtual_tokens` must be an int >= 1"),
    (MAM, {"mid_dim": 0}, "`mid_dim` must be an int >= 1"),
    (MAM, {"prefix_init_std": 0.0}, "`prefix_init_std` must be a finite number > 0"),
    (MAM, {"scale": -1}, "`scale`"),
    (MAM, {"train_task_head": "yes"}, "`train_task_head` must be true or false"),
])
def test_bad_arguments_name_themselves(Callback, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Callback(**kwargs)


@pytest.mark.parametrize("Callback", [ParallelAdapters, MAM])
def test_unknown_target_fails_at_setup_naming_it(Callback):
    with pytest.raises(AdapterError, match=f"{Callback.__name__}: decoder layer 0 .* no module for target 'mlp.nope'"):
        quiet_trainer([Callback(targets=["mlp.nope"], bottleneck=4)], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=1))


def test_a_target_called_without_a_tensor_input_is_refused():
    a = ParallelAdapter(4, 4, 2)
    with pytest.raises(AdapterError, match="without a tensor input"):
        a(None, torch.zeros(1, 4))
