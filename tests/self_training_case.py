"""Tiny few-shot data and module for the SelfTraining tests and its contract case (a tiny tokenizer and JSONL rows
made once per process in a temporary folder, never in the repository)."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from lit_ft.data.few_shot import FewShotDataModule
from lit_ft.modules.self_training import SelfTrainingModule
from lit_ft.testing import make_tiny_tokenizer, tiny_llama_config, write_tiny_classification_jsonl

LABEL_WORDS = [["no"], ["yes"]]


@functools.lru_cache(maxsize=1)
def tiny_files() -> tuple[str, str, str]:
    """(tokenizer folder, train JSONL with 48 rows, val JSONL with 8 rows)."""
    d = Path(tempfile.mkdtemp(prefix="lit_ft_self_training_"))
    tok = make_tiny_tokenizer(d / "tok")
    train = write_tiny_classification_jsonl(d / "train.jsonl", n=48)
    val = write_tiny_classification_jsonl(d / "val.jsonl", n=8, seed=1)
    return tok, train, val


def few_shot_data(**kw) -> FewShotDataModule:
    """4 labelled rows per class (2 labelled batches of 4 per epoch), 40 unlabelled rows in batches of 8."""
    tok, train, val = tiny_files()
    args = dict(data=train, val_data=val, tokenizer=tok, shots_per_class=4, batch_size=4, unlabelled_batch_size=8,
                meta_batch_size=3, max_length=16)
    args.update(kw)
    return FewShotDataModule(**args)


def few_shot_module(**kw) -> SelfTrainingModule:
    args = dict(model_config=tiny_llama_config(vocab_size=384), label_words=LABEL_WORDS, learning_rate=1e-2)
    args.update(kw)
    return SelfTrainingModule(**args)


#: a schedule that crosses every phase within 8 steps: teacher 0, session 1 = steps 1-3 (student 1-2, labelled 3),
#: session 2 = steps 4-6, done at 7
TINY_SCHEDULE = dict(teacher_steps=1, num_sessions=2, student_steps=2, finetune_steps=1, meta_warmup=0.0,
                     bottleneck=4, teacher_learning_rate=1e-2, student_learning_rate=1e-2, meta_learning_rate=1.0)
