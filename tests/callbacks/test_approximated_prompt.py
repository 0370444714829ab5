"""ApproximatedPrompt (APT): the authors' math against a reference written here, the zero-gate init (outputs
bit-identical, still trainable), causality (earlier positions ignore later tokens; generate() with the KV cache equals
step-by-step forwards), merge refused, save -> load, a frozen backbone bit-identical under AdamW with weight decay,
checkpoint -> resume, gradient checkpointing (same gradients; PrefixTuning refuses the same setup), plain / PEFT /
classification modules, clear errors."""

from __future__ import annotations

import pytest
import torch

from lit_ft.callbacks import ApproximatedPrompt, PrefixTuning
from lit_ft.callbacks.adapters.approximated_prompt import ApproximatedPromptAdapter
from lit_ft.core.adapters import AdapterError, AdapterSet, AdapterTarget, load_adapters, resolve_targets, save_adapters
from lit_ft.modules import CausalLMModule
from tests.callbacks.adapter_checks import (
    assert_plain_module_backbone_untouched,
    assert_resume_equals_uninterrupted,
    fit_on_peft_lora,
)
from tests.helpers import (
    ListDataModule,
    check_generation,
    quiet_trainer,
    random_batch,
    tiny_config,
    tiny_hf_model,
)


def _adapters(model, init="apt", k=6, seed=0, perturb=0.0):
    """APT on every attention module; ``perturb`` > 0 also randomises B and γ (the authors init them at 0) so the
    math test exercises every tensor."""
    g = torch.Generator().manual_seed(seed)
    built = {}
    for t in resolve_targets(model, ["attention"]):
        a = ApproximatedPromptAdapter(model.config.hidden_size, k, 4, init=init)
        a.reset(g)
        if perturb:
            with torch.no_grad():
                a.key_up.copy_(torch.randn(a.key_up.shape, generator=g) * perturb)
                a.log_scale.fill_(0.3)
                a.prompts.mul_(20)  # scores large enough that the ReLU keeps and cuts a mix of entries
        built[t] = a
    return AdapterSet(built)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reference_apt(x, res_out, prompts, a, b, gamma):
    """The authors' ``approximate_prompt.forward(x=attention output, res=block input)``, transcribed."""
    mm = prompts + (prompts @ a) @ b  # mm_tokens + mm(mm_tokens); mm = Linear(d, 4) then Linear(4, d), no bias
    attn = torch.relu(x @ mm.t())
    e = attn @ prompts
    weights = attn.max(dim=-1, keepdim=True)[0].clone().detach()
    out = res_out + e * weights
    return out * gamma.exp()


def test_math_matches_the_authors_forward_and_the_hook_sees_the_block_input():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    adapters = _adapters(model, perturb=0.5)
    a = adapters.adapter(AdapterTarget(1, "self_attn"))
    d = model.config.hidden_size
    x, y = torch.randn(2, 5, d), torch.randn(2, 5, d)
    want = reference_apt(x, y, a.prompts, a.key_down, a.key_up, a.log_scale)
    torch.testing.assert_close(a(x, y), want)
    s = torch.relu(x @ a.memory_keys().T)
    assert 0 < (s > 0).float().mean() < 1  # the ReLU is exercised
    # in the model: x = the attention module's input (the normalised block input), y = its output (after o_proj);
    # a hook registered before the adapters sees the base output, one registered after sees the adapted output
    attn = model.model.layers[1].self_attn
    seen: dict = {}
    layer = model.model.layers[1]
    h0 = layer.register_forward_pre_hook(
        lambda m, args, kw: seen.update(block=args[0] if args else kw["hidden_states"]), with_kwargs=True)
    h1 = attn.register_forward_hook(lambda m, args, kw, out: seen.update(x=kw["hidden_states"], y=out[0]),
                                    with_kwargs=True)
    adapters.attach(model)
    h2 = attn.register_forward_hook(lambda m, args, kw, out: seen.update(new=out[0]), with_kwargs=True)
    _logits(model, ids)
    for h in (h0, h1, h2):
        h.remove()
    torch.testing.assert_close(seen["x"], layer.input_layernorm(seen["block"]))  # APT's X_in: the normalised input
    torch.testing.assert_close(seen["new"], reference_apt(seen["x"], seen["y"], a.prompts, a.key_down, a.key_up,
                                                          a.log_scale))
    # a bf16 model keeps its dtype (the memory stays float32)
    adapters.detach()
    model.to(torch.bfloat16)
    adapters.attach(model)
    assert _logits(model, ids).dtype == torch.bfloat16


def test_authors_init_moves_outputs_and_zero_gate_leaves_them_identical():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    before = _logits(model, ids)
    apt = _adapters(model, init="apt")
    a = apt.adapter(AdapterTarget(0, "self_attn"))
    assert torch.count_nonzero(a.key_up) == 0 and a.log_scale.item() == 0 and a.gate is None
    assert abs(a.prompts.std().item() - 0.02) < 0.01 and abs(a.key_down.std().item() - 1.0) < 0.3
    apt.attach(model)
    assert (_logits(model, ids) - before).abs().max() > 0  # w ⊙ e ≠ 0 at step 0 (the authors' init)
    with apt.disabled():
        assert torch.equal(_logits(model, ids), before)
    apt.detach()
    zero = _adapters(model, init="zero_gate")
    zero.attach(model)
    assert torch.equal(_logits(model, ids), before)
    zero.detach()
    assert torch.equal(_logits(model, ids), before)


def test_zero_gate_trains_and_a_zero_memory_would_not():
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    zero = _adapters(model, init="zero_gate")
    zero.attach(model)
    model(input_ids=ids, labels=ids).loss.backward()
    a = zero.adapter(AdapterTarget(1, "self_attn"))
    assert a.gate.grad.abs().item() > 0  # the gate moves first, then the memory gets gradients
    with torch.no_grad():
        a.gate.fill_(0.5)
    zero.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    assert a.prompts.grad.abs().sum() > 0 and a.key_up.grad.abs().sum() > 0
    zero.detach()
    # P = 0 also leaves the outputs unchanged, but nothing but γ gets a gradient: refused as an init
    dead = _adapters(model)
    for ad in dead.adapters.values():
        with torch.no_grad():
            ad.prompts.zero_()
    dead.attach(model)
    model(input_ids=ids, labels=ids).loss.backward()
    d = dead.adapter(AdapterTarget(1, "self_attn"))
    assert all(torch.count_nonzero(t.grad) == 0 for t in (d.prompts, d.key_down, d.key_up))
    with pytest.raises(ValueError, match="`prompt_init_std` must be > 0.*init='zero_gate'"):
        ApproximatedPrompt(prompt_init_std=0.0)


def test_causal_earlier_positions_ignore_later_tokens_and_generate_matches_forward():
    model = tiny_hf_model().eval()
    adapters = _adapters(model, perturb=0.5)
    adapters.attach(model)
    ids = random_batch(2, 10)["input_ids"]
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 7) % 300 + 3
    a, b = _logits(model, ids), _logits(model, changed)
    assert torch.equal(a[:, :6], b[:, :6]) and not torch.equal(a[:, 6:], b[:, 6:])
    check_generation(model, ids[:, :5], steps=4, left_pad=2)  # KV-cache decoding = full forwards, padding too


def test_merge_is_refused_clearly():
    model = tiny_hf_model()
    s = _adapters(model)
    s.attach(model)
    with pytest.raises(AdapterError, match="not a linear map of their target's output and cannot be merged"):
        s.merge()
    assert s.attached
    module = CausalLMModule(model_config=tiny_config())
    cb = ApproximatedPrompt(num_prompts=4)
    quiet_trainer([cb], max_steps=1).fit(module, datamodule=ListDataModule(n_batches=1))
    with pytest.raises(AdapterError, match="ApproximatedPrompt cannot be merged.*depends non-linearly"):
        cb.merge()
    assert cb.adapters.attached


def test_save_load_gives_the_same_outputs(tmp_path):
    model = tiny_hf_model().eval()
    ids = random_batch(2, 9)["input_ids"]
    adapters = _adapters(model, init="zero_gate", perturb=0.3)
    for a in adapters.adapters.values():
        with torch.no_grad():
            a.gate.fill_(0.7)
    adapters.attach(model)
    want = _logits(model, ids)
    save_adapters(adapters, tmp_path)
    fresh = tiny_hf_model().eval()
    loaded = load_adapters(fresh, tmp_path)
    assert loaded.attached and loaded.adapter(AdapterTarget(0, "self_attn")).init == "zero_gate"
    assert torch.equal(_logits(fresh, ids), want)


def test_trainer_trains_only_apt_backbone_bit_identical_under_weight_decay(tmp_path):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    base = {n: p.detach().clone() for n, p in module.named_parameters()}
    cb = ApproximatedPrompt(num_prompts=8, save_dir="apt")
    quiet_trainer([cb], max_steps=3, default_root_dir=str(tmp_path)).fit(module, datamodule=ListDataModule(n_batches=3))
    for n, p in module.named_parameters():
        if n.startswith("lit_ft_adapters."):
            continue
        assert torch.equal(p, base[n]), f"backbone tensor {n} moved"
    owned = cb.owned_param_names(module)
    assert len(owned) == 8 and all(n.startswith("lit_ft_adapters.approximated_prompt.adapters.layer") for n in owned)
    a = cb.adapters.adapter(AdapterTarget(0, "self_attn"))
    assert torch.count_nonzero(a.key_up) > 0 and a.log_scale.item() != 0  # B and γ trained
    fresh = CausalLMModule(model_config=tiny_config())
    fresh.load_state_dict(base)
    load_adapters(fresh.model, tmp_path / "apt")
    ids = random_batch(2, 9)["input_ids"]
    torch.testing.assert_close(_logits(fresh.model.eval(), ids), _logits(module.model.eval(), ids))


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    assert_resume_equals_uninterrupted(lambda: ApproximatedPrompt(num_prompts=8, learning_rate=5e-3), tmp_path,
                                       key=lambda k: k.startswith("lit_ft_adapters.approximated_prompt."))


def test_gradient_checkpointing_gives_the_same_gradients_and_trains_where_prefix_tuning_refuses():
    ids = random_batch(2, 9)["input_ids"]
    grads = []
    for ckpt in (False, True):
        model = tiny_hf_model(train=True)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for p in model.parameters():
            p.requires_grad_(False)
        adapters = _adapters(model, perturb=0.5)
        adapters.attach(model)
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in adapters.adapters.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)
    # the whole life cycle under checkpointing: APT trains; a prefix (same prompt length) is refused
    module = CausalLMModule(model_config=tiny_config(), gradient_checkpointing=True, learning_rate=1e-2)
    cb = ApproximatedPrompt(num_prompts=8)
    start = {n: p.detach().clone() for n, p in cb_params(module, cb, before=True)}
    quiet_trainer([cb], max_steps=2).fit(module, datamodule=ListDataModule(n_batches=2))
    moved = [n for n, p in module.named_parameters() if n.startswith("lit_ft_adapters.") and n in start
             and not torch.equal(p, start[n])]
    assert moved
    with pytest.raises(Exception, match="gradient checkpointing"):
        quiet_trainer([PrefixTuning(num_virtual_tokens=8)], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config(), gradient_checkpointing=True),
            datamodule=ListDataModule(n_batches=1))


def cb_params(module, cb, before: bool):
    """The APT tensors ``cb`` will install, named as on the module (built now with the same seed)."""
    s = cb.build_adapters(None, module, module.model)
    return [(f"lit_ft_adapters.approximated_prompt.adapters.{n}", p) for n, p in s.adapters.named_parameters()]


def test_drop_in_on_plain_and_peft_modules():
    assert_plain_module_backbone_untouched(lambda: ApproximatedPrompt(num_prompts=4))
    cb = fit_on_peft_lora(lambda: ApproximatedPrompt(num_prompts=4))
    assert [t.path for t in cb.adapters.targets] == ["self_attn", "self_attn"]  # found through the PEFT wrapper
    assert all(p.grad is not None for p in cb.adapters.adapters.parameters())


def test_classification_head_trains_with_the_prompts():
    from tests.contract.cases import ClassificationData, classification_module

    module = classification_module()
    cb = ApproximatedPrompt(num_prompts=4)
    quiet_trainer([cb], max_steps=1).fit(module, datamodule=ClassificationData())
    head = cb.extra_trainable(module)
    assert head and all(".score." in n or ".classifier." in n for n in head)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_prompts": 0}, "`num_prompts` must be an int >= 1"),
    ({"rank": 0}, "`rank` must be an int >= 1"),
    ({"targets": []}, "`targets` must be a non-empty list"),
    ({"init": "zeros"}, r"`init` must be one of \('apt', 'zero_gate'\)"),
    ({"prompt_init_std": -1.0}, "`prompt_init_std`"),
    ({"key_init_std": -1.0}, "`key_init_std`"),
    ({"learning_rate": 0.0}, "`learning_rate`"),
    ({"train_task_head": "yes"}, "`train_task_head` must be true or false"),
    ({"seed": -1}, "`seed`"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ApproximatedPrompt(**kwargs)


def test_unknown_or_wrong_width_target_fails_naming_it():
    with pytest.raises(AdapterError, match="ApproximatedPrompt: decoder layer 0 .* no module for target 'attn9'"):
        quiet_trainer([ApproximatedPrompt(targets=["attn9"])], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=1))
    with pytest.raises(AdapterError, match="must take and return hidden states of width 32"):
        quiet_trainer([ApproximatedPrompt(targets=["mlp.up_proj"])], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=1))
