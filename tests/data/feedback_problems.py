"""Tiny HumanEval-format problems for the feedback-loop tests (no asset): two a sampled program may solve by
chance is not the point — the tests check formatting, execution and the loop's bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

PROBLEMS = [
    {"task_id": f"Tiny/{i}", "prompt": f"def add_{i}(x):\n    \"\"\"Return x + {i}.\"\"\"\n",
     "canonical_solution": f"    return x + {i}\n",
     "test": f"def check(candidate):\n    assert candidate(1) == {1 + i}\n    assert candidate(-{i}) == 0\n",
     "entry_point": f"add_{i}"}
    for i in range(6)
]


def write_tiny_problems(path: str | Path, n: int = 6) -> str:
    """``n`` (<= 6) tiny problems as HumanEval JSONL at ``path``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS[:n]), encoding="utf-8")
    return str(path)


_FILES: dict[str, str] = {}


def feedback_datamodule(n_data: int = 8, batch_size: int = 4, **kwargs):
    """A FeedbackLoopDataModule on the tiny tokenizer, 6 tiny problems (2 held out) and ``n_data`` tiny SFT rows:
    with ``num_samples=1``, 4 feedback + 4 plain rows = 2 batches of 4 per epoch. Files live in one temporary
    folder per process (made once)."""
    import tempfile

    from lit_ft.data.feedback_loop import FeedbackLoopDataModule
    from lit_ft.testing import make_tiny_tokenizer, write_tiny_sft_jsonl

    if not _FILES:
        root = Path(tempfile.mkdtemp(prefix="lit_ft_feedback_test_"))
        _FILES["tokenizer"] = make_tiny_tokenizer(root / "tok")
        _FILES["problems"] = write_tiny_problems(root / "problems.jsonl")
        _FILES["data"] = write_tiny_sft_jsonl(root / "plain.jsonl", n=n_data)
    args = dict(problems=_FILES["problems"], num_eval_problems=2, data=_FILES["data"], tokenizer=_FILES["tokenizer"],
                batch_size=batch_size, max_length=64, val_split=0.0)
    args.update(kwargs)
    return FeedbackLoopDataModule(**args)
