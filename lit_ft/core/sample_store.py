"""Per-sample ragged tensors on disk, keyed by ``sample_idx`` and checked against a digest of each sample's tokens.

Techniques that score a training set once and read the scores back while training (Rho-1's reference NLLs for
``ExcessLossSelection``, cDPO's critical-token weights for ``CriticalTokenScoring``) keep one variable-length 1-D
tensor per sample. This module is the part they share: the file, the row lookup and the digest.

File layout (``torch.save`` of a plain dict, read with ``weights_only=True``: tensors, strings and ints only)::

    format       the layout's name, e.g. "lit_ft.reference_nll"      version  int
    sample_idx   long [N], strictly increasing (the row's index in its split, put in every batch by the DataModules)
    digest       long [N]   a hash of each sample's tokens (:func:`digest_tokens`): a batch row whose tokens differ
                 from the ones scored (other data, tokenizer, max_length, a callback that edited the batch) is
                 refused, never silently given another sample's values
    <offsets>    long [N+1] per ragged column: sample i's values are <values>[offsets[i]:offsets[i+1]]; an empty
                 offsets tensor ([0]) marks a column the file does not hold
    <values>     1-D, the rows of all samples, concatenated in sample_idx order
    <field>      str, per extra field of the layout (e.g. a fingerprint of what made the values)
    meta         dict of str: how the file was made

The entry names of the ragged columns and fields are the caller's (:class:`StoreLayout`), so the files written before
this module existed load unchanged. Every error names the technique, the argument that named the file, the file and
what to do (:class:`StoreText`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["PerSampleStore", "Ragged", "SampleMismatch", "SampleNotStored", "StoreFormatError", "StoreLayout",
           "StoreText", "digest_tokens"]


class StoreFormatError(ValueError):
    """The file is not a store of the expected layout, has an unreadable version, or its entries disagree."""


class SampleNotStored(KeyError):
    """A batch row's ``sample_idx`` is not in the store."""

    def __str__(self) -> str:  # KeyError quotes its argument; the message is a sentence
        return str(self.args[0]) if self.args else ""


class SampleMismatch(ValueError):
    """A batch row's tokens differ from the ones the store was made from (the digests differ)."""


def digest_tokens(*parts: torch.Tensor | Iterable[int], separator: bytes = b"") -> int:
    """A signed 64-bit hash of integer sequences (blake2b over their int64 bytes, each followed by ``separator``):
    the same on every process, machine and torch version, so it can be stored and compared later.

    ``digest_tokens(ids)`` hashes one sample's token ids; ``digest_tokens(ids, labels, ..., separator=b"|")`` hashes
    several sequences so that moving a value from one to the next changes the hash."""
    h = hashlib.blake2b(digest_size=8)
    for part in parts:
        t = part.detach().cpu() if isinstance(part, torch.Tensor) else torch.tensor(list(part), dtype=torch.int64)
        h.update(t.to(torch.int64).contiguous().numpy().tobytes())
        h.update(separator)
    return int.from_bytes(h.digest(), "little", signed=True)


@dataclass
class Ragged:
    """One ragged column: sample ``i``'s values are ``values[offsets[i]:offsets[i + 1]]``; empty offsets = absent."""

    offsets: torch.Tensor
    values: torch.Tensor

    @classmethod
    def from_rows(cls, rows: Sequence[torch.Tensor], dtype: torch.dtype = torch.float32) -> Ragged:
        """The column of ``rows`` (1-D tensors, one per sample, in the store's order)."""
        offsets = torch.zeros(len(rows) + 1, dtype=torch.long)
        if rows:
            offsets[1:] = torch.cumsum(torch.tensor([int(r.numel()) for r in rows], dtype=torch.long), 0)
        values = torch.cat([r.detach().reshape(-1).to(dtype) for r in rows]) if rows else torch.zeros(0, dtype=dtype)
        return cls(offsets, values)

    @classmethod
    def absent(cls, dtype: torch.dtype = torch.float32) -> Ragged:
        """A column the store does not hold (e.g. scores a run chose not to make)."""
        return cls(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=dtype))

    @property
    def present(self) -> bool:
        return int(self.offsets.numel()) > 0

    def row(self, i: int) -> torch.Tensor:
        """Sample ``i``'s values (a view)."""
        return self.values[int(self.offsets[i]):int(self.offsets[i + 1])]

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1]) - int(self.offsets[i])


@dataclass(frozen=True)
class StoreLayout:
    """What one kind of store file holds.

    Args:
        format: the ``format`` string written and required, e.g. ``"lit_ft.reference_nll"``.
        version: the version written.
        ragged: per ragged column, ``{values entry: offsets entry}`` (e.g. ``{"nll": "offsets"}``).
        fields: the names of extra ``str`` entries (e.g. a fingerprint of what made the values).
        reads: older versions this code still reads (the current one is always read).
    """

    format: str
    version: int
    ragged: Mapping[str, str]
    fields: tuple[str, ...] = ()
    reads: tuple[int, ...] = ()

    @property
    def readable(self) -> tuple[int, ...]:
        return (self.version, *self.reads)


@dataclass(frozen=True)
class StoreText:
    """The words of the errors a store raises, so that the user reads the technique's own terms.

    Args:
        who: the start of every message (the technique, e.g. ``"CriticalTokenScoring"``).
        argument: the argument that named the file (``"cache_path"``): messages say ``cache_path='w.pt'``.
        kind: what the file is, in "is not a lit-ft <kind>" and "is not in the <kind>".
        digest_of: what the digest covers, in "has other <digest_of> here than in the <kind>".
        remedy: what to do with a wrong or stale file (e.g. how to make a new one).
        mismatch: further advice when a batch row differs from the file (e.g. callbacks that edit the batch).
        make: what to do when the file does not exist (default: ``remedy``).
    """

    who: str = "PerSampleStore"
    argument: str = "path"
    kind: str = "per-sample store"
    digest_of: str = "token ids"
    remedy: str = "delete the file and make it again"
    mismatch: str = ""
    make: str = ""


@dataclass
class PerSampleStore:
    """Ragged per-sample columns keyed by ``sample_idx`` (see the module docstring for the file).

    Build one with :meth:`build` (any sample order) or load one with :meth:`load`; :meth:`rows` maps a batch's
    ``sample_idx`` (any order) to rows, checking the digests, and :meth:`values` gives a row of a column.
    """

    layout: StoreLayout
    sample_idx: torch.Tensor
    digest: torch.Tensor
    columns: dict[str, Ragged]
    fields: dict[str, str] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    text: StoreText = field(default_factory=StoreText)
    path: str | None = None
    version: int | None = None

    def __post_init__(self) -> None:
        if self.version is None:
            self.version = self.layout.version
        self._check()
        self._row: dict[int, int] = {int(s): i for i, s in enumerate(self.sample_idx.tolist())}

    @classmethod
    def build(cls, layout: StoreLayout, sample_idx: Sequence[int], digests: Sequence[int],
              columns: Mapping[str, Sequence[torch.Tensor] | None], *, fields: Mapping[str, Any] | None = None,
              meta: Mapping[str, Any] | None = None, text: StoreText | None = None,
              dtype: torch.dtype = torch.float32) -> PerSampleStore:
        """The store of samples ``sample_idx`` (any order, each once) with their ``digests`` and, per column of
        ``layout``, one 1-D tensor per sample in the same order (``None`` = the column is absent)."""
        text = text or StoreText()
        keys = [int(s) for s in sample_idx]
        if len(set(keys)) != len(keys):
            dup = sorted({s for s in keys if keys.count(s) > 1})[:5]
            raise ValueError(f"{text.who}: sample_idx {dup} occur more than once; sample_idx must identify a sample")
        if len(digests) != len(keys):
            raise ValueError(f"{text.who}: {len(digests)} digests for {len(keys)} samples")
        unknown = sorted(set(columns) - set(layout.ragged))
        if unknown:
            raise ValueError(f"{text.who}: columns {unknown} are not in the {layout.format!r} layout "
                             f"(columns {sorted(layout.ragged)})")
        order = sorted(range(len(keys)), key=keys.__getitem__)
        built = {}
        for name in layout.ragged:
            rows = columns.get(name)
            if rows is None:
                built[name] = Ragged.absent(dtype)
                continue
            if len(rows) != len(keys):
                raise ValueError(f"{text.who}: column {name!r} has {len(rows)} rows for {len(keys)} samples")
            built[name] = Ragged.from_rows([rows[i] for i in order], dtype)
        return cls(layout, torch.tensor([keys[i] for i in order], dtype=torch.long),
                   torch.tensor([int(digests[i]) for i in order], dtype=torch.long), built,
                   {k: str(v) for k, v in (fields or {}).items()}, {k: str(v) for k, v in (meta or {}).items()}, text)

    def __len__(self) -> int:
        return len(self._row)

    # -- file ----------------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the store to ``path`` (parent folders created) under the layout's current version: written to a
        temporary file in the same folder, then renamed, so ``path`` never holds a half-written store (a failed
        write leaves the previous file, if any, and no temporary file). Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        raw: dict[str, Any] = {"format": self.layout.format, "version": self.layout.version,
                               "sample_idx": self.sample_idx, "digest": self.digest}
        for values_key, offsets_key in self.layout.ragged.items():
            raw[offsets_key] = self.columns[values_key].offsets
            raw[values_key] = self.columns[values_key].values
        raw.update({k: self.fields[k] for k in self.layout.fields})
        raw["meta"] = dict(self.meta)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(raw, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.path = str(path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, layout: StoreLayout, text: StoreText | None = None) -> PerSampleStore:
        """Read a store of ``layout`` from ``path``: a missing file is a ``FileNotFoundError``; another format, an
        unreadable version, a missing entry or entries that disagree are a :class:`StoreFormatError`; each names
        the file and what to do."""
        text = text or StoreText()
        shown = os.fspath(path)
        p = Path(os.path.expanduser(shown))
        named = f"{text.who}: {text.argument}={shown!r}"
        if not p.is_file():
            raise FileNotFoundError(f"{named} is not a file; {text.make or text.remedy}")
        try:
            raw = torch.load(p, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError) as e:
            raise StoreFormatError(f"{named} cannot be read as a lit-ft {text.kind} (format {layout.format!r}): "
                                   f"{type(e).__name__}: {str(e).splitlines()[0].rstrip('.') if str(e) else ''}; "
                                   f"{text.remedy}") from e
        found = raw.get("format") if isinstance(raw, dict) else None
        if found != layout.format:
            raise StoreFormatError(f"{named} is not a lit-ft {text.kind} (format {layout.format!r}, found "
                                   f"{found!r}); {text.remedy}")
        version = raw.get("version")
        if version not in layout.readable:
            readable = " or ".join(str(v) for v in layout.readable)
            raise StoreFormatError(f"{named} has format version {version!r}; this lit-ft reads version {readable} "
                                   f"of {layout.format!r}: {text.remedy}")
        needed = ["sample_idx", "digest", *layout.ragged, *layout.ragged.values(), *layout.fields, "meta"]
        missing = [k for k in needed if k not in raw]
        if missing:
            raise StoreFormatError(f"{named} lacks the entries {missing} of {layout.format!r} version {version}; the "
                                   f"file is damaged or was written by another program: {text.remedy}")
        columns = {v: Ragged(raw[o], raw[v]) for v, o in layout.ragged.items()}
        return cls(layout, raw["sample_idx"], raw["digest"], columns, {k: raw[k] for k in layout.fields},
                   dict(raw["meta"]), text, str(p), version)

    def _check(self) -> None:
        """The entries agree: sorted unique sample_idx, one digest each, offsets that cut each column's values."""
        where = f"{self.text.who}: the {self.text.kind}" + (f" {self.path!r}" if self.path else "")
        problems = []
        sidx, n = self.sample_idx, int(self.sample_idx.numel())
        if sidx.dim() != 1 or sidx.dtype != torch.long:
            problems.append(f"sample_idx is {sidx.dtype} {tuple(sidx.shape)}, not long [N]")
        elif n > 1 and not bool((sidx[1:] > sidx[:-1]).all()):
            problems.append("sample_idx is not strictly increasing")
        if tuple(self.digest.shape) != (n,):
            problems.append(f"digest has shape {tuple(self.digest.shape)}, not [{n}]")
        for name, col in self.columns.items():
            off = col.offsets
            if not col.present:
                continue
            if tuple(off.shape) != (n + 1,) or col.values.dim() != 1:
                problems.append(f"column {name!r} has offsets {tuple(off.shape)} and values "
                                f"{tuple(col.values.shape)}, not [{n + 1}] and 1-D")
            elif int(off[0]) != 0 or int(off[-1]) != int(col.values.numel()) or bool((off[1:] < off[:-1]).any()):
                problems.append(f"column {name!r}'s offsets do not cut its {col.values.numel()} values "
                                f"(from {int(off[0])} to {int(off[-1])}, non-decreasing)")
        if problems:
            raise StoreFormatError(f"{where} is inconsistent: {'; '.join(problems)}; {self.text.remedy}")

    # -- use -----------------------------------------------------------------------------------------------------
    def rows(self, sample_idx: Sequence[int], digests: Sequence[int] | None = None, *,
             context: str = "") -> list[int]:
        """The store's rows of a batch's ``sample_idx`` (any order, repeats allowed). With ``digests`` (one per
        sample, :func:`digest_tokens` of the batch row), a row whose digest differs raises :class:`SampleMismatch`;
        a sample not stored raises :class:`SampleNotStored`. ``context`` (e.g. what the file was made with) is
        added to both messages."""
        out = []
        for s in sample_idx:
            row = self._row.get(int(s))
            if row is None:
                where = f" ({self.path})" if self.path else ""
                held = (f"{len(self)} samples (sample_idx {int(self.sample_idx.min())}..{int(self.sample_idx.max())})"
                        if len(self) else "no sample")
                raise SampleNotStored(f"{self.text.who}: sample_idx {int(s)} is not in the {self.text.kind}{where}, "
                                      f"which holds {held}{context}; it was made for other data: {self.text.remedy}")
            out.append(row)
        if digests is not None:
            self.check_digests(sample_idx, out, digests, context=context)
        return out

    def check_digests(self, sample_idx: Sequence[int], rows: Sequence[int], digests: Sequence[int], *,
                      context: str = "") -> None:
        """Raise :class:`SampleMismatch` at the first sample whose ``digest`` differs from its row's."""
        for s, row, d in zip(sample_idx, rows, digests, strict=True):
            if int(self.digest[row]) != int(d):
                where = f" ({self.path})" if self.path else ""
                advice = f" ({self.text.mismatch})" if self.text.mismatch else ""
                raise SampleMismatch(f"{self.text.who}: sample_idx {int(s)} has other {self.text.digest_of} here "
                                     f"than in the {self.text.kind}{where}{context}; {self.text.remedy}{advice}")

    def values(self, column: str, row: int) -> torch.Tensor:
        """Row ``row``'s values of ``column`` (a view)."""
        col = self.columns[column]
        if not col.present:
            raise KeyError(f"{self.text.who}: the {self.text.kind} holds no {column!r} column")
        return col.row(row)
