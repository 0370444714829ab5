"""CPT (Context-aware Prompt Tuning): context tokens/types/labels, E0 + delta, label-token gradient mask, post-step
projection, decay weights, the loss against a hand-written CE and against HF PEFT's CPT, Lightning training on
every loss path, artifacts, generate(), resume, errors."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer

from lit_ft.callbacks import CPT
from lit_ft.callbacks.prompt.cpt import CPTEmbedding, draw_examples
from lit_ft.core.frozen import frozen_copy
from lit_ft.core.prompts import PromptError, attach_prompt, injector_for, load_prompt, save_prompt
from lit_ft.modules import CausalLMModule
from tests.helpers import (
    NoInputEmbeddingsModule,
    AdamWPlain, ListDataModule, LoraModule, assert_state_dicts_equal, check_generation, fit_and_resume,
    greedy_generate, quiet_trainer, random_batch, tiny_config, tiny_hf_model,
)

trainer = quiet_trainer

def hf_model(seed: int = 0, **overrides):
    return tiny_hf_model(seed, train=True, **overrides)

EXAMPLES = [{"input": "3 plus 4", "output": "7"}, {"input": "2 plus 2", "output": "4"}]
TEMPLATES = {"input_template": "Q: {} ?", "output_template": "A: {}."}
D = 32  # tiny_config hidden size


def installed(tok_path, module=None, **kw):
    module = module if module is not None else CausalLMModule(model_config=tiny_config())
    cb = CPT(**{"examples": EXAMPLES, "tokenizer": tok_path, **TEMPLATES, **kw})
    cb.setup(trainer([cb]), module, "fit")
    return cb, module


def hand_context(tok):
    """The context built by hand: (ids, types) piece by piece."""
    def t(s):
        return tok(s, add_special_tokens=False)["input_ids"]

    ids, types = [], []
    for i, ex in enumerate(EXAMPLES):
        for piece, ty in (("Q: ", 4 * i + 1), (ex["input"], 4 * i + 2), (" ?", 4 * i + 1), (" ", 0), ("A: ", 4 * i + 3),
                          (ex["output"], 4 * i + 4), (".", 4 * i + 3)):
            ids += t(piece)
            types += [ty] * len(t(piece))
        ids.append(tok.eos_token_id)
        types.append(0)
    return ids, types


def randomise_delta(src, scale=0.3, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        src.delta.copy_(torch.randn(src.delta.shape, generator=g) * scale)


def eps_of(types, d=D, eps_in=0.1, eps_fmt=0.1):
    out = []
    for ty in types:
        if ty > 0 and ty % 4 in (1, 3):
            out.append(eps_fmt * math.sqrt(d / 2048))
        elif ty > 0 and ty % 4 == 2:
            out.append(eps_in * math.sqrt(d / 2048))
        else:
            out.append(0.0)
    return torch.tensor(out)


def reference_loss(hf, prompt, batch, full_labels, weights=None):
    """CE by hand: run the bare model on [prompt; E[x]] and score position t against label t+1."""
    B, T = batch["input_ids"].shape
    n = prompt.shape[0]
    E = hf.get_input_embeddings().weight
    embeds = torch.cat([prompt.unsqueeze(0).expand(B, -1, -1), E[batch["input_ids"]]], dim=1)
    mask = torch.cat([torch.ones(B, n, dtype=torch.long), batch["attention_mask"]], dim=1)
    pos = torch.arange(n + T).expand(B, -1)
    with injector_for(hf).disabled():
        logits = hf(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits.float()
    total, count = 0.0, 0
    for b in range(B):
        for t in range(n + T - 1):
            y = int(full_labels[b, t + 1])
            if y == -100:
                continue
            w = 1.0 if weights is None else float(weights[b, t + 1])
            total = total - w * F.log_softmax(logits[b, t], -1)[y]
            count += 1
    return total / count, logits


# ---------------------------------------------------------------------------------------------------------------
# The context, token by token
# ---------------------------------------------------------------------------------------------------------------
def test_context_tokens_types_e0_and_labels(tiny_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    cb, module = installed(tiny_tokenizer_path)
    src = cb.source
    ids, types = hand_context(tok)
    assert src.token_ids.tolist() == ids and src.type_mask.tolist() == types
    assert src.num_virtual_tokens == len(ids) and src.num_examples == 2
    assert sorted(set(types)) == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    emb = module.model.get_input_embeddings().weight
    for t in range(len(ids)):
        assert torch.equal(src.base[t], emb[ids[t]])  # E0 = the embedding rows
    assert torch.equal(src.delta, torch.zeros(len(ids), D)) and src.delta.requires_grad
    assert not src.base.requires_grad and [n for n, _ in src.named_parameters()] == ["delta"]
    expect_labels = [i if ty > 0 and ty % 4 == 0 else -100 for i, ty in zip(ids, types)]
    assert src.context_labels().tolist() == expect_labels
    assert sum(v != -100 for v in expect_labels) == len(tok("7", add_special_tokens=False)["input_ids"]) + len(
        tok("4", add_special_tokens=False)["input_ids"])


def test_trunk_inputs_and_batch_labels_token_by_token(tiny_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    cb, module = installed(tiny_tokenizer_path)
    src, hf = cb.source, module.model
    ids, types = hand_context(tok)
    n = len(ids)
    randomise_delta(src)  # label / separator rows of delta must not reach the prompt
    b = random_batch(batch_size=2, seq_len=7, prompt_len=2)
    labels0 = b["labels"].clone()
    cb.extend_batch(b, training=True)
    assert b["labels"].shape == (2, n + 7)
    for row in range(2):
        for t in range(n):
            assert int(b["labels"][row, t]) == (ids[t] if types[t] > 0 and types[t] % 4 == 0 else -100)
        assert torch.equal(b["labels"][row, n:], labels0[row])
    assert "token_weights" not in b  # no decay: no weights needed
    seen = {}
    h = hf.model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    out = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    h.remove()
    emb = seen["inputs_embeds"]
    E = hf.get_input_embeddings().weight
    for t in range(n):
        upd = types[t] > 0 and types[t] % 4 != 0
        expect = src.base[t] + src.delta[t] if upd else src.base[t]
        assert torch.equal(emb[0, t], expect) and torch.equal(emb[1, t], expect)
    for t in range(7):
        assert torch.equal(emb[1, n + t], E[b["input_ids"][1, t]])
    assert seen["attention_mask"].tolist() == [[1] * n + m for m in b["attention_mask"].tolist()]
    assert seen["position_ids"][1].tolist() == list(range(n + 7))  # row 1: no padding
    assert seen["position_ids"][0].tolist()[: n + 6] == list(range(n + 6))  # row 0: its last token is padding
    # outputs keep the context during a CPT batch: logits align with the extended labels ...
    assert out.logits.shape == (2, n + 7, 384)
    # ... and the first query token is predicted from the last context position (an eos, type 0)
    assert types[-1] == 0
    cb._release()
    assert hf(input_ids=b["input_ids"]).logits.shape == (2, 7, 384)  # outside a CPT batch: the user's length
    # evaluation batches get -100 for the whole context
    v = random_batch(batch_size=2, seq_len=7, prompt_len=2)
    cb.extend_batch(v, training=False)
    assert (v["labels"][:, :n] == -100).all() and src.keep_prompt_outputs
    cb._release()


def test_decay_weights(tiny_tokenizer_path):
    examples = [{"input": f"{a} plus 1", "output": str(a + 1)} for a in (1, 2, 3)]
    cb, _ = installed(tiny_tokenizer_path, examples=examples, weighted_loss="decay", decay=0.5)
    src = cb.source
    types = src.type_mask.tolist()
    w = src.context_weights("decay", 0.5).tolist()
    for t, ty in enumerate(types):
        if ty > 0 and ty % 4 == 0:
            i = ty // 4 - 1  # example index, 0-based; the query (weight 1) is the most recent label
            assert w[t] == {0: 0.125, 1: 0.25, 2: 0.5}[i]
        else:
            assert w[t] == 1.0
    assert src.context_weights("none").tolist() == [1.0] * len(types)
    b = random_batch(batch_size=2, seq_len=6, prompt_len=2)
    cb.extend_batch(b, training=True)
    n = len(types)
    assert b["token_weights"].shape == b["labels"].shape
    assert b["token_weights"][:, :n].tolist() == [w, w] and (b["token_weights"][:, n:] == 1).all()
    cb._release()
    # existing weights are kept for the query part
    b = random_batch(batch_size=2, seq_len=6, prompt_len=2)
    b["token_weights"] = torch.full((2, 6), 3.0)
    cb.extend_batch(b, training=True)
    assert (b["token_weights"][:, n:] == 3.0).all() and b["token_weights"][:, :n].tolist() == [w, w]
    cb._release()


# ---------------------------------------------------------------------------------------------------------------
# Projection and gradient mask
# ---------------------------------------------------------------------------------------------------------------
def test_projection_is_exactly_the_formula(tiny_tokenizer_path):
    cb, _ = installed(tiny_tokenizer_path, projection_epsilon=0.2, format_epsilon=0.1)
    src = cb.source
    types = src.type_mask.tolist()
    randomise_delta(src, scale=0.004)  # norms ~0.023: some rows inside the ball (0.025 / 0.0125), some outside
    with torch.no_grad():
        src.delta[::3] *= 10
    raw = src.delta.detach().clone()
    eps = eps_of(types, eps_in=0.2, eps_fmt=0.1)
    norm = raw.norm(dim=1)
    inside = (norm <= eps) & (eps > 0)
    assert inside.any() and ((norm > eps) & (eps > 0)).any()
    expect = raw * (eps / torch.maximum(norm, eps)).nan_to_num(0.0).unsqueeze(1)
    shrunk = src.project_()
    assert torch.equal(src.delta, expect)
    assert torch.equal(src.delta[inside], raw[inside])  # inside the ball: untouched
    assert torch.equal(shrunk, (norm > eps) & (eps > 0))
    lab_or_sep = torch.tensor([ty == 0 or ty % 4 == 0 for ty in types])
    assert (src.delta[lab_or_sep] == 0).all()
    torch.testing.assert_close(src.epsilon(), eps.float(), rtol=0, atol=0)


class _Snap(pl.Callback):
    def __init__(self, cb, grads=False):
        self.cb, self.grads, self.values, self.g = cb, grads, [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.grads:
            self.g.append(self.cb.source.delta.grad.detach().clone())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.values.append(self.cb.source.delta.detach().clone())


def test_label_gradients_zero_and_projection_after_every_step(tiny_tokenizer_path):
    module = CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1)
    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, learning_rate=0.05, projection_epsilon=0.3,
             format_epsilon=0.1, **TEMPLATES)
    pre, post = _Snap(cb, grads=True), _Snap(cb)
    t = trainer([pre, cb, post], max_steps=4, limit_val_batches=0)
    t.fit(module, datamodule=ListDataModule(n_batches=2))
    types = cb.source.type_mask.tolist()
    frozen = torch.tensor([ty == 0 or ty % 4 == 0 for ty in types])
    eps = eps_of(types, eps_in=0.3, eps_fmt=0.1)
    assert len(pre.g) == len(post.values) == 4
    for g, raw, after in zip(pre.g, pre.values, post.values):
        assert (g[frozen] == 0).all() and (g[~frozen] != 0).any()  # labels / separators: zero gradient
        # after every step: the projection, exactly, and the constraint holds per token type
        norm = raw.norm(dim=1)
        expect = raw * (eps / torch.maximum(norm, eps)).nan_to_num(0.0).unsqueeze(1)
        assert torch.equal(after, expect)
        assert (after.norm(dim=1) <= eps * (1 + 1e-6)).all()
        assert (after[frozen] == 0).all()
    assert (pre.values[0].norm(dim=1)[~frozen] > eps[~frozen]).all()  # the constraint was active


# ---------------------------------------------------------------------------------------------------------------
# The loss: hand-computed CE and HF PEFT's CPT
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_equals_hand_computed_ce(tiny_tokenizer_path, weighted):
    kw = {"weighted_loss": "decay", "decay": 0.7} if weighted else {}
    cb, module = installed(tiny_tokenizer_path, **kw)
    src, hf = cb.source, module.model
    randomise_delta(src, scale=0.01)
    src.project_()
    b = random_batch(batch_size=3, seq_len=8, prompt_len=3)
    b["labels"][1, 0] = b["input_ids"][1, 0]  # a query labelled from its first token: predicted from the context
    cb.extend_batch(b, training=True)
    prompt = torch.where(torch.tensor([ty > 0 and ty % 4 != 0 for ty in src.type_mask.tolist()])[:, None],
                         src.base + src.delta, src.base)
    ref, _ = reference_loss(hf, prompt.detach(), b, b["labels"], b.get("token_weights"))
    module.train()
    out = module.compute_token_loss(b, hf)  # level 3: CausalLMModule's fused loss
    torch.testing.assert_close(out.mean, ref.detach(), rtol=1e-5, atol=1e-6)
    n_ctx = int((src.context_labels() != -100).sum())
    assert int(out.n_tokens) == 3 * n_ctx + int((b["labels"][:, -8:][:, 1:] != -100).sum()) + 1
    if not weighted:  # the HF loss of the model itself (what a plain module returns)
        hf_loss = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        torch.testing.assert_close(hf_loss, ref.detach(), rtol=1e-5, atol=1e-6)
    cb._release()
    # evaluation scores the query only (the first query token still predicted from the last context position)
    v = random_batch(batch_size=3, seq_len=8, prompt_len=3)
    v["labels"][1, 0] = v["input_ids"][1, 0]
    cb.extend_batch(v, training=False)
    ref_v, _ = reference_loss(hf, prompt.detach(), v, v["labels"])
    module.eval()
    with torch.no_grad():
        out_v = module.compute_token_loss(v, hf)
    cb._release()
    torch.testing.assert_close(out_v.mean, ref_v, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decay", [None, 0.6])
def test_matches_peft_cpt(tiny_tokenizer_path, decay):
    """Same context, same delta -> the same logits and loss as PEFT's CPT (``_cpt_forward`` + ``calculate_loss``;
    no ``input_type_mask``: every labelled query token counts, which is what lit_ft's -100 labels express)."""
    import peft

    kw = {"weighted_loss": "decay", "decay": decay} if decay else {}
    module = CausalLMModule(model_config=tiny_config())
    cb, module = installed(tiny_tokenizer_path, module=module, projection_epsilon=0.2, format_epsilon=0.1, **kw)
    src, hf = cb.source, module.model
    randomise_delta(src, scale=0.5)
    src.project_()
    base = frozen_copy(hf)
    cfg = peft.CPTConfig(task_type="CAUSAL_LM", cpt_token_ids=src.token_ids.tolist(),
                         cpt_tokens_type_mask=src.type_mask.tolist(), opt_projection_epsilon=0.2,
                         opt_projection_format_epsilon=0.1, opt_weighted_loss_type="decay" if decay else "none",
                         opt_loss_decay_factor=decay or 1.0)
    pm = peft.get_peft_model(base, cfg)
    enc = pm.prompt_encoder.default
    assert torch.equal(enc.embedding.weight, src.base)  # PEFT's E0 = ours
    upd = torch.tensor([ty > 0 and ty % 4 != 0 for ty in src.type_mask.tolist()])
    torch.testing.assert_close(enc.get_epsilon()[upd], src.epsilon()[upd], rtol=0, atol=0)
    # labels / separators: PEFT's radius 1e-10, ours 0 -- their delta is 0 in both (never updated)
    assert (enc.get_epsilon()[~upd] == 1e-10).all() and (src.epsilon()[~upd] == 0).all()
    with torch.no_grad():
        enc.delta_embedding.weight.copy_(src.delta)
    b = random_batch(batch_size=3, seq_len=9, prompt_len=3)
    ref = pm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"].clone())
    # PEFT's lazy projection at the forward left our projected delta unchanged (to an ulp on the boundary)
    torch.testing.assert_close(enc.delta_embedding.weight, src.delta, rtol=1e-6, atol=0)
    cb.extend_batch(b, training=True)
    module.train()
    if decay:
        ours = module.compute_token_loss(b, hf).mean  # the decay weights: lit_ft's loss path
    else:
        ours = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    cb._release()
    n = src.num_virtual_tokens
    real = torch.cat([torch.ones(3, n, dtype=torch.bool), b["attention_mask"].bool()], dim=1)
    torch.testing.assert_close(logits[real], ref.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, ref.loss, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Training through Lightning: every loss path, backbone untouched, artifacts
# ---------------------------------------------------------------------------------------------------------------
class _LossRecorder(pl.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@pytest.mark.parametrize("make_module, weighted", [("causal", True), ("plain", False), ("plain", True),
                                                   ("peft", True)])
def test_training_moves_only_delta(tiny_tokenizer_path, tmp_path, make_module, weighted):
    torch.manual_seed(0)
    module = {"causal": lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1),
              "plain": AdamWPlain, "peft": LoraModule}[make_module]()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    kw = {"weighted_loss": "decay", "decay": 0.8} if weighted else {}
    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, learning_rate=0.05, save_dir=str(tmp_path / "art"),
             projection_epsilon=2.0, format_epsilon=1.0, **TEMPLATES, **kw)
    t = trainer([cb], limit_val_batches=0)
    t.fit(module, datamodule=ListDataModule(n_batches=3))
    after = module.state_dict()
    keys = sorted(k for k in after if k.startswith("lit_ft_prompts."))
    assert keys == [f"lit_ft_prompts.prompt.{k}" for k in ("base", "delta", "token_ids", "type_mask")]
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # backbone (and PEFT's LoRA) bit-identical
    assert after["lit_ft_prompts.prompt.delta"].abs().sum() > 0  # delta trained
    assert torch.equal(after["lit_ft_prompts.prompt.base"], cb.source.base)
    opt = t.optimizers[0]
    group = next(g for g in opt.param_groups if any(p is cb.source.delta for p in g["params"]))
    assert group["lr"] == 0.05 and opt.state[cb.source.delta]["step"] == 3
    hf = cb.injector.hf_model.eval()
    from lit_ft.core.loss import installed_hook

    assert installed_hook(hf) is None  # the decay hook (plain modules) is removed at teardown
    # the artifact reproduces the trained model's outputs on a fresh backbone; outside training: user's length
    ids = torch.randint(3, 300, (2, 6))
    ref = hf(input_ids=ids).logits
    assert ref.shape == (2, 6, 384)
    fresh = frozen_copy(hf)
    attach_prompt(fresh, str(tmp_path / "art"))
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_plain_module_decay_goes_through_the_hook(tiny_tokenizer_path):
    """The plain module's ``self.model(**batch).loss`` with decay equals the hand-computed weighted CE (the hook
    applies batch['token_weights']); one SGD step then equals lr x the gradient of that loss."""
    module = AdamWPlain()
    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, weighted_loss="decay", decay=0.5, **TEMPLATES)
    cb.setup(trainer([cb]), module, "fit")
    hf = module.model
    randomise_delta(cb.source, scale=0.01)
    b = random_batch(batch_size=2, seq_len=8, prompt_len=3)
    cb.on_train_batch_start(None, module, b, 0)
    loss = hf(**b).loss
    prompt = cb.source.prompt_embeddings(None).detach()
    ref, _ = reference_loss(hf, prompt, b, b["labels"], b["token_weights"])
    cb._release()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    unweighted, _ = reference_loss(hf, prompt, b, b["labels"])
    assert abs(float(unweighted) - float(ref)) > 1e-3  # the weights changed the loss
    cb.teardown(None, module, "fit")


class OwnLossModule(AdamWPlain):
    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100)


def test_decay_without_a_lit_ft_loss_path_raises(tiny_tokenizer_path):
    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, weighted_loss="decay", decay=0.5, **TEMPLATES)
    with pytest.raises(RuntimeError, match="decay weights were not applied"):
        trainer([cb], max_steps=1, limit_val_batches=0).fit(OwnLossModule(), datamodule=ListDataModule(n_batches=1))
    # the same module without decay trains on context + query labels
    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, **TEMPLATES)
    trainer([cb], max_steps=1, limit_val_batches=0).fit(OwnLossModule(), datamodule=ListDataModule(n_batches=1))


class _ProjectionLog(pl.Callback):
    """After CPT's step end (listed after it): the logged projected fraction of every step."""

    def __init__(self):
        self.fractions = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.fractions.append(float(trainer.callback_metrics["lit_ft/cpt/projected_fraction"]))


def test_loss_falls_under_an_active_projection_and_validation_runs(tiny_tokenizer_path):
    """Projected gradient descent with radii small enough that the projection binds at every step: the loss still
    falls, every step ends inside the per-type balls, and the logged projected fraction is the share of updatable
    tokens whose raw (pre-projection) delta left its ball, recomputed from the raw values."""
    torch.manual_seed(0)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=0.05)
    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, learning_rate=0.3, projection_epsilon=1.0,
             format_epsilon=0.5, **TEMPLATES)
    rec, pre, post, frac = _LossRecorder(), _Snap(cb), _Snap(cb), _ProjectionLog()
    t = trainer([pre, cb, post, rec, frac], max_steps=25, limit_val_batches=1, val_check_interval=25,
                check_val_every_n_epoch=None)
    t.fit(module, datamodule=ListDataModule(n_batches=1))
    assert rec.losses[-1] < rec.losses[0] - 1e-2
    assert "val/loss" in t.callback_metrics and not cb.source.keep_prompt_outputs
    types = cb.source.type_mask.tolist()
    eps = eps_of(types, eps_in=1.0, eps_fmt=0.5)
    updatable = eps > 0
    assert len(pre.values) == len(post.values) == len(frac.fractions) == 25
    for raw, after, logged in zip(pre.values, post.values, frac.fractions):
        outside = (raw.norm(dim=1) > eps) & updatable
        assert logged == pytest.approx(float(outside.sum()) / int(updatable.sum()))
        assert (after.norm(dim=1) <= eps * (1 + 1e-6)).all()  # every step ends inside the balls
    assert min(frac.fractions) > 0  # the constraint was active at every step, not only at the start
    assert (post.values[-1].norm(dim=1)[updatable] >= eps[updatable] * (1 - 1e-5)).any()  # on the boundary


# ---------------------------------------------------------------------------------------------------------------
# Artifacts, generate(), resume
# ---------------------------------------------------------------------------------------------------------------
def test_save_load_same_outputs(tiny_tokenizer_path, tmp_path):
    cb, module = installed(tiny_tokenizer_path, projection_epsilon=0.3, format_epsilon=0.2)
    src, hf = cb.source, module.model.eval()
    randomise_delta(src)
    src.project_()
    ids = torch.randint(3, 300, (2, 7))
    ref = hf(input_ids=ids).logits
    path = save_prompt(src, tmp_path / "p")
    loaded = load_prompt(str(path), hf)
    assert isinstance(loaded, CPTEmbedding)
    for name in ("token_ids", "type_mask", "base", "delta"):
        assert torch.equal(getattr(loaded, name), getattr(src, name)), name
    assert (loaded.projection_epsilon, loaded.format_epsilon) == (0.3, 0.2)
    torch.testing.assert_close(loaded.epsilon(), src.epsilon(), rtol=0, atol=0)
    fresh = frozen_copy(hf)
    attach_prompt(fresh, str(path))
    torch.testing.assert_close(fresh(input_ids=ids).logits, ref, rtol=0, atol=0)


def test_generate_equals_stepwise_argmax(tiny_tokenizer_path):
    cb, module = installed(tiny_tokenizer_path)
    hf = module.model.eval()
    randomise_delta(cb.source, scale=0.5)
    ids = torch.randint(3, 300, (1, 6))
    gen = check_generation(hf, ids)
    with injector_for(hf).disabled():
        bare = greedy_generate(hf, ids)
    assert bare.tolist() != gen.tolist()  # the context is really there


def test_resume_equals_uninterrupted(tiny_tokenizer_path, tmp_path):
    r = fit_and_resume(
        lambda: CausalLMModule(model_config=tiny_config(), learning_rate=1e-2, weight_decay=0.1, warmup_steps=3),
        lambda: [CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, learning_rate=0.05, weighted_loss="decay",
                     decay=0.9, **TEMPLATES)],
        tmp_path)
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    assert r.full.lit_ft_prompts.prompt.delta.abs().sum() > 0


# ---------------------------------------------------------------------------------------------------------------
# Examples drawn from the DataModule
# ---------------------------------------------------------------------------------------------------------------
def test_examples_drawn_from_the_datamodule(tiny_tokenizer_path, tmp_path):
    import json

    from lit_ft.data import SFTDataModule
    from lit_ft.testing import write_tiny_sft_jsonl

    train = write_tiny_sft_jsonl(tmp_path / "train.jsonl", n=16)
    val = write_tiny_sft_jsonl(tmp_path / "val.jsonl", n=4, seed=1)
    dm = SFTDataModule(data=train, val_data=val, tokenizer=tiny_tokenizer_path, batch_size=4, max_length=64)
    rows = [json.loads(line) for line in open(train)]
    a, b, c = (draw_examples(dm, 3, s) for s in (0, 0, 1))
    assert a == b and a != c and len({e["input"] for e in a}) == 3
    pairs = {(r["prompt"], r["completion"]) for r in rows}
    assert all((e["input"], e["output"]) in pairs for e in a)
    # CPT() with no arguments: examples drawn from the DataModule, its tokenizer, a real fit + validation
    cb = CPT(num_examples=2, input_template="{}", output_template="{}")
    t = trainer([cb], max_steps=2, limit_val_batches=1, val_check_interval=2)
    t.fit(CausalLMModule(model_config=tiny_config()), datamodule=dm)
    assert cb.context_examples == draw_examples(dm, 2, 0)
    assert cb.source.num_examples == 2 and "val/loss" in t.callback_metrics


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    ({"examples": [{"input": "a"}]}, r"`examples\[0\]`"),
    ({"examples": [{"input": "a", "output": ""}]}, r"`examples\[0\]`"),
    ({"examples": EXAMPLES, "num_examples": 3}, "`num_examples`=3 but 2"),
])
def test_bad_examples_name_the_example_and_the_count(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CPT(**kwargs)


def test_setup_errors(tiny_tokenizer_path, tmp_path):
    # no tokenizer anywhere
    cb = CPT(examples=EXAMPLES)
    with pytest.raises(PromptError, match="needs a tokenizer"):
        cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config()), "fit")
    # no examples and no DataModule rows
    cb = CPT(tokenizer=tiny_tokenizer_path)
    with pytest.raises(PromptError, match="does not expose its training rows"):
        cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config()), "fit")
    # context longer than the model's context
    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, **TEMPLATES)
    with pytest.raises(PromptError, match="35 tokens.*max_position_embeddings=35"):
        cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config(max_position_embeddings=35)), "fit")
    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path, **TEMPLATES)
    cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config(max_position_embeddings=36)), "fit")  # fits

    # not a causal LM
    class Cls(pl.LightningModule):
        def __init__(self):
            super().__init__()
            from transformers import AutoModelForSequenceClassification

            cfg = dict(tiny_config())
            cfg.pop("model_type")
            self.model = AutoModelForSequenceClassification.from_config(
                AutoConfig.for_model("llama", num_labels=2, **cfg))

    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path)
    with pytest.raises(PromptError, match="causal language models only"):
        cb.setup(trainer([cb]), Cls(), "fit")

    # text unknown to the tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "input": 1, ":": 2, "output": 3, "7": 4, "</s>": 5},
                                    unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]", eos_token="</s>").save_pretrained(
        str(tmp_path / "tok"))
    cb = CPT(examples=[{"input": "zebra", "output": "7"}], tokenizer=str(tmp_path / "tok"))
    with pytest.raises(PromptError, match="example 0 has text unknown to the tokenizer"):
        cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config()), "fit")

    cb = CPT(examples=EXAMPLES, tokenizer=tiny_tokenizer_path)
    with pytest.raises(PromptError, match="no input-embedding layer"):
        cb.setup(trainer([cb]), NoInputEmbeddingsModule(), "fit")
