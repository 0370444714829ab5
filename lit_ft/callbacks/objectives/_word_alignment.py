"""Word-level alignment of two tokenisations of one text (token relation distillation between models whose
tokenizers differ).

The student's row is decoded to text with the student's tokenizer, each student token gets its character span (the
tokenizer's own offsets when re-encoding the text gives back the row's ids, else the lengths of the decoded prefixes;
special tokens decode to nothing and cover no character),
the teacher's tokenizer encodes the same text with ``return_offsets_mapping``, and both sides' tokens are mapped to
the **words** of the text (``\\w+`` runs and single punctuation characters, :data:`WORD_RE`) whose characters they
overlap. A word takes part when at least one selected student token and one teacher token overlap it; each side's
feature of a word is then the mean of its tokens' features.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

#: what a word is: a run of word characters, or one punctuation / symbol character
WORD_RE = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class RowAlignment:
    """One row's alignment. ``student_pos`` / ``student_word``: pairs (token position in the row, word index); the
    same for the teacher (``teacher_pos`` indexes ``teacher_ids``). Word indices run over ``0..num_words-1``."""

    student_pos: np.ndarray
    student_word: np.ndarray
    teacher_ids: list[int]
    teacher_pos: np.ndarray
    teacher_word: np.ndarray
    num_words: int
    text: str


def student_spans(tokenizer: Any, ids: list[int]) -> tuple[str, np.ndarray, np.ndarray]:
    """The decoded text of ``ids`` (special tokens skipped) and each token's character span ``[start, end)`` in it;
    special tokens get empty spans.

    Fast path: a fast tokenizer re-encodes the text with offsets; when that gives back exactly the row's non-special
    ids, its offsets are the spans (linear time). Otherwise (a row that is not the tokenizer's own encoding of its
    text, or a slow tokenizer): :func:`prefix_spans`."""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    kept = [i for i, t in enumerate(ids) if t not in special]
    text = tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) if ids else ""
    if kept and getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) == [ids[i] for i in kept]:
            starts = np.zeros(len(ids), dtype=np.int64)
            ends = np.zeros(len(ids), dtype=np.int64)
            offsets = np.array(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
            starts[kept], ends[kept] = offsets[:, 0], offsets[:, 1]
            return text, starts, ends
    return prefix_spans(tokenizer, ids)


def prefix_spans(tokenizer: Any, ids: list[int]) -> tuple[str, np.ndarray, np.ndarray]:
    """Spans for any tokenizer: ``end`` of a token is the length of the decoded prefix up to it (non-decreasing,
    clipped to the text), ``start`` the previous token's end. Quadratic in the row length (one decode per prefix)."""
    n = len(ids)
    if n == 0:
        return "", np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    prefixes = tokenizer.batch_decode([ids[:i + 1] for i in range(n)], skip_special_tokens=True,
                                      clean_up_tokenization_spaces=False)
    text = prefixes[-1]
    ends = np.minimum(np.maximum.accumulate(np.array([len(p) for p in prefixes], dtype=np.int64)), len(text))
    starts = np.concatenate([np.zeros(1, dtype=np.int64), ends[:-1]])
    return text, starts, ends


def spans_to_words(starts: np.ndarray, ends: np.ndarray, word_starts: np.ndarray,
                   word_ends: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(token index, word index)`` for every token span that overlaps a word span (``start < word_end`` and
    ``end > word_start``); empty spans overlap nothing."""
    lo = np.searchsorted(word_ends, starts, side="right")  # first word ending after the token starts
    hi = np.searchsorted(word_starts, ends, side="left")  # words starting before the token ends
    counts = np.where(ends > starts, np.maximum(hi - lo, 0), 0)
    tok = np.repeat(np.arange(len(starts), dtype=np.int64), counts)
    first = np.repeat(lo - np.cumsum(counts) + counts, counts)  # per pair: lo of its token minus its running offset
    word = first + np.arange(int(counts.sum()), dtype=np.int64)
    return tok, word


def align_row(student_tokenizer: Any, teacher_tokenizer: Any, ids: list[int], positions: np.ndarray,
              selected: np.ndarray, teacher_max_length: int) -> RowAlignment:
    """Align one row. ``ids``: the row's real tokens (padding removed) at row positions ``positions``;
    ``selected``: bool per real token, the tokens whose words take part (all of them, or the supervised span)."""
    text, starts, ends = student_spans(student_tokenizer, ids)
    words = [m.span() for m in WORD_RE.finditer(text)]
    empty = np.zeros(0, dtype=np.int64)
    if not words:
        return RowAlignment(empty, empty, [], empty, empty, 0, text)
    ws = np.array([a for a, _ in words], dtype=np.int64)
    we = np.array([b for _, b in words], dtype=np.int64)
    s_tok, s_word = spans_to_words(starts, ends, ws, we)
    keep = selected[s_tok]
    s_tok, s_word = s_tok[keep], s_word[keep]
    enc = teacher_tokenizer(text, return_offsets_mapping=True, truncation=True, max_length=teacher_max_length,
                            add_special_tokens=True)
    offsets = np.array(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    t_tok, t_word = spans_to_words(offsets[:, 0], offsets[:, 1], ws, we)
    both = np.intersect1d(np.unique(s_word), np.unique(t_word))
    renumber = np.full(len(words), -1, dtype=np.int64)
    renumber[both] = np.arange(len(both), dtype=np.int64)
    s_keep, t_keep = renumber[s_word] >= 0, renumber[t_word] >= 0
    return RowAlignment(student_pos=positions[s_tok[s_keep]], student_word=renumber[s_word[s_keep]],
                        teacher_ids=list(enc["input_ids"]), teacher_pos=t_tok[t_keep],
                        teacher_word=renumber[t_word[t_keep]], num_words=int(len(both)), text=text)


class AlignmentCache:
    """Row alignments by the row's content (its real token ids and selected positions): the window look-ahead counts
    a batch's words before its forward, and rows repeat across epochs. Least recently used rows go first."""

    def __init__(self, capacity: int = 4096) -> None:
        self.capacity = capacity
        self._rows: OrderedDict[tuple[bytes, bytes], RowAlignment] = OrderedDict()

    def get(self, key: tuple[bytes, bytes]) -> RowAlignment | None:
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put(self, key: tuple[bytes, bytes], row: RowAlignment) -> None:
        self._rows[key] = row
        self._rows.move_to_end(key)
        while len(self._rows) > self.capacity:
            self._rows.popitem(last=False)

    def clear(self) -> None:
        self._rows.clear()
