"""How the compatibility matrix cuts a contract case's data (``tests/contract/cases.py``: its ``datamodule``) into the
batches a cell trains on: the two micro-batches of the distributed columns, their one global batch, and the row
halves of the accumulation and resume settings. :func:`plan_for` picks the plan from the case's DataModule:

- :class:`BatchPlan` (any DataModule): its first two training batches, fixed when the cell is built; the global
  batch is their rows concatenated (every batch of such a case has the same width: random SFT batches, preference
  pairs) and a half is a cut of the rows. Rows are counted on ``input_ids`` or, for a batch of several sequences per
  row (``chosen_input_ids`` / ``rejected_input_ids``), on every ``*input_ids`` key;
- :class:`RowPlan` (a lit-ft text DataModule whose training loader is ``_TextDataModule``'s own, so its training
  rows are ``_examples("train")``: ``SFTDataModule``, ``ClassificationDataModule``, ``FewShotDataModule``): a batch
  is a range of its training rows, in order, collated by the DataModule itself when the Trainer asks for the loader.
  That is after the callbacks' ``setup``, so a technique that changes the rows at setup (``OTDataSelection`` keeps
  its selection) trains on the rows it chose, and a global batch of rows of different lengths is padded as the
  DataModule pads it (concatenating two batches padded apart cannot be done).

A plan's batch specs are what ``SingleJob.batches`` / ``worker.Job.micro`` hold (a dict for ``BatchPlan``, a
:class:`Rows` range for ``RowPlan``); :meth:`BatchPlan.materialize` turns one into the dict a step trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

N_BATCHES = 2  # the cells train on the case's first two batches (one per rank in the distributed columns)


def batch_rows(batch: dict) -> int:
    """The row count of ``batch``: the leading size of ``input_ids``, or of every ``<side>_input_ids`` (a
    preference pair's ``chosen_`` / ``rejected_`` sequences), which must agree."""
    import torch

    keys = sorted(k for k, v in batch.items() if k.endswith("input_ids") and isinstance(v, torch.Tensor))
    if not keys:
        raise KeyError(f"the case's batch has no `input_ids` (nor `<side>_input_ids`) to count its rows by; its "
                       f"keys: {sorted(batch)}")
    sizes = {k: int(batch[k].shape[0]) for k in keys}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the case's batch has sequences with different row counts: {sizes}")
    return sizes[keys[0]]


def split_rows(batch: dict) -> list[dict]:
    """``batch`` cut into its first and second half of rows (every tensor with the batch's row count is cut; an odd
    count gives the second half one row more)."""
    import torch

    n = batch_rows(batch)
    h = n // 2
    if h < 1:
        raise ValueError(f"the case's batches have {n} row(s); splitting them in halves needs >= 2")
    cut = lambda v, s: v[s] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v  # noqa: E731
    return [{k: cut(v, slice(0, h)) for k, v in batch.items()}, {k: cut(v, slice(h, n)) for k, v in batch.items()}]


def concat_rows(batches: list[dict]) -> dict:
    """One batch of the rows of ``batches`` (same keys, same width), in order."""
    import torch

    out = {}
    for k in batches[0]:
        parts = [b[k] for b in batches]
        shapes = [tuple(p.shape[1:]) if isinstance(p, torch.Tensor) else None for p in parts]
        if any(s is None for s in shapes) or len(set(shapes)) != 1:
            raise ValueError(f"the case's batches cannot be concatenated into one global batch: `{k}` has shapes "
                             f"{[tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__ for p in parts]}"
                             " (a DataModule that pads each batch apart needs RowPlan: see tests/matrix/case_data.py)")
        out[k] = torch.cat(parts)
    return out


class BatchPlan:
    """The case DataModule's first two training batches, fixed when the cell is built."""

    def __init__(self, case: Any) -> None:
        self.case = case

    def batches(self) -> list:
        """The first :data:`N_BATCHES` training batches (specs)."""
        got = list(self.case.datamodule().train_dataloader())[:N_BATCHES]
        if len(got) < N_BATCHES:
            raise ValueError(f"the case's datamodule gives {len(got)} batch(es); the matrix needs {N_BATCHES}")
        return got

    def halves(self, spec: Any) -> list:
        """``spec``'s first and second half of rows."""
        return split_rows(spec)

    def merge(self, specs: list) -> Any:
        """The one global batch of ``specs``' rows, in order."""
        return concat_rows(specs)

    def materialize(self, dm: Any, spec: Any) -> dict:
        """The batch ``spec`` stands for, on ``dm`` (the DataModule the Trainer runs with)."""
        return spec

    def template(self, spec: Any) -> dict:
        """``spec`` as a batch before any technique ran (the fuzz setting reshapes it)."""
        return spec


@dataclass(frozen=True)
class Rows:
    """Training rows ``start:stop`` of a DataModule, collated by it."""

    start: int
    stop: int


class RowPlan(BatchPlan):
    """Ranges of the training rows of a lit-ft text DataModule, collated by it when the loader is asked for."""

    def __init__(self, case: Any, built: Any = None) -> None:
        super().__init__(case)
        self.built = built if built is not None else case.datamodule()
        self.built.setup("fit")
        self.batch_size = int(self.built.batch_size)

    def batches(self) -> list:
        n = len(self.built._examples("train"))
        need = N_BATCHES * self.batch_size
        if n < need:
            raise ValueError(f"the case's datamodule has {n} training row(s); the matrix needs {need} "
                             f"({N_BATCHES} batches of {self.batch_size})")
        return [Rows(i * self.batch_size, (i + 1) * self.batch_size) for i in range(N_BATCHES)]

    def halves(self, spec: Rows) -> list:
        h = (spec.stop - spec.start) // 2
        if h < 1:
            raise ValueError(f"the case's batches have {spec.stop - spec.start} row(s); halves need >= 2")
        return [Rows(spec.start, spec.start + h), Rows(spec.start + h, spec.stop)]

    def merge(self, specs: list) -> Rows:
        for a, b in zip(specs, specs[1:]):
            if a.stop != b.start:
                raise ValueError(f"row ranges {a} and {b} are not adjacent: they make no one global batch")
        return Rows(specs[0].start, specs[-1].stop)

    def materialize(self, dm: Any, spec: Any) -> dict:
        if not isinstance(spec, Rows):  # a batch made by the cell itself (the fuzz setting's shaped batches)
            return spec
        rows = dm._examples("train")
        if spec.stop > len(rows):
            raise ValueError(f"the DataModule serves {len(rows)} training row(s) at training time (after the "
                             f"technique's setup); the cell trains on rows {spec.start}-{spec.stop - 1}")
        return dm._train_collate()(rows[spec.start:spec.stop])

    def template(self, spec: Rows) -> dict:
        return self.materialize(self.built, spec)


def plan_for(case: Any) -> BatchPlan:
    """:class:`RowPlan` when the case's DataModule serves its ``_examples("train")`` through ``_TextDataModule``'s
    own loader (its rows can be re-collated, and a technique may change them at setup), else :class:`BatchPlan`."""
    from lit_ft.data._base import _TextDataModule

    dm = case.datamodule()
    own_loader = isinstance(dm, _TextDataModule) and \
        type(dm).train_dataloader is _TextDataModule.train_dataloader
    return RowPlan(case, dm) if own_loader else BatchPlan(case)
