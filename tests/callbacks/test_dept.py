"""DePT: short prompt + position-indexed low-rank update of the input embeddings, two learning rates."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ft.callbacks import DePT
from lit_ft.callbacks.prompt.dept import DePTEmbedding, lowrank_scale, rank_for_budget
from lit_ft.core.frozen import frozen_copy
from lit_ft.core.prompts import PromptError, attach_prompt, injector_for, load_prompt, model_geometry, save_prompt
from lit_ft.modules import CausalLMModule
from tests.helpers import (
    NoInputEmbeddingsModule,
    AdamWPlain, ListDataModule, LoraModule, SnapshotPrompt, capture_trunk_inputs,
    check_generation, greedy_generate, quiet_trainer, random_batch, tiny_config, tiny_hf_model,
)

trainer = quiet_trainer

hf_model = tiny_hf_model

N = 4  # virtual tokens
S = 12  # max_length of the low-rank table in most tests
R = 3


def make_source(model, cls=DePTEmbedding, seed: int = 1, **kw):
    """A source with every tensor non-trivial (B is zero at init: randomise it so the update is visible)."""
    src = cls(model_geometry(model), N, max_length=kw.pop("max_length", S), rank=R, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in src.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return src


def hand_update(src, pos: int) -> torch.Tensor:
    """``s * sum_k A[pos, k] B[k]`` written out (zero at positions >= max_length)."""
    if pos >= src.max_length:
        return torch.zeros(src.geometry.hidden_size)
    s = src.lora_alpha / math.sqrt(src.rank)
    return s * sum(src.lora_embedding_A[pos, k] * src.lora_embedding_B[k] for k in range(src.rank))


# ---------------------------------------------------------------------------------------------------------------
# The math: what the trunk receives
# ---------------------------------------------------------------------------------------------------------------
def test_trunk_receives_prompt_and_position_indexed_update_token_by_token():
    model = hf_model()
    src = make_source(model, max_length=6)  # positions 6.. get no update (eval mode)
    attach_prompt(model, src)
    seen, h = capture_trunk_inputs(model)
    ids = torch.randint(3, 300, (3, 8))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # right padding
    mask[2, :3] = 0  # left padding: the real tokens still sit at positions 0..4
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    h.remove()
    emb, E = seen["inputs_embeds"], model.model.embed_tokens.weight
    assert seen["input_ids"] is None and emb.shape == (3, N + 8, 32)
    own_pos = [list(range(8)), list(range(5)) + [4, 4, 4], [0, 0, 0] + list(range(5))]
    for i in range(3):
        for t in range(N):
            assert torch.equal(emb[i, t], src.embedding.weight[t])
        for t in range(8):
            p = own_pos[i][t]
            torch.testing.assert_close(emb[i, N + t], E[ids[i, t]] + hand_update(src, p), rtol=1e-6, atol=1e-6)
            if p >= 6:
                assert torch.equal(emb[i, N + t], E[ids[i, t]])  # beyond max_length: the plain embedding
    assert seen["attention_mask"].tolist() == [[1] * N + m for m in mask.tolist()]
    assert seen["position_ids"].tolist() == [list(range(N)) + [N + p for p in row] for row in own_pos]
    assert out.logits.shape == (3, 8, model.config.vocab_size)
    # the update is really applied: without it the real tokens' embeddings differ
    assert not torch.allclose(emb[0, N], E[ids[0, 0]])


def test_left_padded_row_equals_unpadded_row():
    """Indexing by position id (not padded column): right- and left-padded copies of a sequence get the same rows."""
    model = hf_model()
    attach_prompt(model, make_source(model))
    ids = torch.randint(3, 300, (1, 5))
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        left = model(input_ids=torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1),
                     attention_mask=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])).logits
        right = model(input_ids=torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1),
                      attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])).logits
    torch.testing.assert_close(left[:, 3:], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right[:, :5], alone, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_path_and_gradients_match_the_ids_path(monkeypatch):
    """``inputs_embeds`` given: the delta is added to them. Same outputs and the same gradients for P, A, B as the
    ids path (which runs the fused gather + low-rank op)."""
    import lit_ft.callbacks.prompt.dept as dept_mod

    calls = []
    op = dept_mod.prompt_embed
    monkeypatch.setattr(dept_mod, "prompt_embed", lambda *a, **k: calls.append(1) or op(*a, **k))
    model = hf_model().requires_grad_(False)  # a frozen table: the fused op applies (it never computes dE)
    src = make_source(model)
    attach_prompt(model, src)
    b = random_batch(batch_size=2, seq_len=9)
    grads = []
    for use_ids in (True, False):
        src.zero_grad()
        inp = {"input_ids": b["input_ids"]} if use_ids else {"inputs_embeds": model.model.embed_tokens(b["input_ids"])}
        loss = model(**inp, attention_mask=b["attention_mask"], labels=b["labels"]).loss
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in src.named_parameters()}))
        assert len(calls) == 1  # the ids pass went through the fused op, the inputs_embeds pass did not
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-6)
    for n in grads[0][1]:
        assert grads[0][1][n].abs().sum() > 0, n
        torch.testing.assert_close(grads[0][1][n], grads[1][1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_scale_init_and_budget_rule():
    g = model_geometry(hf_model())
    src = DePTEmbedding(g, N, max_length=S, rank=4, lora_alpha=8.0)
    assert src.scale == 8.0 / 2.0  # alpha / sqrt(r): the authors' code
    assert DePTEmbedding(g, N, max_length=S, rank=4, rank_scaling="linear").scale == 8.0 / 4
    assert torch.equal(src.lora_embedding_B, torch.zeros(4, 32))  # the update starts at zero
    A = src.lora_embedding_A
    assert A.abs().max() <= 1 / math.sqrt(4) and A.std() > 0.2  # kaiming-uniform(a=sqrt 5): U(+-1/sqrt(r))
    # equal budget: m*D + r*(S+D) <= budget*D < m*D + (r+1)*(S+D)
    for budget, m, s, d in [(100, 40, 256, 768), (100, 60, 256, 768), (50, N, S, 32)]:
        r = rank_for_budget(budget, m, s, d)
        assert m * d + r * (s + d) <= budget * d < m * d + (r + 1) * (s + d)
    assert rank_for_budget(100, 40, 256, 768) == 45 and rank_for_budget(100, 60, 256, 768) == 30  # the paper's pairs
    assert lowrank_scale(8, 16, "linear") == 0.5


# ---------------------------------------------------------------------------------------------------------------
# generate(), artifacts
# ---------------------------------------------------------------------------------------------------------------
def test_generate_equals_stepwise_argmax_and_left_padding():
    model = hf_model()
    attach_prompt(model, make_source(model, max_length=8))  # generation runs past max_length: no update there
    ids = torch.randint(3, 300, (1, 6))
    gen = check_generation(model, ids, left_pad=3)
    with injector_for(model).disabled():
        bare = greedy_generate(model, ids)
    assert bare.tolist() != gen.tolist()


def test_save_load_same_outputs(tmp_path):
    model = hf_model()
    src = make_source(model, lora_alpha=3.0, rank_scaling="linear")
    attach_prompt(model, src)
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    path = save_prompt(src, tmp_path / "p")
    fresh = hf_model()
    loaded = load_prompt(str(path), fresh)
    assert (type(loaded), loaded.max_length, loaded.rank, loaded.scale) == (DePTEmbedding, S, R, 1.0)
    attach_prompt(fresh, loaded)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Training through Lightning
# ---------------------------------------------------------------------------------------------------------------
def make_module(kind: str):
    torch.manual_seed(0)
    return {"causal": lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1),
            "plain": AdamWPlain, "peft": LoraModule}[kind]()


def check_training_moves_only_the_prompt(Callback, kind, tmp_path, expect_keys, **cb_kw):
    module = make_module(kind)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    cb = Callback(num_virtual_tokens=N, learning_rate=0.05, lowrank_learning_rate=0.02,
                  save_dir=str(tmp_path / "art"), **cb_kw)
    snap = SnapshotPrompt()
    t = trainer([cb, snap], max_steps=4, limit_val_batches=0)
    t.fit(module, datamodule=ListDataModule(n_batches=2))
    after = module.state_dict()
    keys = sorted(k for k in after if k.startswith("lit_ft_prompts."))
    assert keys == sorted(f"lit_ft_prompts.prompt.{k}" for k in expect_keys)
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # backbone (and PEFT's LoRA) bit-identical under AdamW(wd>0)
    for k in keys:
        assert not torch.equal(after[k], snap.at_start[k]), k  # every technique tensor trained
    ids = torch.randint(3, 300, (2, 6))
    hf = module.model.eval()
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        fresh = frozen_copy(hf)
        assert not torch.allclose(fresh(input_ids=ids).logits, ref)
        attach_prompt(fresh, str(tmp_path / "art"))
        torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)
    return cb, t


@pytest.mark.parametrize("kind", ["causal", "plain", "peft"])
def test_training_moves_only_p_a_b(kind, tmp_path):
    cb, _ = check_training_moves_only_the_prompt(
        DePT, kind, tmp_path, ["embedding.weight", "lora_embedding_A", "lora_embedding_B"], match_prompt_tokens=40)
    assert cb.chosen_rank == rank_for_budget(40, N, 256, 32)  # ListDataModule has no max_length: 256


def test_two_param_groups_with_their_lrs_and_the_scheduler():
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-3, weight_decay=0.1, warmup_steps=4)
    cb = DePT(num_virtual_tokens=N, rank=R, learning_rate=0.3, lowrank_learning_rate=5e-3, weight_decay=1e-5)
    t = trainer([cb], max_steps=2, limit_val_batches=0)
    t.fit(module, datamodule=ListDataModule(n_batches=2))
    opt, sched = t.optimizers[0], t.lr_scheduler_configs[0].scheduler
    src = cb.source

    def group_of(p):
        return next(g for g in opt.param_groups if any(q is p for q in g["params"]))

    gp, ga = group_of(src.embedding.weight), group_of(src.lora_embedding_A)
    assert gp is not ga and group_of(src.lora_embedding_B) is ga
    assert (gp["initial_lr"], ga["initial_lr"], gp["weight_decay"], ga["weight_decay"]) == (0.3, 5e-3, 1e-5, 1e-5)
    factor = min(1.0, (2 + 1) / 4)  # the warm-up lambda after 2 scheduler steps
    assert gp["lr"] == pytest.approx(0.3 * factor) and ga["lr"] == pytest.approx(5e-3 * factor)
    assert len(sched.lr_lambdas) == len(sched.base_lrs) == len(opt.param_groups)
    assert opt.state[src.lora_embedding_B]["step"] == 2


def test_max_length_from_the_datamodule_and_text_init(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    class DM(ListDataModule):
        max_length = 20

    module = CausalLMModule(model_config=tiny_config())
    cb = DePT(num_virtual_tokens=5, rank=2, init="text", init_text="add the numbers", tokenizer=tiny_tokenizer_path)
    trainer([cb], limit_val_batches=1).validate(module, datamodule=DM(), verbose=False)  # installs, no step
    assert cb.source.lora_embedding_A.shape == (20, 2) and cb.chosen_rank == 2
    ids = AutoTokenizer.from_pretrained(tiny_tokenizer_path)("add the numbers", add_special_tokens=False)["input_ids"]
    emb = module.model.model.embed_tokens.weight
    for i, tok in enumerate((ids * 5)[:5]):
        assert torch.equal(cb.source.embedding.weight[i], emb[tok])  # PromptTuning's text initialisation


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_training_sequence_longer_than_max_length():
    model = hf_model().train()
    attach_prompt(model, make_source(model, max_length=6))
    model(input_ids=torch.randint(3, 300, (2, 6)))  # exactly fits
    with pytest.raises(PromptError, match="longer than max_length=6"):
        model(input_ids=torch.randint(3, 300, (2, 7)))
    model.eval()
    model(input_ids=torch.randint(3, 300, (2, 7)))  # evaluation / generation: no update past max_length


def test_setup_errors():
    module = CausalLMModule(model_config=tiny_config(max_position_embeddings=16))
    cb = DePT(num_virtual_tokens=16, rank=2)
    with pytest.raises(PromptError, match="max_position_embeddings=16"):
        cb.setup(trainer([cb]), module, "fit")
    cb = DePT(num_virtual_tokens=N, match_prompt_tokens=N + 1, max_length=256)
    with pytest.raises(PromptError, match="match_prompt_tokens=5 leaves no room"):
        cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config()), "fit")

    cb = DePT()
    with pytest.raises(PromptError, match="no input-embedding layer"):
        cb.setup(trainer([cb]), NoInputEmbeddingsModule(), "fit")


@pytest.mark.parametrize("kwargs, match", [
    ({"match_prompt_tokens": None}, "give `rank` or `match_prompt_tokens`"),
    ({"rank": 0, "match_prompt_tokens": None}, "`rank` must be an int >= 1"),
    ({"match_prompt_tokens": 40}, "must exceed `num_virtual_tokens`"),
    ({"init": "text"}, "needs `init_text`"),
    ({"seed": None}, "`seed` must be an int"),  # the matrix's fuzz column: was int()'s bare TypeError
    ({"init_text": [0]}, "`init_text` must be a non-empty string"),
])
def test_bad_argument_combinations(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DePT(**kwargs)
