"""PTEC (soft prompt + classification head) and ClassificationModule's multi-label BCE with per-label weights."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lit_ft.callbacks import PTEC
from lit_ft.callbacks.prompt.ptec import load_ptec
from lit_ft.core.prompts import PromptError, attach_prompt, injector_for, model_geometry
from lit_ft.data import ClassificationDataModule
from lit_ft.modules import CausalLMModule, ClassificationModule
from tests.helpers import assert_state_dicts_equal, fit_and_resume, quiet_trainer, tiny_config

trainer = quiet_trainer

N = 4
C = 3
PAD = 2  # LlamaConfig's eos, which ClassificationModule makes the pad token


def module(multi_label=False, pos_weight=None, lr=1e-2, wd=0.1, seed=0):
    torch.manual_seed(seed)
    return ClassificationModule(model_config=tiny_config(), num_labels=C, learning_rate=lr, weight_decay=wd,
                                multi_label=multi_label, pos_weight=pos_weight)


def cls_batch(B=4, T=8, multi_label=False, seed=0, left=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        n = T - (b % 3)  # ragged: 0, 1 or 2 padding tokens
        if left:
            ids[b] = torch.cat([torch.full((T - n,), PAD), ids[b, :n]])
            mask[b, : T - n] = 0
        else:
            ids[b, n:] = PAD
            mask[b, n:] = 0
    if multi_label:
        labels = (torch.rand(B, C, generator=g) < 0.5).float()
    else:
        labels = torch.randint(0, C, (B,), generator=g)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "sample_idx": torch.arange(B) + seed * B}


class ClsDM(pl.LightningDataModule):
    label_names = ["apples", "books", "pens"]
    num_labels = C

    def __init__(self, n_batches=3, multi_label=False, tokenizer=None):
        super().__init__()
        self.batches = [cls_batch(multi_label=multi_label, seed=i) for i in range(n_batches)]
        self.tokenizer = tokenizer

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None)

    def val_dataloader(self):
        return DataLoader(self.batches[:2], batch_size=None)


# ---------------------------------------------------------------------------------------------------------------
# Multi-label BCE with per-label positive weights (ClassificationModule)
# ---------------------------------------------------------------------------------------------------------------
def test_bce_with_pos_weight_equals_hand_computation():
    pw = [1.0, 3.0, 0.5]
    m = module(multi_label=True, pos_weight=pw).eval()
    b = cls_batch(multi_label=True)
    out = m._forward(b)
    x, y = out.logits.double(), b["labels"].double()
    hand = 0.0
    for i in range(x.shape[0]):
        for c in range(C):
            p = 1 / (1 + torch.exp(-x[i, c]))
            hand += -(pw[c] * y[i, c] * torch.log(p) + (1 - y[i, c]) * torch.log(1 - p))
    hand /= x.numel()
    torch.testing.assert_close(out.loss.double(), hand, rtol=1e-5, atol=1e-6)
    # the weights matter: without them the loss differs
    assert not torch.allclose(module(multi_label=True).eval()._forward(b).loss, out.loss)
    assert m.model.config.problem_type == "multi_label_classification"


def test_multi_label_micro_f1_and_single_label_unchanged():
    m = module(multi_label=True)
    t = trainer([], max_steps=1, limit_val_batches=2)
    dm = ClsDM(multi_label=True)
    t.validate(m, datamodule=dm, verbose=False)
    tp = fp = fn = 0
    m.eval()
    with torch.no_grad():
        for b in dm.batches[:2]:
            pred = m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.sigmoid() > 0.5
            y = b["labels"].bool()
            tp += int((pred & y).sum())
            fp += int((pred & ~y).sum())
            fn += int((~pred & y).sum())
    assert float(t.callback_metrics["val/f1"]) == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-6)
    assert "val/acc" not in t.callback_metrics
    # single-label: HF's cross-entropy and accuracy, as before
    s = module().eval()
    b = cls_batch()
    out = s._forward(b)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, b["labels"]))


def test_balanced_pos_weight_and_multi_label_data(tiny_tokenizer_path, tmp_path):
    rows = [{"text": "apples and pens", "label": ["fruit", "office"]}, {"text": "pens", "label": ["office"]},
            {"text": "two apples", "label": ["fruit"]}, {"text": "the cars", "label": []},
            {"text": "more pens", "label": ["office", "tools"]}, {"text": "pens again", "label": ["office"]}]
    path = tmp_path / "ml.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = ClassificationDataModule(data=str(path), val_split=0.0, tokenizer=tiny_tokenizer_path, multi_label=True,
                                  batch_size=6)
    dm.setup()
    assert dm.label_names == ["fruit", "office", "tools"]
    assert dm.label_counts() == [2, 4, 1]
    batch = next(iter(dm.val_dataloader() or [dm.collate(dm._examples("train"))]))
    by_idx = {int(i): lab for i, lab in zip(batch["sample_idx"], batch["labels"])}
    assert by_idx[0].tolist() == [1.0, 1.0, 0.0] and by_idx[3].tolist() == [0.0, 0.0, 0.0]
    assert by_idx[4].tolist() == [0.0, 1.0, 1.0] and batch["labels"].dtype == torch.float32
    m = module(multi_label=True, pos_weight="balanced")
    t = trainer([], max_steps=1)
    t.fit(m, datamodule=dm)
    assert m.pos_weight.tolist() == [2.0, 1.0, 4.0]  # max count / count (PTEC's weights)
    with pytest.raises(ValueError, match="list of ints or strings"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"text": "x", "label": "fruit"}) + "\n")
        ClassificationDataModule(data=str(bad), val_split=0.0, tokenizer=tiny_tokenizer_path, multi_label=True).setup()


@pytest.mark.parametrize("kwargs, match", [
    ({"pos_weight": [1.0, 2.0, 3.0]}, "pos_weight is for multi_label"),
    ({"multi_label": True, "pos_weight": [1.0, 2.0]}, "3 \\(num_labels\\) finite numbers > 0"),
    ({"multi_label": True, "pos_weight": [1.0, -2.0, 1.0]}, "finite numbers > 0"),
    ({"multi_label": True, "pos_weight": "auto"}, "'balanced' or null"),
    ({"multi_label": "yes"}, "multi_label must be true or false"),
])
def test_classification_module_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassificationModule(model_config=tiny_config(), num_labels=C, **kwargs)


def test_multi_label_needs_multi_hot_labels():
    m = module(multi_label=True)
    with pytest.raises(ValueError, match="multi-hot"):
        m._forward(cls_batch(multi_label=False))


# ---------------------------------------------------------------------------------------------------------------
# PTEC: what trains, with which learning rate
# ---------------------------------------------------------------------------------------------------------------
class Snapshot(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        self.at_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def test_only_prompt_and_head_move_with_their_learning_rates(tmp_path):
    m = module(multi_label=True, pos_weight=[1.0, 2.0, 1.0])
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cb = PTEC(num_virtual_tokens=N, learning_rate=0.05, head_learning_rate=1e-3, save_dir=str(tmp_path / "art"))
    snap = Snapshot()
    t = trainer([cb, snap])
    t.fit(m, datamodule=ClsDM(multi_label=True))
    after = m.state_dict()
    moved = {k for k in snap.at_start if not torch.equal(snap.at_start[k], after[k])}
    assert moved == {"lit_ft_prompts.prompt.embedding.weight", "model.score.weight"}
    for k, v in before.items():
        if k != "model.score.weight":
            assert torch.equal(v, after[k]), k  # backbone bit-identical under AdamW(weight_decay=0.1)
    opt = t.optimizers[0]
    prompt, head = cb.source.embedding.weight, m.model.score.weight

    def group(p):
        return next(g for g in opt.param_groups if any(q is p for q in g["params"]))

    assert group(prompt)["lr"] == 0.05 and group(head)["lr"] == 1e-3 and group(prompt) is not group(head)
    assert opt.state[prompt]["step"] == 3 and opt.state[head]["step"] == 3
    assert not any(p.requires_grad for n, p in m.named_parameters() if n not in {
        "lit_ft_prompts.prompt.embedding.weight", "model.score.weight"})
    # save -> load on a fresh model (same frozen backbone, untrained head) -> same outputs
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == [
        "classification_head.safetensors", "prompt.safetensors", "prompt_config.json"]
    b = cls_batch(seed=7)
    m.eval()
    ref = m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    fresh = module(multi_label=True).eval()
    assert not torch.allclose(fresh.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, ref)
    load_ptec(fresh, str(tmp_path / "art"))
    torch.testing.assert_close(fresh.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, ref,
                               rtol=0, atol=0)


@pytest.mark.parametrize("left", [False, True])
def test_pooling_picks_the_last_real_token_with_the_prompt(left):
    """HF pools the rightmost non-pad token of input_ids; with the prompt stripped from the trunk outputs that is
    still the last real token. Reference: the trunk run by hand on [P; E x] (injector off)."""
    from lit_ft.callbacks.prompt.prompt_tuning import PromptEmbedding

    m = module().eval()
    hf = m.model
    src = PromptEmbedding(model_geometry(hf), N)
    with torch.no_grad():
        src.embedding.weight.normal_(0, 0.5)
    attach_prompt(hf, src)
    b = cls_batch(B=3, T=7, left=left)
    logits = hf(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    mask = b["attention_mask"]
    emb = torch.cat([src.embedding.weight.expand(3, -1, -1), hf.model.embed_tokens(b["input_ids"])], 1)
    full_mask = torch.cat([torch.ones(3, N, dtype=torch.long), mask], 1)
    pos = torch.cat([torch.arange(N).expand(3, N), (mask.cumsum(-1) - 1).clamp_min(0) + N], 1)
    with injector_for(hf).disabled():
        hidden = hf.model(inputs_embeds=emb, attention_mask=full_mask, position_ids=pos).last_hidden_state
    last = torch.tensor([max(i for i in range(7) if mask[r, i]) for r in range(3)])
    ref = hf.score(hidden[torch.arange(3), N + last])
    torch.testing.assert_close(logits, ref, rtol=1e-5, atol=1e-6)
    if left:  # the same rows right-padded give the same logits
        right = cls_batch(B=3, T=7, left=False)
        torch.testing.assert_close(hf(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).logits,
                                   logits, rtol=1e-4, atol=1e-5)


def test_resume_equals_uninterrupted(tmp_path):
    r = fit_and_resume(
        lambda: module(multi_label=True, pos_weight=[1.0, 2.0, 0.5]),
        lambda: [PTEC(num_virtual_tokens=N, learning_rate=0.05, head_learning_rate=1e-3)], tmp_path,
        make_datamodule=lambda: ClsDM(n_batches=2, multi_label=True))
    assert_state_dicts_equal(r.full.state_dict(), r.resumed.state_dict())
    assert [g["lr"] for g in r.trainer_full.optimizers[0].param_groups] == \
        [g["lr"] for g in r.trainer_resumed.optimizers[0].param_groups]


class UserModule(pl.LightningModule):
    """A plain user module around LlamaForSequenceClassification, optionally PEFT-wrapped (LoRA, SEQ_CLS)."""

    def __init__(self, use_peft: bool):
        super().__init__()
        from transformers import AutoConfig, AutoModelForSequenceClassification

        torch.manual_seed(0)
        cfg = dict(tiny_config())
        cfg.pop("model_type")
        model = AutoModelForSequenceClassification.from_config(
            AutoConfig.for_model("llama", num_labels=C, pad_token_id=PAD, **cfg))
        if use_peft:
            import peft

            model = peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                               target_modules=["q_proj", "v_proj"]))
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)


@pytest.mark.parametrize("use_peft", [False, True])
def test_plain_and_peft_wrapped_modules(use_peft):
    m = UserModule(use_peft)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cb = PTEC(num_virtual_tokens=N, learning_rate=0.05, head_learning_rate=1e-2)
    snap = Snapshot()
    t = trainer([cb, snap])
    t.fit(m, datamodule=ClsDM())
    after = m.state_dict()
    moved = {k for k in snap.at_start if not torch.equal(snap.at_start[k], after[k])}
    # plain: the model's score head; PEFT (SEQ_CLS): its trainable copy of the head, never the LoRA/base weights
    head = "model.base_model.model.score.modules_to_save.default.weight" if use_peft else "model.score.weight"
    assert moved == {head, "lit_ft_prompts.prompt.embedding.weight"}
    assert all(torch.equal(v, after[k]) for k, v in before.items() if k != head)
    assert t.optimizers[0].state[cb.source.embedding.weight]["step"] == 3


def test_labels_init_uses_label_word_embeddings(tiny_tokenizer_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path)
    m = module()
    cb = PTEC(num_virtual_tokens=12)
    cb.setup(trainer([cb]), m, "fit")  # no DataModule: sampled vocabulary
    assert cb.source.embedding.weight.shape == (12, 32)
    m2 = module()
    cb2 = PTEC(num_virtual_tokens=12, seed=3)

    class T:  # a trainer stand-in carrying the DataModule (label names + tokenizer)
        datamodule = ClsDM(tokenizer=tok)

    src = cb2.build_source(T(), m2, m2.model, model_geometry(m2.model))
    ids = tok("apples books pens", add_special_tokens=False)["input_ids"]
    emb = m2.model.model.embed_tokens.weight
    for i, t_id in enumerate(ids):
        assert torch.equal(src.embedding.weight[i], emb[t_id])
    # more label tokens than virtual tokens: a subset of them
    cb3 = PTEC(num_virtual_tokens=2)
    src3 = cb3.build_source(T(), m2, m2.model, src.geometry)
    rows = {tuple(emb[i].tolist()) for i in ids}
    assert all(tuple(r.tolist()) in rows for r in src3.embedding.weight)


def test_ptec_text_init_needs_init_text():
    with pytest.raises(ValueError, match="needs `init_text`"):
        PTEC(init="text")


def test_model_without_classification_head(tmp_path):
    cb = PTEC(num_virtual_tokens=N)
    with pytest.raises(PromptError, match="no classification head"):
        cb.setup(trainer([cb]), CausalLMModule(model_config=tiny_config()), "fit")
    cb = PTEC(num_virtual_tokens=N, head="classifier")
    with pytest.raises(PromptError, match=r"\['classifier'\]"):
        cb.setup(trainer([cb]), module(), "fit")
    with pytest.raises(PromptError, match="classification_head.safetensors"):
        load_ptec(module(), str(tmp_path))
    # prompt + input longer than the context
    m = module()
    cb = PTEC(num_virtual_tokens=250)
    cb.setup(trainer([cb]), m, "fit")
    with pytest.raises(PromptError, match="longer than the model's context"):
        m.model(input_ids=torch.randint(3, 300, (1, 10)))


@pytest.mark.parametrize("kwargs, name", [({"seed": 0.5}, "seed"), ({"init_text": 3}, "init_text"),
                                          ({"peft_weights": True}, "peft_weights")])
def test_wrong_argument_types_are_named(kwargs, name):
    """Found by the matrix's fuzz column in the sibling prompt techniques: int(seed) raised a bare TypeError."""
    with pytest.raises(ValueError, match=f"PTEC: `{name}` must be"):
        PTEC(**kwargs)
