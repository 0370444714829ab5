"""IAPT (Instruction-Aware Prompt Tuning): per-layer prefixes generated from the instruction's hidden states."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from transformers import DynamicCache

from lit_ft.callbacks import IAPT
from lit_ft.callbacks.prompt.iapt import InstructionPromptGenerator
from lit_ft.core.frozen import frozen_copy
from lit_ft.core.prompts import PromptError, attach_prompt, injector_for, model_geometry, save_prompt
from lit_ft.modules import CausalLMModule
from tests.helpers import (
    ListDataModule, LoraModule, PlainHFModule, SnapshotPrompt, check_generation,
    greedy_generate, quiet_trainer, random_batch, tiny_config, tiny_hf_model,
)

trainer = quiet_trainer

hf_model = tiny_hf_model
Snapshot = SnapshotPrompt

N, R = 4, 8


def make_source(model, mode="kv", share=True, pooling="hidden", seed=1):
    """A source whose every tensor is non-trivial (W_up and the biases non-zero, coefficients off the GELU fit)."""
    src = InstructionPromptGenerator(model_geometry(model), N, R, share_generator=share, prefix_mode=mode,
                                     pooling=pooling)
    src.initialise(query_std=1.0, up_std=0.5, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in (src.down_bias, src.up_bias, src.numerator, src.denominator):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return src


def capture(model):
    """Each decoder layer's input hidden states and output, and the cache the trunk receives."""
    seen = {"in": {}, "out": {}}
    handles = [model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(cache=kw.get("cache")),
                                                     with_kwargs=True)]
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: seen["in"].__setitem__(i, (a[0] if a else kw["hidden_states"]).detach().clone()),
            with_kwargs=True))
        handles.append(layer.register_forward_hook(lambda m, a, o, i=i: seen["out"].__setitem__(
            i, (o[0] if isinstance(o, tuple) else o).detach().clone())))
    return seen, handles


# ---------------------------------------------------------------------------------------------------------------
# A hand-written reference: explicit loops over rows, soft tokens and instruction tokens, float64
# ---------------------------------------------------------------------------------------------------------------
def ref_tokens(src, layer, H, mask):
    """``[B, n, out]``: the generator output of ``layer`` from input hidden states ``H`` and the instruction mask."""
    g = 0 if src.share_generator else layer
    f = lambda t: t.detach().double()  # noqa: E731
    q, Wd, bd, Wu, bu = f(src.query[g]), f(src.down_weight[g]), f(src.down_bias[g]), f(src.up_weight[g]), f(src.up_bias[g])
    a, b = f(src.numerator[layer]), f(src.denominator[layer])
    B, T, D = H.shape
    out = torch.zeros(B, src.num_virtual_tokens, Wu.shape[0], dtype=torch.float64)
    for row in range(B):
        X = H[row].double()
        X = torch.stack([x / math.sqrt(float((x * x).mean()) + 1e-6) for x in X])
        if src.pooling == "bottleneck":
            X = X @ Wd.T
        idx = [t for t in range(T) if mask[row, t]]
        for j in range(src.num_virtual_tokens):
            pooled = torch.zeros(X.shape[1], dtype=torch.float64)
            if idx:
                scores = [float(X[t] @ q[j]) / math.sqrt(X.shape[1]) for t in idx]
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                for t, wt in zip(idx, w):
                    pooled += wt / sum(w) * X[t]
            z = (Wd @ pooled if src.pooling == "hidden" else pooled) + bd
            u = torch.stack([sum(a[k] * zi**k for k in range(6)) / (1 + abs(sum(b[k - 1] * zi**k for k in range(1, 5))))
                             for zi in z])
            out[row, j] = Wu @ u + bu
    return out


def ids_and_masks(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (B, T), generator=g)
    attn = torch.ones(B, T, dtype=torch.long)
    attn[1, 5:] = 0  # right padding
    instr = torch.zeros(B, T, dtype=torch.bool)
    instr[0, :3] = True
    instr[1, 1:4] = True
    # row 2: no instruction token at all (the constant prefix, no NaN)
    return ids, attn, instr


def _rational(z, a, b):
    """``(a0 + a1 z + a2 z^2) / (1 + |b2 z^2|)`` for the coefficients the hand-built case uses."""
    return (a[0] + a[1] * z + a[2] * z * z) / (1 + abs(b[1] * z * z))


@pytest.mark.parametrize("pooling", ["hidden", "bottleneck"])
def test_generator_on_a_hand_built_case_with_known_numbers(pooling):
    """Known numbers, not a second copy of the formula. Row 0: instruction tokens ``3 e0`` and ``4 e1`` (RMS-normed:
    ``s0 e0``, ``s1 e1``), then two non-instruction tokens ``100 e2`` that must not count; row 1: no instruction token.
    Soft token 0 has a zero query (equal weights: pooled = ``(s0 e0 + s1 e1) / 2``), soft token 1 a query ``50 e0``
    (all weight on token 0: pooled = ``s0 e0``). ``W_down`` keeps dims 0, 1, 2, ``b_down = (0, 0, 0.5)``; the rational
    is ``(1 + z + z^2/2) / (1 + |-z^2/2|)``; ``W_up`` copies ``u`` to outputs 0..2 and ``b_up`` puts 7 at output 3."""
    model = hf_model()
    src = InstructionPromptGenerator(model_geometry(model), 2, 3, share_generator=True, prefix_mode="kv",
                                     pooling=pooling, rational_impl="torch")
    a, b = [1.0, 1.0, 0.5, 0.0, 0.0, 0.0], [0.0, -0.5, 0.0, 0.0]  # |S|: the sign matters
    with torch.no_grad():
        for t in src.parameters():
            t.zero_()
        for i in range(3):
            src.down_weight[0, i, i] = 1.0
            src.up_weight[0, i, i] = 1.0
        src.down_bias[0, 2] = 0.5
        src.up_bias[0, 3] = 7.0
        # the query acts in D (pooling "hidden") or in the bottleneck (dims 0..2 kept): e0 either way
        src.query[0, 1, 0] = 50.0 * (math.sqrt(src.query.shape[-1]) / math.sqrt(32))  # score = 50 * x[0] / sqrt(32)
        src.numerator[:] = torch.tensor(a)
        src.denominator[:] = torch.tensor(b)
    H = torch.zeros(2, 4, 32)
    H[0, 0, 0], H[0, 1, 1], H[0, 2, 2], H[0, 3, 2] = 3.0, 4.0, 100.0, 100.0
    H[1, :, 2] = 100.0
    mask = torch.tensor([[True, True, False, False], [False, False, False, False]])
    s0, s1 = 3 / math.sqrt(9 / 32 + 1e-6), 4 / math.sqrt(16 / 32 + 1e-6)
    z = {(0, 0): (s0 / 2, s1 / 2, 0.5), (0, 1): (s0, 0.0, 0.5), (1, 0): (0.0, 0.0, 0.5), (1, 1): (0.0, 0.0, 0.5)}
    with torch.no_grad():
        for layer in range(model_geometry(model).num_layers):
            got = src.generate(layer, H, mask)
            assert got.shape == (2, 2, 2 * model_geometry(model).kv_dim)
            expect = torch.zeros_like(got)
            for (row, j), zz in z.items():
                expect[row, j, :3] = torch.tensor([_rational(v, a, b) for v in zz])
                expect[row, j, 3] = 7.0
            torch.testing.assert_close(got, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("share, pooling", [(True, "hidden"), (False, "bottleneck")])
def test_kv_prefix_matches_hand_reference_and_a_prefix_cache(share, pooling):
    model = hf_model()
    src = make_source(model, "kv", share, pooling)
    inj = attach_prompt(model, src)
    ids, attn, instr = ids_and_masks()
    seen, handles = capture(model)
    inj.set_context(instruction_mask=instr)
    logits = model(input_ids=ids, attention_mask=attn).logits
    for h in handles:
        h.remove()
    g = model_geometry(model)
    ref_cache = DynamicCache(config=model.config)
    for layer in range(g.num_layers):
        p = ref_tokens(src, layer, seen["in"][layer], instr & attn.bool())
        kv = p.view(3, N, 2, g.num_kv_heads, g.head_dim)
        k_ref, v_ref = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        cache = seen["cache"].layers[layer]
        assert cache.keys.shape == (3, g.num_kv_heads, N + 7, g.head_dim)
        torch.testing.assert_close(cache.keys[:, :, :N].double(), k_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values[:, :, :N].double(), v_ref, rtol=1e-5, atol=1e-5)
        ref_cache.update(k_ref.float(), v_ref.float(), layer)
    assert not torch.allclose(seen["cache"].layers[0].keys[0, :, :N], seen["cache"].layers[0].keys[1, :, :N])
    # the same model fed these prefixes through a plain prefix cache gives the same logits
    with inj.disabled():
        pos = (attn.cumsum(-1) - 1).clamp_min(0) + N
        ref = model(input_ids=ids, attention_mask=torch.cat([torch.ones(3, N, dtype=torch.long), attn], 1),
                    position_ids=pos, cache=ref_cache, use_cache=True).logits
    real = attn.bool()
    torch.testing.assert_close(logits[real], ref[real], rtol=1e-5, atol=1e-5)
    with inj.disabled():
        bare = model(input_ids=ids, attention_mask=attn).logits
    assert not torch.allclose(logits[real], bare[real], atol=1e-3)  # the prefix is really there


def test_hidden_mode_equals_prepending_soft_tokens_to_each_layer_input():
    """prefix_mode='hidden': layer l's output on the real tokens equals running layer l on ``[P_l; H_l]`` (positions
    0..n-1 for the soft tokens, n + pos for the tokens, causal mask) and dropping the soft positions."""
    model = hf_model()
    src = make_source(model, "hidden")
    inj = attach_prompt(model, src)
    ids, _, instr = ids_and_masks()
    attn = torch.ones_like(ids)
    seen, handles = capture(model)
    inj.set_context(instruction_mask=instr)
    model(input_ids=ids, attention_mask=attn)
    for h in handles:
        h.remove()
    B, S = 3, N + 7
    pos = torch.arange(S)[None].expand(B, S)
    causal = torch.full((S, S), torch.finfo(torch.float32).min).triu(1)[None, None].expand(B, 1, S, S)
    for layer, block in enumerate(model.model.layers):
        P = ref_tokens(src, layer, seen["in"][layer], instr).float()
        x = torch.cat([P, seen["in"][layer]], dim=1)
        with inj.disabled(), torch.no_grad():
            cos_sin = model.model.rotary_emb(x, position_ids=pos)
            out = block(x, attention_mask=causal, position_ids=pos, position_embeddings=cos_sin)
        out = out[0] if isinstance(out, tuple) else out
        torch.testing.assert_close(seen["out"][layer], out[:, N:], rtol=1e-5, atol=1e-5)


def test_prefix_depends_on_the_instruction_only():
    model = hf_model()
    inj = attach_prompt(model, make_source(model))
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(3))
    instr = torch.zeros(2, 9, dtype=torch.bool)
    instr[:, :4] = True

    def prefixes(x):
        seen, handles = capture(model)
        inj.set_context(instruction_mask=instr)
        model(input_ids=x)
        for h in handles:
            h.remove()
        return [seen["cache"].layers[i].keys[:, :, :N].clone() for i in range(2)], seen["in"]

    base, _ = prefixes(ids)
    later = ids.clone()
    later[:, 4:] = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(4))
    same, _ = prefixes(later)
    other = ids.clone()
    other[:, 1] = (ids[:, 1] + 7) % 300 + 3
    diff, _ = prefixes(other)
    for layer in range(2):
        torch.testing.assert_close(same[layer], base[layer], rtol=1e-6, atol=1e-6)  # answer tokens do not matter
        assert not torch.allclose(diff[layer], base[layer], atol=1e-4)  # another instruction, another prefix
    # different instructions in one batch give different rows
    assert not torch.allclose(base[0][0], base[0][1], atol=1e-4)


def test_empty_instruction_rows_get_the_constant_prefix_without_nan():
    model = hf_model()
    src = make_source(model)
    H = torch.randn(2, 5, 32)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1] = True
    H.requires_grad_(True)
    p = src.generate(0, H, mask)
    assert torch.isfinite(p).all()
    const = src.generate(0, torch.randn(1, 5, 32) * 100, torch.zeros(1, 5, dtype=torch.bool))
    torch.testing.assert_close(p[1], const[0], rtol=0, atol=0)  # input-independent when nothing is instruction
    p.sum().backward()
    assert torch.isfinite(H.grad).all() and H.grad[1].abs().sum() == 0 and H.grad[0, 1].abs().sum() > 0
    assert all(torch.isfinite(t.grad).all() for t in src.parameters())


def test_gradients_reach_generator_and_rational_coefficients():
    for share in (True, False):
        model = hf_model().train()
        src = make_source(model, share=share)
        attach_prompt(model, src)
        b = random_batch(batch_size=3, seq_len=8, prompt_len=3)
        model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
        for name, p in src.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
            if not share and name in ("query", "down_weight", "up_weight"):
                assert all(p.grad[layer].abs().sum() > 0 for layer in range(2)), name  # one generator per layer
        assert src.numerator.shape == (2, 6) and src.denominator.shape == (2, 4)
        assert src.query.shape[0] == (1 if share else 2)


def test_uses_the_fused_rational_op(monkeypatch):
    import lit_ft.callbacks.prompt.iapt as iapt

    calls = []
    real = iapt.rational_activation

    def spy(x, num, den, impl="auto"):
        calls.append((tuple(x.shape), impl))
        return real(x, num, den, impl)

    monkeypatch.setattr(iapt, "rational_activation", spy)
    model = hf_model()
    attach_prompt(model, make_source(model))
    model(input_ids=torch.randint(3, 300, (2, 5)))
    assert calls == [((2, N, R), "auto")] * 2  # once per layer, on the bottleneck
    # GELU-initialised coefficients, one set per layer
    from lit_ft.kernels.rational import gelu_coefficients

    fresh = IAPT(num_virtual_tokens=N, bottleneck=R).build_source(None, None, model, model_geometry(model))
    num, den = gelu_coefficients()
    assert torch.equal(fresh.numerator, num.expand(2, -1)) and torch.equal(fresh.denominator, den.expand(2, -1))
    assert torch.equal(fresh.up_weight, torch.zeros_like(fresh.up_weight)) and fresh.query.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# generate(), artifacts
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["kv", "hidden"])
def test_generate_equals_stepwise_argmax(mode):
    model = hf_model()
    inj = attach_prompt(model, make_source(model, mode))
    ids = torch.randint(3, 300, (1, 6), generator=torch.Generator().manual_seed(5))

    def request_is_the_instruction(seq):
        instr = torch.zeros_like(seq, dtype=torch.bool)
        instr[:, :6] = True  # the prompt is computed once from the request, not from the generated tokens
        inj.set_context(instruction_mask=instr)

    gen = check_generation(model, ids, left_pad=3, before_step=request_is_the_instruction)
    with inj.disabled():
        assert greedy_generate(model, ids).tolist() != gen.tolist()


def test_save_load_same_outputs(tmp_path):
    model = hf_model()
    src = make_source(model, share=False, pooling="bottleneck")
    attach_prompt(model, src)
    ids = torch.randint(3, 300, (2, 7))
    ref = model(input_ids=ids).logits
    path = save_prompt(src, tmp_path / "p")
    fresh = hf_model()
    attach_prompt(fresh, str(path))
    loaded = injector_for(fresh).source
    assert isinstance(loaded, InstructionPromptGenerator)
    assert (loaded.share_generator, loaded.pooling, loaded.bottleneck) == (False, "bottleneck", R)
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Lightning
# ---------------------------------------------------------------------------------------------------------------
class AdamWPlain(PlainHFModule):
    def training_step(self, batch, batch_idx):
        assert "instruction_mask" not in batch  # the callback took it out
        return super().training_step(batch, batch_idx)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class MaskedData(ListDataModule):
    """Batches carrying an explicit ``instruction_mask`` (the first 3 tokens)."""

    def __init__(self, n_batches=3):
        super().__init__(n_batches=n_batches)
        for b in self.batches:
            b["instruction_mask"] = torch.zeros_like(b["input_ids"], dtype=torch.bool)
            b["instruction_mask"][:, :3] = True


@pytest.mark.parametrize("make_module, mode", [("causal", "kv"), ("causal", "hidden"), ("plain", "kv"),
                                               ("peft", "kv")])
def test_training_moves_only_the_generators(make_module, mode, tmp_path):
    torch.manual_seed(0)
    module = {"causal": lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1),
              "plain": AdamWPlain, "peft": LoraModule}[make_module]()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = IAPT(num_virtual_tokens=N, bottleneck=R, prefix_mode=mode, learning_rate=0.05, save_dir=str(tmp_path / "a"))
    snap = Snapshot()
    t = trainer([cb, snap], limit_val_batches=0)
    t.fit(module, datamodule=MaskedData() if make_module == "plain" else ListDataModule(n_batches=3))
    after = module.state_dict()
    keys = sorted(k for k in after if k.startswith("lit_ft_prompts."))
    assert keys == sorted(f"lit_ft_prompts.prompt.{n}" for n in ("query", "down_weight", "down_bias", "up_weight",
                                                                 "up_bias", "numerator", "denominator"))
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # backbone (and LoRA: frozen by freeze_backbone) bit-identical
    for k in keys:  # every generator tensor moved, W_up from zero and the rest once W_up is non-zero
        assert not torch.equal(after[k], snap.at_start[k]), k
    up = "lit_ft_prompts.prompt.up_weight"
    assert torch.equal(snap.at_start[up], torch.zeros_like(after[up]))  # W_up starts at zero
    opt = t.optimizers[0]
    group = next(g for g in opt.param_groups if any(p is cb.source.query for p in g["params"]))
    assert group["lr"] == 0.05 and opt.state[cb.source.query]["step"] == 3
    # the artifact reproduces the trained model's outputs on a fresh backbone
    ids = torch.randint(3, 300, (2, 6))
    hf = module.model.eval()
    ref = hf(input_ids=ids).logits
    fresh = frozen_copy(hf)
    assert not torch.allclose(fresh(input_ids=ids).logits, ref)
    attach_prompt(fresh, str(tmp_path / "a"))
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_instruction_mask_from_batch_or_labels():
    module = CausalLMModule(model_config=tiny_config())
    cb = IAPT(num_virtual_tokens=N, bottleneck=R)
    t = trainer([cb])
    cb.setup(t, module, "fit")
    b = random_batch(batch_size=4, seq_len=10, prompt_len=3)
    expect = (b["labels"] == -100) & b["attention_mask"].bool()
    assert expect[:, :3].all() and not expect[:, 3:].any()  # the prompt part, not the padding
    with torch.no_grad():
        cb.source.up_weight.normal_()  # W_up starts at 0 (every mask gives the zero prefix): make the prefix matter
        cb.on_train_batch_start(t, module, b, 0)
        assert torch.equal(cb.injector._context["instruction_mask"], expect)
        loss_cb = module.compute_token_loss(b, module.model).mean
        assert cb.injector._context == {}  # consumed by the prefill
        cb.injector.set_context(instruction_mask=expect)
        loss_explicit = module.compute_token_loss(b, module.model).mean
        loss_all = module.compute_token_loss(b, module.model).mean  # no context: every non-padding token
    torch.testing.assert_close(loss_cb, loss_explicit, rtol=0, atol=0)
    assert not torch.allclose(loss_cb, loss_all)
    # an explicit mask wins over the labels and leaves the batch
    own = torch.zeros(4, 10, dtype=torch.bool)
    own[:, 5] = True
    b["instruction_mask"] = own
    cb.on_validation_batch_start(t, module, b, 0)
    assert "instruction_mask" not in b and torch.equal(cb.injector._context["instruction_mask"], own)
    # class labels ([B]) are not token labels: no context, every non-padding token is the instruction
    cb.injector.set_context()
    cb.on_train_batch_start(t, module, {"input_ids": b["input_ids"], "labels": torch.zeros(4)}, 0)
    assert cb.injector._context == {}


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_model_without_decoder_layers_and_unsupported_layouts():
    class NoLayers(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = hf_model()
            self.model.model.layers = nn.ModuleList()

    cb = IAPT()
    with pytest.raises(PromptError, match="prefix per decoder layer"):
        cb.setup(trainer([cb]), NoLayers(), "fit")

    class NoRotary(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = hf_model()
            del self.model.model.rotary_emb

    cb = IAPT(prefix_mode="hidden")
    with pytest.raises(PromptError, match="prefix_mode='hidden'.*use prefix_mode='kv'"):
        cb.setup(trainer([cb]), NoRotary(), "fit")


def test_runtime_errors_are_clear():
    model = hf_model()
    inj = attach_prompt(model, make_source(model))
    inj.set_context(instruction_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(PromptError, match="instruction_mask.*is \\(2, 3\\)"):
        model(input_ids=torch.randint(3, 300, (2, 5)))
    inj.set_context()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(PromptError, match="gradient checkpointing"):
        model(input_ids=torch.randint(3, 300, (2, 5)), use_cache=False)
    with pytest.raises(PromptError, match="num_virtual_tokens must be an int >= 1"):
        InstructionPromptGenerator(model_geometry(model), 0)
    with pytest.raises(PromptError, match="prefix_mode"):
        InstructionPromptGenerator(model_geometry(model), prefix_mode="x")
