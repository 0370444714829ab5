"""VerbalizerClassificationModule: label-word logits only, SciPrompt's weighted verbalizer, calibration, templates."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from lit_ft.callbacks import PromptTuning
from lit_ft.data import ClassificationDataModule
from lit_ft.modules import VerbalizerClassificationModule
from lit_ft.modules.verbalizer import (
    CALIBRATION_KEY,
    calibration_vector,
    label_word_log_probs,
    weighted_verbalizer_scores,
)
from lit_ft.testing import tiny_llama_config, write_tiny_classification_jsonl
from tests.helpers import tiny_config

WORDS = [["apples", "pens"], ["books", "birds total"]]  # "birds total": several tokens; class 0 has 2 words
TEMPLATE = "Item: {text} Answer:"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


def make(tok=None, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("label_words", WORDS)
    m = VerbalizerClassificationModule(model_config=tiny_config(), **kw)
    if tok is not None:
        m.build_verbalizer(tok)
    return m


def dm(tmp_path, tokenizer, **kw):
    train = write_tiny_classification_jsonl(tmp_path / "train.jsonl", n=16)
    val = write_tiny_classification_jsonl(tmp_path / "val.jsonl", n=8, seed=1)
    kw.setdefault("template", TEMPLATE)
    return ClassificationDataModule(data=train, val_data=val, tokenizer=tokenizer, batch_size=4, **kw)


def trainer(callbacks=(), max_steps=3, **kw):
    kw.setdefault("limit_val_batches", 0)
    return pl.Trainer(max_steps=max_steps, callbacks=list(callbacks), logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kw)


def batch(B=3, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 384, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 6:] = 0
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------
# Label-word logits = the label words' columns of the full lm_head logits
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("multi_token", ["mean", "first"])
def test_word_logits_equal_full_lm_head_columns(tok, multi_token):
    m = make(tok, multi_token=multi_token).eval()
    ids, mask = batch()
    with torch.no_grad():
        wl = m.word_logits(ids, mask)
        full = m.model(input_ids=ids, attention_mask=mask).logits  # the full-vocabulary head, computed separately
    last = [4, 6, 5]
    for b in range(3):
        for c, words in enumerate(WORDS):
            for w, word in enumerate(words):
                t = tok(" " + word, add_special_tokens=False)["input_ids"]
                cols = full[b, last[b], t]
                expect = cols.mean() if multi_token == "mean" else cols[0]
                torch.testing.assert_close(wl[b, c, w], expect, rtol=1e-5, atol=1e-5)
    assert len(tok(" birds total", add_special_tokens=False)["input_ids"]) > 1  # the multi-token case is exercised


def test_lm_head_is_never_called(tok, tmp_path):
    m = make()
    hf = m.model

    def boom(*a, **k):
        raise AssertionError("lm_head.forward was called")

    hf.lm_head.forward = boom
    with pytest.raises(AssertionError, match="lm_head.forward was called"):  # the trap works
        hf(input_ids=torch.tensor([[5, 6]]))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    t = trainer(max_steps=3, limit_val_batches=1, val_check_interval=3)
    t.fit(m, datamodule=dm(tmp_path, tok.name_or_path))
    after = m.state_dict()
    # PET-style: the LM fine-tunes (through the label words' rows of the lm_head too) and s_w trains
    assert not torch.equal(before["word_scores"], after["word_scores"])
    assert not torch.equal(before["model.lm_head.weight"], after["model.lm_head.weight"])
    assert not torch.equal(before["model.model.layers.0.mlp.up_proj.weight"],
                           after["model.model.layers.0.mlp.up_proj.weight"])
    assert torch.isfinite(t.callback_metrics["val/loss"]) and "val/acc" in t.callback_metrics


# ---------------------------------------------------------------------------------------------------------------
# The weighted verbalizer and calibration, against hand formulas
# ---------------------------------------------------------------------------------------------------------------
def hand_scores(z, mask, s, tau, cal=None):
    B, C, W = z.shape
    out = torch.zeros(B, C, dtype=torch.float64)
    valid = [(c, w) for c in range(C) for w in range(W) if mask[c, w]]
    for b in range(B):
        den = sum(torch.exp(z[b, c, w]) for c, w in valid)
        p = {(c, w): torch.exp(z[b, c, w]) / den for c, w in valid}
        if cal is not None:
            p = {k: v / cal[k] for k, v in p.items()}
            tot = sum(p.values())
            p = {k: v / tot for k, v in p.items()}
        for c in range(C):
            ws = [w for w in range(W) if mask[c, w]]
            a_den = sum(torch.exp(tau * s[c, w]) for w in ws)
            out[b, c] = sum(torch.exp(tau * s[c, w]) / a_den * torch.log(p[(c, w)]) for w in ws)
    return out


def test_weighted_verbalizer_scores_match_hand_formula():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    s = torch.rand(3, 3, generator=g, dtype=torch.float64) * 2
    for tau in (1.0, 2.5):
        torch.testing.assert_close(weighted_verbalizer_scores(z, mask, s, tau).double(), hand_scores(z, mask, s, tau))
    cal = torch.rand(3, 3, generator=g, dtype=torch.float64) + 0.1
    cal = cal / cal[mask].sum()
    got = weighted_verbalizer_scores(z, mask, s, 2.0, cal).double()
    torch.testing.assert_close(got, hand_scores(z, mask, s, 2.0, cal), rtol=1e-5, atol=1e-6)
    # one word per class: the scores are log-probabilities over the classes, so CE == their NLL
    one = torch.tensor([[1, 0, 0], [1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    sc = weighted_verbalizer_scores(z, one, s)
    torch.testing.assert_close(sc.exp().sum(-1), torch.ones(4, dtype=torch.float32))


def test_calibration_vector_math():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(5, 2, 2, generator=g)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    zm = z.mean(0)
    e = torch.exp(zm) * mask
    torch.testing.assert_close(calibration_vector(z, mask, "logits"), e / e.sum())
    per = torch.exp(z) * mask
    per = per / per.sum((1, 2), keepdim=True)
    torch.testing.assert_close(calibration_vector(z, mask, "probs"), per.mean(0))
    with pytest.raises(ValueError, match="calibration average"):
        calibration_vector(z, mask, "median")
    # calibrating with the support set's own distribution flattens it: a constant-logit batch becomes uniform
    cal = calibration_vector(z[:1], mask, "logits")
    lp = label_word_log_probs(z[:1], mask, cal)
    torch.testing.assert_close(lp[0][mask].exp(), torch.full((3,), 1 / 3))


def test_module_scores_pred_temp_and_calibration(tok, tmp_path):
    m = make(tok, word_scores=[[0.2, 1.5], [3.0, -1.0]], pred_temp=3.0, calibration_samples=6)
    assert m.word_scores.flatten().tolist() == pytest.approx([0.2, 1.5, 3.0, 0.0])  # clamped >= 0 as SciPrompt
    ids, mask = batch()
    wl = m.word_logits(ids, mask).detach()
    m.train()
    torch.testing.assert_close(m.class_scores(wl), weighted_verbalizer_scores(wl, m.word_mask, m.word_scores, 1.0))
    m.eval()
    torch.testing.assert_close(m.class_scores(wl), weighted_verbalizer_scores(wl, m.word_mask, m.word_scores, 3.0))
    # calibration from training samples when training starts; kept in checkpoints
    data = dm(tmp_path, tok.name_or_path)
    t = trainer(max_steps=1)
    m2 = make(calibration_samples=6)
    t.fit(m2, datamodule=data)
    assert m2.calibration is not None and m2.calibration.shape == (2, 2)
    torch.testing.assert_close(m2.calibration.sum(), torch.tensor(1.0))
    ckpt = {}
    m2.on_save_checkpoint(ckpt)
    m3 = make(tok)
    m3.on_load_checkpoint(ckpt)
    assert torch.equal(m3.calibration, ckpt[CALIBRATION_KEY]) and torch.equal(ckpt[CALIBRATION_KEY], m2.calibration)
    # the vector is what calibrate() computes on those samples with the initial weights
    m4 = make(tok)
    m4.trainer = t
    expect = m4.calibrate(m4.support_batches(6))
    m5 = make(tok)
    with torch.no_grad():
        z = torch.cat([m5.eval().word_logits(b["input_ids"], b["attention_mask"]) for b in m4.support_batches(6)])
    torch.testing.assert_close(expect, calibration_vector(z, m5.word_mask, "logits"))


# ---------------------------------------------------------------------------------------------------------------
# With a prompt callback: the LM is frozen, the prompt trains
# ---------------------------------------------------------------------------------------------------------------
def test_trains_with_prompt_tuning(tok, tmp_path):
    m = make(weight_decay=0.1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    cb = PromptTuning(num_virtual_tokens=4, learning_rate=0.05)
    t = trainer([cb], max_steps=3)
    t.fit(m, datamodule=dm(tmp_path, tok.name_or_path))
    after = m.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # LM and s_w bit-identical
    w = cb.source.embedding.weight
    assert t.optimizers[0].state[w]["step"] == 3 and float(w.grad.abs().sum()) > 0
    # the prompt is really in the forward: disabling it changes the class scores
    ids, mask = batch()
    m.eval()
    with torch.no_grad():
        with_prompt = m(ids, mask)
        with cb.injector.disabled():
            without = m(ids, mask)
    assert not torch.allclose(with_prompt, without)


def test_freeze_backbone_trains_only_word_weights(tok, tmp_path):
    m = make(freeze_backbone=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainer(max_steps=2).fit(m, datamodule=dm(tmp_path, tok.name_or_path))
    moved = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {"word_scores"}
    with pytest.raises(ValueError, match="No trainable parameters"):
        trainer(max_steps=1).fit(make(freeze_backbone=True, trainable_word_weights=False),
                                 datamodule=dm(tmp_path, tok.name_or_path))


def test_label_words_default_to_label_names(tok, tmp_path):
    rows = [{"text": f"some {w} here", "label": w} for w in ("apples", "books", "pens") * 3]
    path = tmp_path / "named.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ClassificationDataModule(data=str(path), val_split=0.0, tokenizer=tok.name_or_path, batch_size=3,
                                    template=TEMPLATE)
    m = make(label_words=None)
    trainer(max_steps=1).fit(m, datamodule=data)
    assert m.label_words == [["apples"], ["books"], ["pens"]] and m.word_mask.shape == (3, 1)
    assert m.word_token_ids[1, 0, 0].item() == tok(" books", add_special_tokens=False)["input_ids"][0]


# ---------------------------------------------------------------------------------------------------------------
# The template (ClassificationDataModule) and errors
# ---------------------------------------------------------------------------------------------------------------
def test_template_applied_and_truncation_keeps_the_pattern(tok, tmp_path):
    rows = [{"text": "Tom has apples", "label": 0}, {"text": " ".join(["apples and pens"] * 30), "label": 1}]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ClassificationDataModule(data=str(path), val_split=0.0, tokenizer=tok.name_or_path, max_length=16,
                                    template=TEMPLATE)
    with pytest.warns(UserWarning, match="truncated 1"):
        data.setup()
    ex = {e["sample_idx"]: e["input_ids"] for e in data._examples("train")}
    assert ex[0] == tok("Item: Tom has apples Answer:")["input_ids"]
    tail = tok(" Answer:", add_special_tokens=False)["input_ids"]
    assert len(ex[1]) <= 16 and ex[1][-len(tail):] == tail and tok.decode(ex[1]).startswith("Item: apples and")


@pytest.mark.parametrize("template", ["no placeholder", "{text} and {text}", ""])
def test_template_without_text_placeholder(template, tmp_path):
    with pytest.raises(ValueError, match=r"exactly one '\{text\}' placeholder"):
        dm(tmp_path, "unused", template=template)


@pytest.mark.parametrize("kwargs, match", [
    ({"label_words": [["apples"], []]}, r"`label_words\[1\]` is empty"),
    ({"label_words": [["apples"], [" "]]}, "empty label word"),
    ({"label_words": [["apples"]]}, ">= 2 classes"),
    ({"word_scores": [[1.0], [1.0, 2.0]]}, "shape of `label_words`"),
    ({"label_words": None, "word_scores": [[1.0], [1.0]]}, "needs `label_words`"),
    ({"multi_token": "last"}, "multi_token"),
    ({"pred_temp": 0.0}, "pred_temp"),
    ({"calibration_samples": -1}, "calibration_samples"),
    ({"calibration_average": "median"}, "calibration_average"),
    ({"learning_rate": 0.0}, "learning_rate"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_label_words_outside_the_vocabulary(tok, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    wl = Tokenizer(models.WordLevel({"[UNK]": 0, "apples": 1, "books": 2}, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    word_tok = PreTrainedTokenizerFast(tokenizer_object=wl, unk_token="[UNK]")
    make(word_tok, label_words=[["apples"], ["books"]])  # known words are fine
    with pytest.raises(ValueError, match="'zebra' .* not in the tokenizer's vocabulary"):
        make(word_tok, label_words=[["apples"], ["zebra"]])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        m = VerbalizerClassificationModule(model_config=tiny_llama_config(vocab_size=100), label_words=WORDS)
        m.build_verbalizer(tok)
    with pytest.raises(ValueError, match="listed for class 0 and class 1"):
        make(tok, label_words=[["apples"], ["apples"]])
    with pytest.raises(ValueError, match="2 classes but the data has 3 labels"):
        rows = [{"text": "x", "label": i} for i in range(3)]
        path = tmp_path / "three.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        trainer(max_steps=1).fit(make(), datamodule=ClassificationDataModule(
            data=str(path), val_split=0.0, tokenizer=tok.name_or_path, template=TEMPLATE))
    with pytest.raises(RuntimeError, match="not tokenised yet"):
        make().word_logits(*batch())
