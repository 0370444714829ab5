"""``FeedbackLoopDataModule``: the data of the LeTI feedback loop (:class:`lit_ft.callbacks.FeedbackLoop`).

Two sources: the **problems** (HumanEval-format JSONL: ``task_id``, ``prompt``, ``test``, ``entry_point``,
optionally ``canonical_solution``), split once with a seeded permutation into the problems the loop samples programs
for and held-out problems for pass@1; and the **plain data** — the regulariser LeTI mixes 1:1 with the feedback
texts (the paper: unlabelled Python from TheStack) — read exactly as :class:`lit_ft.data.SFTDataModule` reads its
``data`` (this class is one), so its labels are what SFT gives them (completion-only). The training set of each
iteration is built by the callback (:meth:`set_iteration_rows`): feedback texts (every token is a target, as in the
authors' code) alternated with plain rows, so each batch is half of each. Its size never changes between
iterations (``2 × num_samples × train problems``), so Lightning's loaders need no reload. Without a FeedbackLoop in
the run it is the SFTDataModule of its plain data (a baseline).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from lit_ft.data._common import check_int, resolve_data
from lit_ft.data.sft import IGNORE_INDEX, SFTDataModule
from lit_ft.data.sources import DataSource

__all__ = ["FeedbackLoopDataModule", "load_problems", "split_problems"]

PROBLEM_KEYS = ("task_id", "prompt", "test", "entry_point")


def load_problems(path: str) -> list[dict[str, Any]]:
    """HumanEval-format problems from a JSONL file or asset name; each must have a non-empty ``prompt``, ``test``
    and ``entry_point`` (the error names the problem and the missing field: a problem without tests cannot give
    feedback)."""
    file = Path(resolve_data("problems", path))
    if file.is_dir():
        found = sorted(file.glob("*.jsonl"))
        if len(found) != 1:
            raise ValueError(f"FeedbackLoopDataModule: `problems` folder {file} must hold one .jsonl file, found "
                             f"{[f.name for f in found]}")
        file = found[0]
    problems = []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise ValueError(f"FeedbackLoopDataModule: `problems` {file} line {n} is not JSON: {e}") from None
        name = row.get("task_id", f"line {n}") if isinstance(row, dict) else f"line {n}"
        for key in PROBLEM_KEYS:
            if not isinstance(row, dict) or not isinstance(row.get(key), str) or not row[key].strip():
                what = "tests" if key == "test" else f"a `{key}`"
                raise ValueError(f"FeedbackLoopDataModule: problem {name!r} in {file} has no {what} (field "
                                 f"{key!r} must be a non-empty string); every problem needs prompt, test and "
                                 "entry_point")
        problems.append(row)
    if not problems:
        raise ValueError(f"FeedbackLoopDataModule: `problems` {file} holds no problem")
    return problems


def split_problems(problems: Sequence[dict], num_eval: int, seed: int) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: a seeded permutation of ``problems``; its last ``num_eval`` are held out."""
    if num_eval >= len(problems):
        raise ValueError(f"FeedbackLoopDataModule: `num_eval_problems` must be < the number of problems "
                         f"({len(problems)}), got {num_eval}")
    order = torch.randperm(len(problems), generator=torch.Generator().manual_seed(seed)).tolist()
    cut = len(problems) - num_eval
    return [problems[i] for i in order[:cut]], [problems[i] for i in order[cut:]]


class _IterationRows(Dataset):
    """The current iteration's rows; replaced in place by the callback at an iteration's start (the loader's
    iterator is created after ``on_train_epoch_start``, so each epoch reads the rows of its iteration)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: list[dict] = []

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        if not self.rows:
            raise RuntimeError("FeedbackLoopDataModule: no iteration data yet: lit_ft.callbacks.FeedbackLoop builds "
                               "it at the start of each iteration (is it in trainer.callbacks?)")
        return self.rows[i]


class FeedbackLoopDataModule(SFTDataModule):
    """Problems to sample programs for (and held-out ones for pass@1) + the plain data LeTI mixes in 1:1.

    Takes every argument of :class:`lit_ft.data.SFTDataModule` (``data`` is the plain data; default
    ``alpaca-en-demo``: general instruction data that keeps the model's language ability, the role TheStack plays in
    the paper, and no problem's solution leaks into training) and:

    Args:
        problems: HumanEval-format JSONL (path or asset name; default the bundled ``humaneval``, 164 problems).
        num_eval_problems: problems held out for pass@1 (default 44: 120 train / 44 held out).
        max_train_problems: keep only the first this many training problems (small runs); None = all.
        problem_split_seed: seed of the train / held-out permutation.
    """

    def __init__(self, problems: str = "humaneval", num_eval_problems: int = 44,
                 max_train_problems: int | None = None, problem_split_seed: int = 0,
                 data: DataSource = "alpaca-en-demo", **kwargs: Any) -> None:
        if not isinstance(problems, str) or not problems.strip():
            raise ValueError(f"FeedbackLoopDataModule: `problems` must be a path or asset name, got {problems!r}")
        check_int("num_eval_problems", num_eval_problems, 0)
        check_int("max_train_problems", max_train_problems, 1, optional=True)
        check_int("problem_split_seed", problem_split_seed, 0)
        super().__init__(data=data, **kwargs)
        if self.packing:
            raise ValueError("FeedbackLoopDataModule: `packing` is not supported (its rows are rebuilt each "
                             "iteration); use packing=False")
        self.problems_path = problems
        self.num_eval_problems = num_eval_problems
        self.max_train_problems = max_train_problems
        self.problem_split_seed = problem_split_seed
        self.train_problems: list[dict] = []
        self.eval_problems: list[dict] = []
        self._rows: _IterationRows | None = None

    def prepare_data(self) -> None:
        super().prepare_data()
        resolve_data("problems", self.problems_path)

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if not self.train_problems:
            train, held = split_problems(load_problems(self.problems_path), self.num_eval_problems,
                                         self.problem_split_seed)
            self.train_problems = train[: self.max_train_problems] if self.max_train_problems else train
            self.eval_problems = held

    @property
    def plain_examples(self) -> list[dict]:
        """The encoded plain rows (the SFT training split)."""
        return self._examples("train")

    def reserve(self, size: int) -> None:
        """Fix the training set's size (the callback's ``num_samples × train problems × (2 with plain data)``)."""
        if self._rows is None or self._rows.size != size:
            self._rows = _IterationRows(size)

    def encode_feedback_text(self, text: str) -> list[int]:
        """Token ids of a feedback text (no template, no added special tokens beyond the text's own), cut to
        ``max_length`` from the right."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][: self.max_length]

    def set_iteration_rows(self, feedback_texts: Sequence[str], plain_indices: Sequence[int] | None) -> None:
        """This iteration's training set: feedback text ``i`` (every token a target) followed by plain row
        ``plain_indices[i]`` (when given), for every ``i``."""
        if self._rows is None:
            raise RuntimeError("FeedbackLoopDataModule.reserve must run first (FeedbackLoop.setup does it)")
        rows: list[dict] = []
        plain = self.plain_examples
        for i, text in enumerate(feedback_texts):
            ids = self.encode_feedback_text(text)
            rows.append({"input_ids": ids, "labels": list(ids), "sample_idx": len(rows)})
            if plain_indices is not None:
                p = plain[plain_indices[i]]
                rows.append({"input_ids": p["input_ids"], "labels": p["labels"], "sample_idx": len(rows)})
        if len(rows) != self._rows.size:
            raise RuntimeError(f"FeedbackLoopDataModule: {len(rows)} rows for a training set of {self._rows.size}")
        self._rows.rows = rows

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        return super().collate([{**e, "labels": [t if t is not None else IGNORE_INDEX for t in e["labels"]]}
                                for e in examples])

    def train_dataloader(self) -> DataLoader:
        if self._rows is None:  # no FeedbackLoop in this run: the SFT DataModule of the plain data
            return super().train_dataloader()
        # fixed order (the callback shuffles each iteration with its own seed): identical after a resume
        return DataLoader(self._rows, batch_size=self.batch_size, shuffle=False, collate_fn=self.collate,
                          num_workers=self.num_workers, persistent_workers=False)
