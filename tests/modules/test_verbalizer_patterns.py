"""PET's pattern ensemble: ClassificationDataModule(patterns=...) puts every validation text under each pattern, and
VerbalizerClassificationModule.predict_step averages the class scores over the patterns exactly."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoTokenizer

from lit_ft.data import ClassificationDataModule
from lit_ft.modules import VerbalizerClassificationModule
from lit_ft.modules.verbalizer import ensemble_scores
from lit_ft.testing import write_tiny_classification_jsonl
from tests.helpers import tiny_config

WORDS = [["books"], ["apples"]]
PATTERNS = ["Item: {text} Answer:", "{text} Is it fruit?", "Q: {text}"]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_path)


def data(tmp_path, tok, **kw):
    train = write_tiny_classification_jsonl(tmp_path / "train.jsonl", n=8)
    val = write_tiny_classification_jsonl(tmp_path / "val.jsonl", n=5, seed=1)
    kw.setdefault("template", PATTERNS[0])
    return ClassificationDataModule(data=train, val_data=val, tokenizer=tok.name_or_path, batch_size=4, **kw)


def module(tok):
    torch.manual_seed(0)
    m = VerbalizerClassificationModule(model_config=tiny_config(), label_words=WORDS).eval()
    m.build_verbalizer(tok)
    return m


def test_ensemble_scores_is_the_mean_over_patterns():
    s = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [-1.0, 5.0]]])  # [B=1, P=3, C=2]
    assert torch.equal(ensemble_scores(s), torch.tensor([[1.0, 1.0]]))


def test_pattern_batches_hold_each_text_under_each_pattern(tok, tmp_path):
    dm = data(tmp_path, tok, patterns=PATTERNS)
    dm.setup()
    train = next(iter(dm.train_dataloader()))
    assert "pattern_input_ids" not in train  # training uses the one template
    b = next(iter(dm.val_dataloader()))
    B = b["input_ids"].shape[0]
    assert b["pattern_input_ids"].shape[:2] == (B, 3) == b["pattern_attention_mask"].shape[:2]
    texts = [json.loads(line)["text"] for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    for i in range(B):
        row = int(b["sample_idx"][i])
        for p, pattern in enumerate(PATTERNS):
            n = int(b["pattern_attention_mask"][i, p].sum())
            want = tok(pattern.replace("{text}", texts[row]))["input_ids"]
            assert b["pattern_input_ids"][i, p, :n].tolist() == want
    assert dm.predict_dataloader() is not None


def test_predict_step_averages_the_patterns_scores_exactly(tok, tmp_path):
    dm = data(tmp_path, tok, patterns=PATTERNS)
    dm.setup()
    b = next(iter(dm.val_dataloader()))
    m = module(tok)
    with torch.no_grad():
        per_pattern = []
        for p in range(len(PATTERNS)):  # each pattern scored alone, with its own padding
            n = int(b["pattern_attention_mask"][:, p].sum(-1).max())
            per_pattern.append(m(b["pattern_input_ids"][:, p, :n], b["pattern_attention_mask"][:, p, :n]))
        want = torch.stack(per_pattern, 1).mean(1)
        got = m.pattern_scores(b["pattern_input_ids"], b["pattern_attention_mask"])
        torch.testing.assert_close(got.mean(1), want, rtol=1e-5, atol=1e-5)
        assert torch.equal(m.predict_step(b, 0), ensemble_scores(got).argmax(-1))
        single = m.predict_step({k: v for k, v in b.items() if not k.startswith("pattern_")}, 0)
        assert torch.equal(single, m(b["input_ids"], b["attention_mask"]).argmax(-1))
    # the ensemble is not the first pattern alone (the test can tell them apart)
    assert not torch.allclose(want, per_pattern[0])


def test_trainer_predict_runs_the_ensemble(tok, tmp_path):
    dm = data(tmp_path, tok, patterns=PATTERNS[:2])
    m = module(tok)
    t = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    preds = torch.cat(t.predict(m, datamodule=dm))
    assert preds.shape == (5,) and set(preds.tolist()) <= {0, 1}


@pytest.mark.parametrize("patterns", [[], ["no slot"], ["{text} {text}"], "{text}"])
def test_bad_patterns_name_the_argument(patterns, tmp_path, tok):
    with pytest.raises(ValueError, match=r"patterns must be a non-empty list of strings with exactly one"):
        data(tmp_path, tok, patterns=patterns)


def test_pattern_scores_wants_three_dims(tok):
    with pytest.raises(ValueError, match=r"pattern_input_ids must be \[batch, patterns, tokens\]"):
        module(tok).pattern_scores(torch.ones(2, 5, dtype=torch.long))
