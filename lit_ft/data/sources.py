"""Where a DataModule's rows come from: a path or asset name, a Hugging Face ``datasets.Dataset`` / ``DatasetDict``
held in Python, or a ``datasets.load_dataset`` spec (a dict, e.g. ``{"path": "parquet", "data_files": ...}``).

Every source ends as a list of row dicts, the form the DataModules encode. ``datasets`` is an optional extra
(``pip install 'lit-ft[datasets]'``): JSON/JSONL files are read without it; Parquet files, Dataset objects and specs
need it. Nothing here imports ``datasets`` until such a source is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Union

#: what ``data`` / ``val_data`` accept (the ``Any`` stands for a ``datasets.Dataset`` / ``DatasetDict``, which the
#: type hint cannot name without importing the optional library)
DataSource = Union[str, dict[str, Any], Any]

#: file suffixes read through ``datasets`` (the rest are JSON/JSONL, read natively)
DATASETS_SUFFIXES = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".arrow": "arrow"}

#: DatasetDict splits taken as validation data, in order of preference
VAL_SPLITS = ("validation", "valid", "val", "test")

EXTRA_HINT = "install the optional extra: pip install 'lit-ft[datasets]' (or pip install datasets)"


def import_datasets(arg_name: str, what: str) -> Any:
    """The ``datasets`` module, or an ImportError that names the argument, what needed it and the extra."""
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{arg_name}: {what} needs the Hugging Face `datasets` library; {EXTRA_HINT}") from None
    return datasets


def _is_instance_of(value: Any, class_name: str) -> bool:
    """Whether ``value`` is a ``datasets.<class_name>`` (checked by name so that plain paths never import datasets)."""
    return any(c.__name__ == class_name and c.__module__.startswith("datasets") for c in type(value).__mro__)


def is_dataset(value: Any) -> bool:
    """A ``datasets.Dataset`` (rows in Python)."""
    return _is_instance_of(value, "Dataset")


def is_dataset_dict(value: Any) -> bool:
    """A ``datasets.DatasetDict`` (named splits)."""
    return _is_instance_of(value, "DatasetDict")


def is_path_like(value: Any) -> bool:
    return isinstance(value, (str, os.PathLike)) and bool(str(value))


def check_source(name: str, value: Any, optional: bool = False) -> None:
    """Refuse a ``data``/``val_data`` value that is none of the accepted sources (named in the message)."""
    if value is None and optional:
        return
    if is_path_like(value) or is_dataset(value) or is_dataset_dict(value):
        return
    if isinstance(value, (str, os.PathLike)):  # an empty path
        raise ValueError(f"{name} must be a non-empty path or asset name{' or None' if optional else ''}, got {value!r}")
    if isinstance(value, Mapping):
        if not isinstance(value.get("path"), str) or not value["path"]:
            raise ValueError(
                f"{name}: a dict is a datasets.load_dataset spec and needs a non-empty 'path' (e.g. "
                f"{{'path': 'parquet', 'data_files': 'train.parquet'}}), got keys {sorted(map(str, value))}"
            )
        return
    raise ValueError(
        f"{name} must be a .jsonl/.json/.parquet path, an asset name, a datasets.Dataset / DatasetDict or a "
        f"datasets.load_dataset spec dict{' or None' if optional else ''}, got {type(value).__name__} {value!r:.200}"
    )


def describe(value: Any) -> str:
    """A short text for messages and logs: the path, or the object's kind and size."""
    if is_path_like(value):
        return str(value)
    if is_dataset_dict(value):
        return f"DatasetDict({ {k: len(v) for k, v in value.items()} })"
    if is_dataset(value):
        return f"Dataset({len(value)} rows, columns {value.column_names})"
    return repr(value)


def dataset_rows(ds: Any, arg_name: str) -> list[dict]:
    """Rows of a ``datasets.Dataset`` as dicts. A null cell counts as a missing key (a Parquet/Arrow table has every
    column in every row, so rows of mixed forms — prompt/completion next to chat messages — hold nulls)."""
    if len(ds) == 0:
        raise ValueError(f"{arg_name}={describe(ds)} holds no rows")
    return [{k: v for k, v in row.items() if v is not None} for row in ds.to_list()]


def pick_split(dd: Any, names: tuple[str, ...], arg_name: str) -> Any | None:
    """The first split of ``names`` that the DatasetDict has, or None."""
    for n in names:
        if n in dd:
            return dd[n]
    return None


def train_split(dd: Any, arg_name: str) -> Any:
    """The "train" split of a DatasetDict, else its only split; an error naming the splits otherwise."""
    if "train" in dd:
        return dd["train"]
    if len(dd) == 1:
        return next(iter(dd.values()))
    raise ValueError(f"{arg_name}: the DatasetDict has no 'train' split (splits: {sorted(dd)}); pass "
                     f"{arg_name}=dataset_dict['<split>']")


def load_spec(spec: Mapping[str, Any], arg_name: str) -> Any:
    """``datasets.load_dataset(**spec)`` (a Dataset or DatasetDict), with the argument named on failure."""
    datasets = import_datasets(arg_name, "a datasets.load_dataset spec")
    try:
        return datasets.load_dataset(**dict(spec))
    except (FileNotFoundError, ValueError, TypeError) as e:
        raise ValueError(f"{arg_name}={dict(spec)!r}: datasets.load_dataset failed: {e}") from None


def read_file_with_datasets(path: str, arg_name: str) -> list[dict]:
    """Rows of a Parquet / CSV / Arrow file through ``datasets`` (an error naming the extra when it is missing)."""
    suffix = Path(path).suffix.lower()
    builder = DATASETS_SUFFIXES[suffix]
    datasets = import_datasets(f"{arg_name}={path!r}", f"reading a {suffix} file")
    ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    return dataset_rows(ds, arg_name)
