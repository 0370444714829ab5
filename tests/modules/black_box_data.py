"""Tiny, hub-free data and settings for BlackBoxPromptLearning tests and its contract case: a ClassificationDataModule
over tiny {text, label} JSONL with the tiny tokenizer, in a temporary folder (never the repository)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from lit_ft.data import ClassificationDataModule
from lit_ft.testing import make_tiny_tokenizer, tiny_llama_config, write_tiny_classification_jsonl

_DIR: Path | None = None


def tiny_dir() -> Path:
    """One temporary folder per test process with the tiny tokenizer and the JSONL files."""
    global _DIR
    if _DIR is None:
        _DIR = Path(tempfile.mkdtemp(prefix="lit_ft_bbpl_"))
        make_tiny_tokenizer(_DIR / "tok")
        write_tiny_classification_jsonl(_DIR / "train.jsonl", n=16)
        write_tiny_classification_jsonl(_DIR / "val.jsonl", n=8, seed=1)
    return _DIR


def tiny_data(n_train: int | None = None, batch_size: int = 4, **kw) -> ClassificationDataModule:
    """16 unlabelled training texts (4 batches of 4 unless ``batch_size`` says otherwise), 8 labelled val texts."""
    d = tiny_dir()
    return ClassificationDataModule(data=str(d / "train.jsonl"), val_data=str(d / "val.jsonl"),
                                    tokenizer=str(d / "tok"), batch_size=batch_size, max_length=32,
                                    template="{text} ? Answer:", max_train_samples=n_train, **kw)


def two_batch_data() -> ClassificationDataModule:
    """8 unlabelled texts in 2 batches: the resume check's step-2 checkpoint falls on an epoch boundary."""
    return tiny_data(n_train=8)


#: small, fast module settings (tiny random Llama, 3 positions over 6 candidates, 3 samples)
TINY_KWARGS = dict(model_config=tiny_llama_config(vocab_size=384), label_words=[["books"], ["apples"]],
                   prompt_length=3, num_candidates=6, num_samples=3, reliable_per_class=2,
                   demonstrations_per_class=1, learning_rate=0.5, seed=1)
