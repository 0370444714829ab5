"""PromptTuning / PrefixTuning and the shared prompt injector (lit_ft/core/prompts.py, callbacks/_prompt.py)."""

from __future__ import annotations

import copy

import pytest
import torch

from lit_ft.callbacks import PrefixTuning, PromptTuning
from lit_ft.callbacks.prompt.prefix_tuning import PrefixEncoder
from lit_ft.callbacks.prompt.prompt_tuning import PromptEmbedding
from lit_ft.core.prompts import (
    PromptError,
    attach_prompt,
    detach_prompt,
    injector_for,
    load_prompt,
    model_geometry,
    save_prompt,
)
from lit_ft.core.frozen import frozen_copy
from lit_ft.modules import CausalLMModule
from tests.helpers import (
    NoInputEmbeddingsModule,
    AdamWPlain, ListDataModule, LoraModule, SnapshotPrompt, capture_trunk_inputs,
    check_generation, greedy_generate, quiet_trainer, random_batch, tiny_config, tiny_hf_model,
)

trainer = quiet_trainer

hf_model = tiny_hf_model

N = 4


def make_source(kind: str, model, seed: int = 1):
    g = model_geometry(model)
    src = PromptEmbedding(g, N) if kind == "prompt" else PrefixEncoder(g, N)
    torch.manual_seed(seed)
    with torch.no_grad():
        src.embedding.weight.normal_(0, 0.5)
    return src


# ---------------------------------------------------------------------------------------------------------------
# What the trunk receives, token by token
# ---------------------------------------------------------------------------------------------------------------
def test_prompt_inputs_mask_positions_token_by_token():
    model = hf_model()
    src = make_source("prompt", model)
    attach_prompt(model, src)
    seen, h = capture_trunk_inputs(model)
    b = random_batch(batch_size=2, seq_len=7, prompt_len=2)
    b["attention_mask"][0] = 1
    b["attention_mask"][1] = torch.tensor([1, 1, 1, 1, 1, 0, 0])
    out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    emb = seen["inputs_embeds"]
    assert seen["input_ids"] is None and emb.shape == (2, N + 7, 32)
    for i in range(2):
        for t in range(N):
            assert torch.equal(emb[i, t], src.embedding.weight[t])
        for t in range(7):
            assert torch.equal(emb[i, N + t], model.model.embed_tokens.weight[b["input_ids"][i, t]])
    assert seen["attention_mask"].tolist() == [[1] * N + m for m in b["attention_mask"].tolist()]
    assert seen["position_ids"][0].tolist() == list(range(N + 7))
    assert seen["position_ids"][1].tolist()[: N + 5] == list(range(N + 5))
    # the prompt positions are removed from the outputs: logits align with the user's tokens / labels
    assert out.logits.shape == (2, 7, model.config.vocab_size)


def test_prefix_fills_cache_and_shifts_positions():
    model = hf_model()
    src = make_source("prefix", model)
    attach_prompt(model, src)
    seen, h = capture_trunk_inputs(model)
    ids = torch.randint(3, 300, (2, 6))
    model(input_ids=ids, use_cache=False)
    h.remove()
    cache = seen["cache"]
    g = model_geometry(model)
    kv = src.embedding.weight.view(N, 2 * g.num_layers, g.num_kv_heads, g.head_dim)
    for layer in range(g.num_layers):
        keys = cache.layers[layer].keys
        assert keys.shape == (2, g.num_kv_heads, N + 6, g.head_dim)  # prefix + the tokens the layer appended
        assert torch.equal(keys[:, :, :N], kv[:, 2 * layer].permute(1, 0, 2).unsqueeze(0).expand(2, -1, -1, -1))
        assert torch.equal(cache.layers[layer].values[:, :, :N],
                           kv[:, 2 * layer + 1].permute(1, 0, 2).unsqueeze(0).expand(2, -1, -1, -1))
    assert seen["attention_mask"].tolist() == [[1] * (N + 6)] * 2
    assert seen["position_ids"].tolist() == [list(range(N, N + 6))] * 2


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_matches_peft(kind):
    """Same tensors -> the same logits on the user's tokens as HF PEFT (and the same loss when the first token is
    not supervised: PEFT also trains the last virtual position to predict token 0, which has no prediction here,
    exactly as without a prompt)."""
    import peft

    base = hf_model()
    cfg = (peft.PromptTuningConfig if kind == "prompt" else peft.PrefixTuningConfig)(task_type="CAUSAL_LM",
                                                                                      num_virtual_tokens=N)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.normal_(0, 0.5)
    b = random_batch(batch_size=3, seq_len=9, prompt_len=3)
    ref = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    src = make_source(kind, base)
    with torch.no_grad():
        src.embedding.weight.copy_(pm.prompt_encoder.default.embedding.weight)
    attach_prompt(base, src)
    out = base(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])
    ref_logits = ref.logits[:, N:] if kind == "prompt" else ref.logits
    real = b["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], ref_logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


def test_load_peft_saved_prompt(tmp_path):
    import peft

    base = hf_model()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        pm.prompt_encoder.default.embedding.weight.normal_(0, 0.3)
    pm.save_pretrained(str(tmp_path / "peft"))
    module = CausalLMModule(model_config=tiny_config())
    module.model.load_state_dict(base.state_dict())
    cb = PromptTuning(num_virtual_tokens=N, peft_weights=str(tmp_path / "peft"))
    cb.setup(trainer([cb]), module, "validate")
    assert torch.equal(cb.source.embedding.weight, pm.prompt_encoder.default.embedding.weight)
    ids = torch.randint(3, 300, (2, 8))
    torch.testing.assert_close(module.model.eval()(input_ids=ids).logits, pm(input_ids=ids).logits[:, N:])
    with pytest.raises(PromptError, match="num_virtual_tokens x hidden size"):
        bad = PromptTuning(num_virtual_tokens=N + 1, peft_weights=str(tmp_path / "peft"))
        bad.setup(trainer([bad]), CausalLMModule(model_config=tiny_config()), "validate")


# ---------------------------------------------------------------------------------------------------------------
# generate()
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_generate_equals_stepwise_argmax_and_left_padding(kind):
    model = hf_model()
    attach_prompt(model, make_source(kind, model))
    ids = torch.randint(3, 300, (1, 6))
    gen = check_generation(model, ids, left_pad=3)  # = stepwise argmax; a left-padded row generates the same
    # and the prompt changes what is generated (it is really there)
    with injector_for(model).disabled():
        bare = greedy_generate(model, ids)
    assert bare.tolist() != gen.tolist()


def test_disabled_and_detach_restore_the_bare_model():
    model = hf_model()
    ids = torch.randint(3, 300, (2, 6))
    bare = model(input_ids=ids).logits
    inj = attach_prompt(model, make_source("prompt", model))
    assert not torch.allclose(model(input_ids=ids).logits, bare)
    with inj.disabled():
        assert torch.equal(model(input_ids=ids).logits, bare)
    with inj.using(None):
        assert torch.equal(model(input_ids=ids).logits, bare)
    detach_prompt(model)
    assert torch.equal(model(input_ids=ids).logits, bare)
    assert not hasattr(model, "lit_ft_prompts")


def test_foreign_cache_is_refused():
    from transformers import DynamicCache

    model = hf_model()
    ids = torch.randint(3, 300, (1, 5))
    cache = DynamicCache(config=model.config)
    with injector_for(model).using(None):  # a cache built without the prompt
        model(input_ids=ids, cache=cache, use_cache=True)
    attach_prompt(model, make_source("prompt", model))
    with pytest.raises(PromptError, match="not built with it"):
        model(input_ids=ids[:, -1:], cache=cache, use_cache=True)


# ---------------------------------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_save_load_same_outputs(tmp_path, kind):
    model = hf_model()
    src = make_source(kind, model)
    attach_prompt(model, src)
    ids = torch.randint(3, 300, (2, 7))
    ref = model(input_ids=ids).logits
    path = save_prompt(src, tmp_path / "p", metadata={"base_model": "tiny"})
    # lit_ft's two files, and the same prompt as a PEFT adapter (test_prompt_peft_export.py checks it loads there)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                      "prompt.safetensors", "prompt_config.json"]
    assert (path / "prompt.safetensors").stat().st_size < 20_000  # the prompt only, no base weights
    fresh = hf_model()
    attach_prompt(fresh, str(path))
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)
    with pytest.raises(PromptError, match="trained for"):
        load_prompt(str(path), hf_model(hidden_size=48))


# ---------------------------------------------------------------------------------------------------------------
# Training through Lightning
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make_module", ["causal", "plain", "peft"])
@pytest.mark.parametrize("Callback", [PromptTuning, PrefixTuning])
def test_training_moves_only_the_prompt(make_module, Callback, tmp_path):
    torch.manual_seed(0)
    module = {"causal": lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1),
              "plain": AdamWPlain, "peft": LoraModule}[make_module]()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = Callback(num_virtual_tokens=N, learning_rate=0.05, save_dir=str(tmp_path / "art"))
    snap = SnapshotPrompt()
    t = trainer([cb, snap], limit_val_batches=0)
    t.fit(module, datamodule=ListDataModule(n_batches=3))
    after = module.state_dict()
    prompt_keys = [k for k in after if k.startswith("lit_ft_prompts.")]
    assert prompt_keys == ["lit_ft_prompts.prompt.embedding.weight"]
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # backbone (and PEFT's LoRA: frozen by freeze_backbone) untouched
    assert not torch.equal(after[prompt_keys[0]], snap.at_start[prompt_keys[0]])  # the prompt trained
    opt = t.optimizers[0]
    prompt_param = cb.source.embedding.weight
    group = next(g for g in opt.param_groups if any(p is prompt_param for p in g["params"]))
    assert group["lr"] == 0.05 and opt.state[prompt_param]["step"] == 3
    # the artifact written at fit end reproduces the trained model's outputs on a fresh backbone
    ids = torch.randint(3, 300, (2, 6))
    hf = module.model.eval()
    ref = hf(input_ids=ids).logits
    fresh = frozen_copy(hf)  # the backbone without lit_ft's hooks: a bare model
    assert not torch.allclose(fresh(input_ids=ids).logits, ref)
    attach_prompt(fresh, str(tmp_path / "art"))
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)


@pytest.mark.parametrize("Callback", [PromptTuning, PrefixTuning])
def test_prompt_moves_and_loss_falls(Callback):
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=0.05)
    cb = Callback(num_virtual_tokens=N, learning_rate=0.5)
    t = trainer([cb], max_steps=1, limit_val_batches=0)
    t.fit(module, datamodule=ListDataModule(n_batches=1))
    w0 = cb.source.embedding.weight.detach().clone()
    batch = random_batch(seed=0)
    loss0 = module.compute_token_loss(batch, module.model).mean
    t = trainer([cb], max_steps=30, limit_val_batches=0)
    t.fit(module, datamodule=ListDataModule(n_batches=1))
    assert not torch.equal(cb.source.embedding.weight, w0)
    # a random 2-layer model is near-uniform (loss ~ log V): the prompt can only nudge it, but it must
    assert module.compute_token_loss(batch, module.model).mean < loss0 - 2e-3


def test_text_init_and_errors(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    module = CausalLMModule(model_config=tiny_config())
    cb = PromptTuning(num_virtual_tokens=7, init="text", init_text="add the numbers", tokenizer=tiny_tokenizer_path)
    cb.setup(trainer([cb]), module, "fit")
    ids = tok("add the numbers", add_special_tokens=False)["input_ids"]
    expect = (ids * 7)[:7]
    emb = module.model.model.embed_tokens.weight
    for t in range(7):
        assert torch.equal(cb.source.embedding.weight[t], emb[expect[t]])
    assert not module.model.model.embed_tokens.weight.requires_grad and cb.source.embedding.weight.requires_grad
    # a second prompt technique on the same model is refused
    other = PrefixTuning()
    with pytest.raises(PromptError, match="one prompt technique per model"):
        other.setup(trainer([cb, other]), module, "fit")
    # init='text' without any tokenizer
    nt = PromptTuning(init="text", init_text="hello")
    with pytest.raises(PromptError, match="needs a tokenizer"):
        nt.setup(trainer([nt]), CausalLMModule(model_config=tiny_config()), "fit")


def test_unknown_init_text_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "classify": 1, "this": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]").save_pretrained(str(tmp_path / "tok"))
    cb = PromptTuning(init="text", init_text="classify this zebra", tokenizer=str(tmp_path / "tok"))
    with pytest.raises(PromptError, match=r"unknown to the tokenizer \(\['\[UNK\]'\]\)"):
        cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config()), "fit")


def test_prompt_longer_than_context():
    model = hf_model(max_position_embeddings=12)
    attach_prompt(model, make_source("prompt", model))
    model(input_ids=torch.randint(3, 300, (1, 12 - N)))  # exactly fits
    with pytest.raises(PromptError, match="longer than the model's context"):
        model(input_ids=torch.randint(3, 300, (1, 12 - N + 1)))


def test_model_without_input_embeddings():
    cb = PromptTuning()
    with pytest.raises(PromptError, match="no input-embedding layer"):
        cb.setup(trainer([cb]), NoInputEmbeddingsModule(), "fit")


def test_text_init_needs_init_text():
    with pytest.raises(ValueError, match="needs `init_text`"):
        PromptTuning(init="text")


def test_prefix_projection_matches_peft_layout():
    import peft

    base = hf_model()
    pm = peft.get_peft_model(copy.deepcopy(base), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16))
    src = PrefixEncoder(model_geometry(base), N, projection_hidden_size=16)
    state = {k.replace("prompt_encoder.default.", ""): v for k, v in pm.state_dict().items() if "prompt_encoder" in k}
    src.load_state_dict(state)  # same tensor names and shapes as PEFT's PrefixEncoder
    attach_prompt(base, src)
    ids = torch.randint(3, 300, (2, 7))
    torch.testing.assert_close(base(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_prefix_refuses_gradient_checkpointing():
    model = hf_model().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False}) if hasattr(
        model, "gradient_checkpointing_enable") else model.activation_checkpointing_enable()
    attach_prompt(model, make_source("prefix", model))
    ids = torch.randint(3, 300, (1, 5))
    with pytest.raises(PromptError, match="gradient checkpointing"):
        model(input_ids=ids, labels=ids)
    with torch.no_grad():  # no backward to replay: the cache is kept, the prefix applies
        model(input_ids=ids)
    # an embeddings prompt is unaffected by checkpointing
    detach_prompt(model)
    attach_prompt(model, make_source("prompt", model))
    model(input_ids=ids, labels=ids).loss.backward()


@pytest.mark.parametrize("Callback", [PromptTuning, PrefixTuning])
@pytest.mark.parametrize("kwargs, name", [
    ({"seed": [-1]}, "seed"), ({"seed": None}, "seed"), ({"seed": "1"}, "seed"), ({"tokenizer": 3}, "tokenizer"),
])
def test_wrong_argument_types_are_named(Callback, kwargs, name):
    """A seed / tokenizer of the wrong type is refused naming the argument (the matrix's fuzz column found
    ``seed=[-1]`` raising int()'s bare TypeError)."""
    with pytest.raises(ValueError, match=f"{Callback.__name__}: `{name}` must be"):
        Callback(**kwargs)


@pytest.mark.parametrize("kwargs, name", [({"init_text": 5}, "init_text"), ({"peft_weights": ["x"]}, "peft_weights")])
def test_prompt_tuning_text_and_weights_must_be_strings(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be a non-empty string or null"):
        PromptTuning(**kwargs)
