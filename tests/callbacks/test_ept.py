"""EPT: DePT + prompt fusion + gated multi-space projection of the prompt."""

from __future__ import annotations

import math

import pytest
import torch

from lit_ft.callbacks import EPT, DePT
from lit_ft.callbacks.prompt.ept import EPTEmbedding
from lit_ft.core.prompts import PromptError, attach_prompt, injector_for, load_prompt, model_geometry, save_prompt
from lit_ft.modules import CausalLMModule
from tests.callbacks.test_dept import (
    N,
    R,
    S,
    capture_trunk_inputs,
    check_training_moves_only_the_prompt,
    hand_update,
    hf_model,
    make_source,
    trainer,
)
from tests.helpers import (
    ListDataModule, check_generation, greedy_generate, random_batch, tiny_config,
)

DEPT_KEYS = ["embedding.weight", "lora_embedding_A", "lora_embedding_B"]
GEN_KEYS = ["gate.weight", "gate.bias", "proj_down", "proj_up"]
FUSION_KEYS = ["fusion_q.weight", "fusion_k.weight", "fusion_v.weight", "fusion_out.weight"]


def loop_reference(src: EPTEmbedding) -> torch.Tensor:
    """The EPT prompt written token by token and space by space (no batched einsum/GEMM tricks)."""
    D, m = src.geometry.hidden_size, src.num_virtual_tokens
    P = src.embedding.weight
    table = torch.stack([hand_update(src, p) for p in range(src.max_length)])  # s * A[p] B
    fused = []
    for j in range(m):
        p = P[j]
        if src.fusion == "none":
            fused.append(p)
            continue
        memory = list(table) if src.fusion == "lowrank" else list(P) + list(table)
        q = src.fusion_q.weight @ p
        scores = torch.stack([q @ (src.fusion_k.weight @ x) for x in memory]) / math.sqrt(src.fusion_dim)
        w = torch.exp(scores - scores.max())
        w = w / w.sum()
        ctx = sum(w[i] * (src.fusion_v.weight @ x) for i, x in enumerate(memory))
        fused.append(p + src.fusion_out.weight @ ctx)
    out = []
    for p in fused:
        logits = src.gate.weight @ p + src.gate.bias
        g = torch.exp(logits) / torch.exp(logits).sum()
        acc = torch.zeros(D, dtype=P.dtype)
        for i in range(src.num_subspaces):
            W_i = torch.eye(D, dtype=P.dtype) + src.proj_down[i] @ src.proj_up[i]  # W_i = I + U_i V_i
            acc = acc + g[i] * (p @ W_i)
        out.append(acc)
    return torch.stack(out)


def ept_source(model, fusion="lowrank", **kw):
    return make_source(model, cls=EPTEmbedding, num_subspaces=3, projection_rank=2, fusion=fusion, fusion_dim=5, **kw)


# ---------------------------------------------------------------------------------------------------------------
# The math
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", ["lowrank", "joint", "none"])
def test_prompt_formula_matches_an_explicit_loop(fusion):
    model = hf_model()
    src = ept_source(model, fusion=fusion).double()  # fp64: the batched and the looped sums agree to ~1e-15
    with torch.no_grad():
        ref = loop_reference(src)
        got = src.generated_prompt()
    assert got.shape == (N, 32)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, src.embedding.weight, atol=1e-3)  # the generator really changes the prompt
    # and the fusion step really depends on the low-rank table (except without fusion)
    with torch.no_grad():
        src.lora_embedding_B.mul_(2.0)
        changed = not torch.allclose(src.generated_prompt(), got)
    assert changed == (fusion != "none")


def _hand_built_source(fusion):
    """A tiny EPT source whose tensors are set by hand (everything else 0), fp64, ``s = 1``:

    - ``P[j] = (j + 1) e0`` (4 virtual tokens); the low-rank table has 3 rows ``s A[p] B = p e1`` (p = 0, 1, 2);
    - fusion: ``q = P[:, 0]`` (one query channel), ``v = M[:, 1]``, ``W_o`` writes the attended value to dim 3;
      keys are set per case by the test;
    - gate logits ``[0, 0, ln2 * P_f[0]]``: ``g = [1, 1, 2^(j+1)] / (2 + 2^(j+1))`` for token ``j``;
    - ``U_0 V_0 = 4 e0 e5^T``, ``U_1 V_1 = 0``, ``U_2 V_2 = 2 e3 e6^T`` (so ``W_i = I + U_i V_i``).
    """
    model = hf_model()
    src = EPTEmbedding(model_geometry(model), N, max_length=3, rank=1, lora_alpha=1.0, rank_scaling="linear",
                       num_subspaces=3, projection_rank=2, fusion=fusion, fusion_dim=5).double()
    with torch.no_grad():
        for t in src.parameters():
            t.zero_()
        src.embedding.weight[:, 0] = torch.arange(1.0, N + 1)
        src.lora_embedding_A[:, 0] = torch.tensor([0.0, 1.0, 2.0])
        src.lora_embedding_B[0, 1] = 1.0
        if fusion != "none":
            src.fusion_q.weight[0, 0] = 1.0
            src.fusion_v.weight[0, 1] = 1.0
            src.fusion_out.weight[3, 0] = 1.0
        src.gate.weight[2, 0] = math.log(2.0)
        src.proj_down[0, 0, 0], src.proj_up[0, 0, 5] = 1.0, 4.0
        src.proj_down[2, 3, 0], src.proj_up[2, 0, 6] = 1.0, 2.0
    return src


@pytest.mark.parametrize("fusion, keys, ctx", [
    ("none", None, 0.0),
    ("lowrank", "flat", 1.0),  # equal scores: the mean of the table's values 0, 1, 2
    ("joint", "flat", 3 / 7),  # ... over [P; table]: P's values are 0 -> (0+1+2) / 7
    ("lowrank", "sharp", 2.0),  # keys 1000 x the value: all attention on the largest row (p = 2)
    ("joint", "sharp", 2.0),
])
def test_prompt_on_a_hand_built_case_with_known_numbers(fusion, keys, ctx):
    """Known numbers, not a second copy of the formula: ``P_hat[j] = (j+1) e0 + c e3 + 4 (j+1) g0 e5 + 2 c g2 e6``
    with ``c`` the attended value (0 without fusion), ``g0 = 1 / (2 + 2^(j+1))``, ``g2 = 2^(j+1) / (2 + 2^(j+1))``."""
    src = _hand_built_source(fusion)
    if keys == "sharp":
        with torch.no_grad():
            src.fusion_k.weight[0, 1] = 1000.0
    with torch.no_grad():
        got = src.generated_prompt()
    expect = torch.zeros(N, 32, dtype=torch.float64)
    for j in range(N):
        g0, g2 = 1 / (2 + 2 ** (j + 1)), 2 ** (j + 1) / (2 + 2 ** (j + 1))
        expect[j, 0] = j + 1
        expect[j, 3] = ctx
        expect[j, 5] = 4 * (j + 1) * g0
        expect[j, 6] = 2 * ctx * g2
    torch.testing.assert_close(got, expect, rtol=1e-12, atol=1e-12)


def test_trunk_receives_generated_prompt_and_dept_update():
    model = hf_model()
    src = ept_source(model)
    attach_prompt(model, src)
    seen, h = capture_trunk_inputs(model)
    ids = torch.randint(3, 300, (2, 6))
    calls = []
    orig = src.generated_prompt
    src.generated_prompt = lambda: calls.append(1) or orig()
    with torch.no_grad():
        model(input_ids=ids)
    h.remove()
    assert len(calls) == 1  # computed once per forward as [m, D], broadcast over the batch
    emb, E = seen["inputs_embeds"], model.model.embed_tokens.weight
    with torch.no_grad():
        P_hat = loop_reference(src)
    for i in range(2):
        torch.testing.assert_close(emb[i, :N], P_hat, rtol=1e-4, atol=1e-4)  # fp32 (the fp64 check is above)
        for t in range(6):
            torch.testing.assert_close(emb[i, N + t], E[ids[i, t]] + hand_update(src, t), rtol=1e-6, atol=1e-6)


def test_ept_equals_dept_at_initialisation():
    """Same seed -> same P, A, B, and V_i = 0, W_o = 0: the injected prompt is P exactly, the logits bit-identical."""
    out, srcs = {}, {}
    b = random_batch(batch_size=2, seq_len=10)
    for Callback in (DePT, EPT):
        torch.manual_seed(0)
        module = CausalLMModule(model_config=tiny_config())
        cb = Callback(num_virtual_tokens=N, rank=R, seed=3)
        cb.setup(trainer([cb]), module, "validate")
        with torch.no_grad():
            out[Callback] = module.model.eval()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        srcs[Callback] = cb.source
    assert torch.equal(out[DePT], out[EPT])
    for k in DEPT_KEYS:
        assert torch.equal(srcs[DePT].state_dict()[k], srcs[EPT].state_dict()[k]), k
    assert torch.equal(srcs[EPT].generated_prompt(), srcs[EPT].embedding.weight)
    assert srcs[EPT].proj_down.abs().sum() > 0 and srcs[EPT].fusion_q.weight.abs().sum() > 0  # not a dead generator


# ---------------------------------------------------------------------------------------------------------------
# generate(), artifacts
# ---------------------------------------------------------------------------------------------------------------
def test_generate_equals_stepwise_argmax():
    model = hf_model()
    attach_prompt(model, ept_source(model, fusion="joint"))
    ids = torch.randint(3, 300, (1, 6))
    gen = check_generation(model, ids)
    with injector_for(model).disabled():
        assert greedy_generate(model, ids).tolist() != gen.tolist()


def test_save_load_same_outputs(tmp_path):
    model = hf_model()
    src = ept_source(model, fusion="joint")
    attach_prompt(model, src)
    ids = torch.randint(3, 300, (2, 7))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    fresh = hf_model()
    loaded = load_prompt(str(save_prompt(src, tmp_path / "p")), fresh)
    assert (type(loaded), loaded.fusion, loaded.num_subspaces, loaded.projection_rank, loaded.fusion_dim) == \
        (EPTEmbedding, "joint", 3, 2, 5)
    attach_prompt(fresh, loaded)
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# Training through Lightning
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, fusion", [("causal", "lowrank"), ("plain", "joint"), ("peft", "none")])
def test_training_moves_only_ept_tensors(kind, fusion, tmp_path):
    keys = DEPT_KEYS + GEN_KEYS + (FUSION_KEYS if fusion != "none" else [])
    check_training_moves_only_the_prompt(EPT, kind, tmp_path, keys, rank=R, fusion=fusion, fusion_dim=4,
                                         generator_learning_rate=0.01)


def test_three_learning_rates_and_the_scheduler():
    def groups(**kw):
        torch.manual_seed(0)
        module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-3, warmup_steps=4)
        cb = EPT(num_virtual_tokens=N, rank=R, learning_rate=0.3, lowrank_learning_rate=5e-3, **kw)
        t = trainer([cb], max_steps=2, limit_val_batches=0)
        t.fit(module, datamodule=ListDataModule(n_batches=2))
        opt = t.optimizers[0]
        sched = t.lr_scheduler_configs[0].scheduler
        assert len(sched.lr_lambdas) == len(sched.base_lrs) == len(opt.param_groups)
        where = {id(p): g for g in opt.param_groups for p in g["params"]}
        return {n: where[id(p)] for n, p in cb.source.named_parameters()}

    g = groups(generator_learning_rate=1e-2)
    factor = min(1.0, (2 + 1) / 4)
    assert g["embedding.weight"]["initial_lr"] == 0.3
    assert g["lora_embedding_A"]["initial_lr"] == g["lora_embedding_B"]["initial_lr"] == 5e-3
    for k in GEN_KEYS + FUSION_KEYS:
        assert g[k]["initial_lr"] == 1e-2, k
        assert g[k]["lr"] == pytest.approx(1e-2 * factor), k
    g = groups()  # generator lr defaults to the low-rank pair's
    assert all(g[k]["initial_lr"] == 5e-3 for k in GEN_KEYS + FUSION_KEYS)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
def test_source_and_setup_errors():
    g = model_geometry(hf_model())
    with pytest.raises(PromptError, match="projection_rank must be an int in"):
        EPTEmbedding(g, N, max_length=S, rank=R, projection_rank=33)
    with pytest.raises(PromptError, match="fusion must be one of"):
        EPTEmbedding(g, N, max_length=S, rank=R, fusion="cross")
    cb = EPT(num_virtual_tokens=N, rank=R, projection_rank=64)
    with pytest.raises(PromptError, match=r"`projection_rank` \(64\) must be <= the hidden size \(32\)"):
        cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config()), "fit")
    model = hf_model().train()
    attach_prompt(model, ept_source(model, max_length=5))
    with pytest.raises(PromptError, match="longer than max_length=5"):
        model(input_ids=torch.randint(3, 300, (1, 6)))


def test_rank_or_match_prompt_tokens_is_needed():
    with pytest.raises(ValueError, match="give `rank` or `match_prompt_tokens`"):
        EPT(match_prompt_tokens=None)
