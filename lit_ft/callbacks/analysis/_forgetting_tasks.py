"""ForgettingMonitor's general tasks: loading, prompt templates, conjugate transforms, encoding, evaluation.

A task is a JSONL file (a lit-ft asset name or a path) in one of two row formats:

- ``{"prompt", "completion", ...}`` — *generation*: loss over the completion's tokens, prefix-match accuracy;
- ``{"text", "label"}`` — *choice* (classification): the text is asked about with a question, every label's
  verbalisation is scored as the answer; label names from ``label_names.json`` beside the file, else the labels'
  own strings (sorted). The ``sarcasm`` / ``sarcasm-val`` assets are asked "yes / no".

Prompts are rendered with the tokenizer's chat template when it has one (the format :class:`SFTDataModule` trains
with by default), else as ``"{prompt}\\n"``. The answer (completion / label word) is scored right after the rendered
prompt.

Conjugate transforms (:data:`CONJUGATES`) rewrite the *user prompt only*; the scored answer is unchanged.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX

__all__ = ["CONJUGATES", "DEFAULT_TASKS", "Encoded", "ForgettingTask", "conjugate_text", "encode_task",
           "evaluate_encoded", "leetspeak", "load_task", "pig_latin", "reformat"]

#: tasks measured by default: an instruction set and two classification sets the user is unlikely to train on
DEFAULT_TASKS: tuple[str, ...] = ("alpaca-en-demo", "sarcasm-val", "bbcnews")

_SARCASM = (("no", "yes"), "Is the news headline above sarcastic? Answer yes or no.")


# -- conjugate transforms ---------------------------------------------------------------------------------------
_LEET = str.maketrans({"a": "4", "A": "4", "e": "3", "E": "3", "i": "1", "I": "1", "o": "0", "O": "0",
                       "s": "5", "S": "5", "t": "7", "T": "7", "b": "8", "B": "8"})
_WORD = re.compile(r"[A-Za-z]+")
_VOWELS = set("aeiouAEIOU")


def leetspeak(text: str) -> str:
    """Character substitution a/A→4, e/E→3, i/I→1, o/O→0, s/S→5, t/T→7, b/B→8 (everything else unchanged).

    The authors' Leetspeak sentences (made with an online translator) use these digits and also randomise letter
    case; the case change is left out here so the transform stays a deterministic function of the text."""
    return text.translate(_LEET)


def _pig_word(w: str) -> str:
    if w[0] in _VOWELS:
        out = w + "way"
    else:
        k = next((i for i, c in enumerate(w) if c in _VOWELS or (i > 0 and c in "yY")), len(w))
        out = w[k:] + w[:k] + "ay"
    if w[0].isupper():  # keep a capitalised word capitalised ("Hello" -> "Ellohay")
        out = out[0].upper() + out[1:].lower() if not w.isupper() else out.upper()
    return out


def pig_latin(text: str) -> str:
    """Pig Latin per alphabetic word: a leading consonant cluster moves to the end + "ay" ("string" → "ingstray");
    a word that starts with a vowel gets "way" ("apple" → "appleway"); "y" after the first letter counts as a
    vowel. Digits, punctuation and spacing are unchanged."""
    return _WORD.sub(lambda m: _pig_word(m.group(0)), text)


def reformat(text: str) -> str:
    """The identity on the text: ``"reformat"`` changes the *template* (see :func:`render_prompt`), not the
    words."""
    return text


CONJUGATES: dict[str, Callable[[str], str] | None] = {
    "none": None, "reformat": reformat, "leetspeak": leetspeak, "pig_latin": pig_latin,
}


def conjugate_text(text: str, conjugate: str) -> str:
    fn = CONJUGATES[conjugate]
    return text if fn is None else fn(text)


# -- tasks ------------------------------------------------------------------------------------------------------
@dataclass
class ForgettingTask:
    """One general task: ``kind`` ``"generation"`` (items: prompt, completion) or ``"choice"`` (items: prompt,
    gold label index; ``label_names`` the verbalisations)."""

    name: str
    kind: str
    items: list[tuple[str, Any]]
    label_names: tuple[str, ...] = ()


def _task_name(spec: str) -> str:
    p = Path(spec)
    return p.stem if p.suffix in (".jsonl", ".json") else spec


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def load_task(spec: str, max_samples: int, seed: int = 0) -> ForgettingTask:
    """Read ``spec`` (an asset name or a JSONL path) and keep ``max_samples`` rows of a seeded shuffle (the same
    rows on every rank and in every run)."""
    from lit_ft import assets

    path = Path(assets.resolve(spec)) if not Path(spec).exists() else Path(spec)
    rows = _rows(path)
    if not rows:
        raise ValueError(f"ForgettingMonitor: task {spec!r} ({path}) has no rows")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    rows = [rows[i] for i in order[:max_samples]]
    name = _task_name(spec)
    first = rows[0]
    if "prompt" in first and "completion" in first:
        return ForgettingTask(name, "generation", [(str(r["prompt"]), str(r["completion"])) for r in rows])
    if "text" in first and "label" in first:
        names_file = path.parent / "label_names.json"
        if spec in ("sarcasm", "sarcasm-val"):  # the sarcasm assets: {text, label 0|1}, asked yes / no
            (names, question), by_index = _SARCASM, True
        else:
            by_index = names_file.exists()  # integer labels index label_names.json; otherwise labels are names
            if by_index:
                names = tuple(str(x) for x in json.loads(names_file.read_text()))
            else:  # every label of the file, not only of the kept rows (the same names whatever max_samples)
                names = tuple(sorted({str(r["label"]) for r in _rows(path)}))
            question = f"Which topic fits the text above: {', '.join(names)}? Answer with the topic only."
        items = []
        for r in rows:
            lab = r["label"]
            if by_index and isinstance(lab, int) and not isinstance(lab, bool) and 0 <= lab < len(names):
                idx: int | None = lab
            else:
                idx = names.index(str(lab)) if str(lab) in names else None
            if idx is None:
                raise ValueError(f"ForgettingMonitor: task {spec!r}: label {lab!r} is not one of {list(names)}")
            items.append((f"{r['text']}\n\n{question}", idx))
        return ForgettingTask(name, "choice", items, tuple(names))
    raise ValueError(f"ForgettingMonitor: task {spec!r}: rows must have 'prompt' and 'completion' (generation) or "
                     f"'text' and 'label' (classification), got keys {sorted(first)}")


# -- encoding ---------------------------------------------------------------------------------------------------
def render_prompt(tokenizer: Any, prompt: str, conjugate: str) -> str:
    """The text before the answer: the chat template's user turn + generation prompt when the tokenizer has one
    and ``conjugate != "reformat"``; ``"Q: ...\\nA: "`` for ``"reformat"`` (no chat markup: a format the chat
    fine-tuning never saw); ``"{prompt}\\n"`` otherwise."""
    text = conjugate_text(prompt, conjugate)
    if conjugate == "reformat":
        return f"Q: {text}\nA: "
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{text}\n"


@dataclass
class Encoded:
    """A task's rows ready for the model: ``input_ids`` and ``labels`` per row; ``groups`` / ``gold`` for choice
    tasks (one row per item and label)."""

    task: str
    input_ids: list[list[int]]
    labels: list[list[int]]
    groups: list[int] = field(default_factory=list)
    gold: list[bool] = field(default_factory=list)

    @property
    def is_choice(self) -> bool:
        return bool(self.groups)


def _ids(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def _row(prompt_ids: list[int], answer_ids: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Prompt (left-truncated to leave room for the answer) + answer (cut at ``max_length``); labels on the
    answer only."""
    answer_ids = answer_ids[: max(1, max_length - 1)]
    keep = max(1, max_length - len(answer_ids))
    prompt_ids = prompt_ids[-keep:]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)


def encode_task(task: ForgettingTask, tokenizer: Any, conjugate: str = "none", max_length: int = 256) -> Encoded:
    """Tokenise ``task`` through ``conjugate`` (see :data:`CONJUGATES`)."""
    enc = Encoded(task.name, [], [])
    for item_idx, (prompt, answer) in enumerate(task.items):
        p_ids = _ids(tokenizer, render_prompt(tokenizer, prompt, conjugate))
        if task.kind == "generation":
            ids, labels = _row(p_ids, _ids(tokenizer, answer), max_length)
            enc.input_ids.append(ids)
            enc.labels.append(labels)
            continue
        for k, name in enumerate(task.label_names):
            ids, labels = _row(p_ids, _ids(tokenizer, name), max_length)
            enc.input_ids.append(ids)
            enc.labels.append(labels)
            enc.groups.append(item_idx)
            enc.gold.append(k == answer)
    return enc


def _shard(enc: Encoded, rank: int, world: int) -> list[int]:
    """Row indices of this rank: whole items (all label rows of a choice item stay together), round robin."""
    if not enc.is_choice:
        return list(range(rank, len(enc.input_ids), world))
    return [i for i, g in enumerate(enc.groups) if g % world == rank]


def _batches(rows: list[int], enc: Encoded, batch_size: int) -> Iterator[list[int]]:
    if not enc.is_choice:
        for s in range(0, len(rows), batch_size):
            yield rows[s: s + batch_size]
        return
    chunk: list[int] = []  # never split an item's label rows across batches
    for g in dict.fromkeys(enc.groups[i] for i in rows):
        item = [i for i in rows if enc.groups[i] == g]
        if chunk and len(chunk) + len(item) > batch_size:
            yield chunk
            chunk = []
        chunk += item
    if chunk:
        yield chunk


@torch.no_grad()
def evaluate_encoded(model: nn.Module, encoded: Sequence[Encoded], metric: Any, batch_size: int = 8,
                     rank: int = 0, world: int = 1, pad_id: int = 0) -> None:
    """Run ``model`` (an HF causal LM) over this rank's share of every task and update ``metric``
    (:class:`~lit_ft.metrics.forgetting.ForgettingMetric`). Right padding; the model is put in eval mode and its
    modules' training flags restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    device = next(model.parameters()).device
    try:
        for enc in encoded:
            for rows in _batches(_shard(enc, rank, world), enc, batch_size):
                T = max(len(enc.input_ids[i]) for i in rows)
                ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
                labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
                attn = torch.zeros((len(rows), T), dtype=torch.long)
                for r, i in enumerate(rows):
                    n = len(enc.input_ids[i])
                    ids[r, :n] = torch.tensor(enc.input_ids[i])
                    labels[r, :n] = torch.tensor(enc.labels[i])
                    attn[r, :n] = 1
                logits = model(input_ids=ids.to(device), attention_mask=attn.to(device)).logits
                kw = {}
                if enc.is_choice:
                    kw = {"groups": torch.tensor([enc.groups[i] for i in rows]),
                          "gold": torch.tensor([enc.gold[i] for i in rows])}
                metric.update(logits, labels.to(device), enc.task, **kw)
    finally:
        for m, mode in modes:
            m.training = mode
