"""Shared pieces of the lit-ft DataModules: reading rows, splitting, argument checks, padding, resumable loaders.

The DataModule base class built from them is :class:`lit_ft.data._base._TextDataModule`.
"""

from __future__ import annotations

import json
import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from lit_ft import assets
from lit_ft.data.sampler import ResumableBatchSampler
from lit_ft.data.sources import (
    DATASETS_SUFFIXES,
    VAL_SPLITS,
    DataSource,
    check_source,
    dataset_rows,
    describe,
    is_dataset,
    is_dataset_dict,
    is_path_like,
    load_spec,
    pick_split,
    read_file_with_datasets,
    train_split,
)


class DataWarning(UserWarning):
    """Something about the data that changes what is trained on (truncation, dropped samples)."""


def is_rank_zero() -> bool:
    try:
        from lightning.fabric.utilities.rank_zero import rank_zero_only

        return getattr(rank_zero_only, "rank", 0) == 0
    except ImportError:  # pragma: no cover
        return True


def warn_rank_zero(msg: str) -> None:
    if is_rank_zero():
        warnings.warn(msg, DataWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------------------------


def check_int(name: str, value: Any, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or None" if optional else "")
        raise ValueError(f"{name} must be {allowed}, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


def check_str(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, (str, os.PathLike)) or not str(value):
        raise ValueError(f"{name} must be a non-empty path or asset name{' or None' if optional else ''}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# reading data
# ---------------------------------------------------------------------------------------------------------------


def resolve_data(arg_name: str, value: str) -> str:
    """Resolve a data path or asset name, re-raising with the argument name in the message."""
    try:
        return assets.resolve(value)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{arg_name}={value!r}: {e}") from None


def read_rows(path: str, arg_name: str = "data") -> list[dict]:
    """Rows of a JSONL file (one object per line) or a JSON file (a list of objects, or {"data": [...]}); Parquet,
    CSV and Arrow files through the optional ``datasets`` library (:mod:`lit_ft.data.sources`)."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{arg_name}={path!r} is a folder; expected a .jsonl, .json or .parquet file")
    if p.suffix.lower() in DATASETS_SUFFIXES:
        return read_file_with_datasets(path, arg_name)
    text = p.read_text(encoding="utf-8")
    rows: Any
    stripped = text.lstrip()
    if p.suffix == ".json" or (stripped.startswith("[") and p.suffix != ".jsonl"):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{arg_name}={path!r}: not valid JSON ({e})") from None
        if isinstance(rows, dict) and isinstance(rows.get("data"), list):
            rows = rows["data"]
        if not isinstance(rows, list):
            raise ValueError(f"{arg_name}={path!r}: a .json data file must hold a list of row objects")
    else:
        rows = []
        for ln, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{arg_name}={path!r}: line {ln} is not valid JSON ({e})") from None
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(f"{arg_name}={path!r}: row {i} is a {type(r).__name__}, expected a JSON object")
    if not rows:
        raise ValueError(f"{arg_name}={path!r} holds no rows")
    return rows


def companion_val(data: Any) -> str | None:
    """The ``<name>-val`` asset of an asset name, when one exists (never for Dataset objects or specs)."""
    if not isinstance(data, str):
        return None
    name = f"{data}-val"
    return name if data in assets.ASSETS and name in assets.ASSETS else None


def load_source(arg_name: str, value: DataSource) -> tuple[list[dict], Any | None, dict[str, Any]]:
    """(rows, the validation split a DatasetDict brings or None, info) of one ``data``/``val_data`` value.

    A path or asset name is read as a file (``info["data_path"]``); a ``datasets.Dataset`` gives its rows; a
    ``DatasetDict`` its "train" split (or its only one) and, as the second item, its "validation"/"valid"/"val"/
    "test" split when it has one; a dict is a ``datasets.load_dataset`` spec whose result is handled the same way.
    ``info["features"]`` holds a Dataset's features (class names of a ``ClassLabel`` column)."""
    info: dict[str, Any] = {}
    if is_path_like(value):
        path = resolve_data(arg_name, str(value))
        info["data_path"] = path
        return read_rows(path, arg_name), None, info
    if isinstance(value, Mapping) and not is_dataset_dict(value):  # a DatasetDict is a dict too
        value = load_spec(value, arg_name)
    val = None
    if is_dataset_dict(value):
        val = pick_split(value, VAL_SPLITS, arg_name)
        value = train_split(value, arg_name)
    if not is_dataset(value):
        check_source(arg_name, value)  # raises: neither a path, a Dataset, a DatasetDict nor a spec
    info["features"] = getattr(value, "features", None)
    return dataset_rows(value, arg_name), val, info


def load_splits(
    data: DataSource, val_data: DataSource | None, val_split: float, seed: int
) -> tuple[list[dict], list[dict], dict[str, Any]]:
    """(train rows, val rows, info) following the DataModule rules for ``val_data``/``val_split``: ``val_data``
    first, then the validation split of a ``DatasetDict`` ``data``, then the ``<data>-val`` asset, else a seeded
    ``val_split`` fraction of ``data``."""
    rows, dict_val, info = load_source("data", data)
    if val_data is None:
        val_data = companion_val(data) if dict_val is None else dict_val
    if val_data is not None:
        val_rows, val_of_val, val_info = load_source("val_data", val_data)
        if val_of_val is not None:  # a DatasetDict as val_data: its validation split, not its train split
            val_rows = dataset_rows(val_of_val, "val_data")
        if "data_path" in val_info:
            info["val_path"] = val_info["data_path"]
        info["val_source"] = describe(val_data)
        return rows, val_rows, info
    n_val = int(round(val_split * len(rows)))
    if val_split > 0 and n_val == 0 and len(rows) > 1:
        n_val = 1
    if n_val >= len(rows):
        raise ValueError(f"val_split={val_split} leaves no training rows out of {len(rows)}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[len(rows) - n_val :])
    info["val_from_split"] = n_val
    return (
        [r for i, r in enumerate(rows) if i not in val_idx],
        [r for i, r in enumerate(rows) if i in val_idx],
        info,
    )


def subsample(n: int, limit: int | None, seed: int) -> list[int]:
    """Indices kept by ``max_*_samples``: a seeded random subset, in original order (all when limit is None)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), limit))


def load_tokenizer(value: str, arg_name: str = "tokenizer"):
    from transformers import AutoTokenizer

    path = resolve_data(arg_name, value)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ValueError(f"{arg_name}={value!r} has neither a pad nor an eos token; set one in its folder")
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------------------------------
# datasets, padding, loaders
# ---------------------------------------------------------------------------------------------------------------


class ListDataset(Dataset):
    def __init__(self, examples: list[dict]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        return self.examples[i]


def pad_right(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return out


def pad_left(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
    return out


class ResumableDataLoader(DataLoader):
    """A DataLoader whose batch sampler position is saved in / restored from Lightning checkpoints.

    Lightning saves ``state_dict()`` of every loader that has one (and then does not warn that the loader is not
    resumable). ``progress`` returns the number of batches of the current epoch already consumed by training (from
    the trainer's progress counters, which unlike a count of fetched batches ignores prefetching).
    """

    def __init__(self, *args: Any, progress: Callable[[], int | None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._progress = progress
        # Expose the index sampler as `.sampler` (unused for iteration when a batch_sampler is set): Lightning then
        # calls its set_epoch, and under DDP wraps *it* in a DistributedSamplerWrapper instead of replacing it with
        # a sequential DistributedSampler over the dataset.
        inner = getattr(self.batch_sampler, "sampler", None)
        if inner is not None:
            object.__setattr__(self, "sampler", inner)

    def state_dict(self) -> dict:
        bs = self.batch_sampler
        if not isinstance(bs, ResumableBatchSampler):
            return {}
        return bs.state_dict(self._progress() if self._progress is not None else None)

    def load_state_dict(self, state: dict) -> None:
        bs = self.batch_sampler
        if isinstance(bs, ResumableBatchSampler) and state:
            bs.load_state_dict(state)



# ---------------------------------------------------------------------------------------------------------------
# key spans (character spans of the completion text that a technique treats specially, e.g. tool names)
# ---------------------------------------------------------------------------------------------------------------

#: ``key_spans`` presets of :class:`lit_ft.data.SFTDataModule` -> what they mark
KEY_SPAN_PRESETS: dict[str, str] = {
    "tool_call": "in every JSON tool call {\"name\": ..., \"arguments\": {...}} of the completion: the function "
    "name (the string value of the top-level \"name\") and every key inside \"arguments\" (nested ones too)",
    "tool_name": "the function name of every JSON tool call {\"name\": ..., \"arguments\": ...} of the completion",
    "tl_training": "TL-Training's PKT marks in every JSON tool call of the completion: key tokens = the first token "
    "of the function name and the tokens where it parts from another tool name of the row; parameter boundaries "
    "(the last token of every argument value) in a second mask, `key_boundary_mask`",
}

_JSON_OBJECT_START = re.compile(r'\{\s*"')


def _call_spans(text: str, start: int, end: int, arg_keys: bool) -> list[tuple[int, int]]:
    """Spans of the name value (and argument keys) of the valid JSON object ``text[start:end]``."""
    spans: list[tuple[int, int]] = []
    # frames: [container char, expecting a key, last key, inside "arguments"]
    stack: list[list[Any]] = []
    j = start
    while j < end:
        c = text[j]
        if c == '"':
            k = j + 1
            while text[k] != '"':
                k += 2 if text[k] == "\\" else 1
            top = stack[-1]
            if top[0] == "{" and top[1]:
                top[1], top[2] = False, json.loads(text[j : k + 1])
                if top[3] and arg_keys and k > j + 1:
                    spans.append((j + 1, k))
            elif len(stack) == 1 and top[2] == "name" and k > j + 1:
                spans.append((j + 1, k))
            j = k + 1
            continue
        if c in "{[":
            parent = stack[-1] if stack else None
            in_args = parent is not None and (parent[3] or (len(stack) == 1 and parent[2] == "arguments"))
            stack.append([c, c == "{", None, in_args])
        elif c in "}]":
            stack.pop()
        elif c == "," and stack[-1][0] == "{":
            stack[-1][1] = True
        j += 1
    return spans


def tool_call_spans(text: str, arg_keys: bool = True) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the tool name (and, with ``arg_keys``, of every argument key) of each
    JSON tool call ``{"name": str, "arguments": ...}`` found in ``text`` (alone or embedded in other text, e.g.
    ``<tool_call>{...}</tool_call>``). Spans cover the string contents, not the quotes. Argument keys are marked
    when ``"arguments"`` is a JSON object (not a JSON-encoded string)."""
    spans: list[tuple[int, int]] = []
    decoder = json.JSONDecoder()
    pos = 0
    for m in _JSON_OBJECT_START.finditer(text):
        i = m.start()
        if i < pos:
            continue
        try:
            obj, end = decoder.raw_decode(text, i)
        except ValueError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str) and "arguments" in obj:
            spans += _call_spans(text, i, end, arg_keys)
            pos = end
    return spans


def pattern_spans(text: str, patterns: Sequence[re.Pattern]) -> list[tuple[int, int]]:
    """Spans of every match of each pattern in ``text``: its group 1 when the pattern has a group that took part
    in the match, else the whole match. Empty matches are skipped."""
    spans = []
    for p in patterns:
        for m in p.finditer(text):
            a, b = m.span(1) if p.groups >= 1 and m.start(1) >= 0 else m.span(0)
            if b > a:
                spans.append((a, b))
    return spans


def key_spans_in(text: str, preset: str | None, patterns: Sequence[re.Pattern]) -> list[tuple[int, int]]:
    """Key character spans of a completion text for a ``key_spans`` preset and ``key_span_patterns``."""
    spans = pattern_spans(text, patterns) if patterns else []
    if preset is not None:
        if preset not in KEY_SPAN_PRESETS:
            raise ValueError(f"key_spans must be one of {sorted(KEY_SPAN_PRESETS)} or None, got {preset!r}")
        if preset == "tl_training":  # the key class only, without candidates (SFTDataModule passes them)
            from lit_ft.data.pkt_spans import pkt_spans

            spans += pkt_spans(text)[0]
        else:
            spans += tool_call_spans(text, arg_keys=preset == "tool_call")
    return spans


def tokens_in_spans(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[bool]:
    """For each token (character offsets ``(s, e)`` from a fast tokenizer's ``return_offsets_mapping``): whether
    it overlaps a span ``[a, b)``, i.e. holds at least one character of a key span. Tokens with empty offsets
    (special tokens) are never key tokens."""
    if not spans:
        return [False] * len(offsets)
    n = max(max(b for _, b in spans), max((e for _, e in offsets), default=0))
    marks = bytearray(n)
    for a, b in spans:
        marks[max(a, 0) : b] = b"\x01" * (b - max(a, 0))
    covered = [0] * (n + 1)  # prefix sums of "character is in a span"
    for c in range(n):
        covered[c + 1] = covered[c] + marks[c]
    return [e > s and covered[e] - covered[s] > 0 for s, e in offsets]
