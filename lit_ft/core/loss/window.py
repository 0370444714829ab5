"""Counting an accumulation window's normalisers before its first forward (HF Trainer's ``num_items_in_batch``).

Every loss term divides its sum by a count over the *whole* accumulation window and all ranks, so that
``accumulate_grad_batches=4`` × batch 2 trains exactly like batch 8, and 2 ranks × batch 4 like one process with
batch 8. The count must be known when the window's first micro-batch runs its backward — dividing the gradients
afterwards would also divide every term the user adds to the loss themselves. So at the window's first micro-batch
the engine looks ahead at the window's remaining micro-batches (it takes them from Lightning's batch iterator and
puts them back in front of it: nothing is skipped, re-ordered or loaded twice), counts each term's units on the raw
batches, and all-reduces the totals once.

The look-ahead reads Lightning's training data fetcher (``trainer.fit_loop._data_fetcher``): a private attribute,
used here in one place. With ``accumulate_grad_batches=1`` nothing is looked ahead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch


class _Lookahead:
    """An iterator that can be peeked: ``peek(n)`` pulls up to ``n`` items into a buffer that ``__next__`` serves
    first."""

    def __init__(self, inner: Iterator[Any]) -> None:
        self.inner = inner
        self.buffer: deque[Any] = deque()
        self.exhausted = False

    def __iter__(self) -> _Lookahead:
        return self

    def __next__(self) -> Any:
        if self.buffer:
            return self.buffer.popleft()
        return next(self.inner)

    def peek(self, n: int) -> list[Any]:
        while len(self.buffer) < n and not self.exhausted:
            try:
                self.buffer.append(next(self.inner))
            except StopIteration:
                self.exhausted = True
        return list(self.buffer)[:n]

    def __getattr__(self, name: str) -> Any:  # Lightning may read attributes of its own iterator
        return getattr(self.inner, name)


def _batch_of(item: Any) -> Any:
    """Lightning's combined-loader iterator yields ``(batch, batch_idx, dataloader_idx)``."""
    return item[0] if isinstance(item, tuple) and len(item) == 3 else item


def upcoming_batches(trainer: Any, n: int) -> list[Any]:
    """The next ``n`` training batches (raw, as the DataLoader made them) without consuming them, fewer at the end of
    the epoch."""
    if n <= 0:
        return []
    fetcher = getattr(getattr(trainer, "fit_loop", None), "_data_fetcher", None)
    if fetcher is None or not hasattr(fetcher, "iterator") or fetcher.iterator is None:
        raise RuntimeError(
            "lit_ft: counting the loss normaliser of an accumulation window needs Lightning's training data fetcher "
            "(accumulate_grad_batches > 1); this training loop has none (a `dataloader_iter` training_step?). Use "
            "accumulate_grad_batches=1 with a larger batch instead."
        )
    items = list(getattr(fetcher, "batches", []) or [])[:n]  # a prefetching fetcher already holds some
    if len(items) < n:
        if not isinstance(fetcher.iterator, _Lookahead):
            fetcher.iterator = _Lookahead(fetcher.iterator)
        items += fetcher.iterator.peek(n - len(items))
    return [_batch_of(it) for it in items]


class WindowCounter:
    """The per-term normaliser totals of the current accumulation window (all ranks).

    ``begin(trainer, pl_module, batch, batch_idx, count_fn)`` is called at every training micro-batch's start (any
    number of times: only the first call per micro-batch works); at a window's first micro-batch it counts the
    window with ``count_fn(batch) -> {term: count}`` and all-reduces. ``end()`` closes the window (optimizer step).
    """

    def __init__(self) -> None:
        self.totals: dict[str, torch.Tensor] | None = None
        #: whether the window counted last ends its epoch (its last micro-batch is the epoch's last one, as far as
        #: the epoch's length or the look-ahead tells; ``False`` when that is unknown)
        self.reaches_epoch_end = False
        self._seen: tuple[int, int] | None = None

    def begin(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int,
              count_fn: Callable[[Mapping[str, Any]], dict[str, torch.Tensor]]) -> bool:
        """Count the window at its first micro-batch; returns whether this call counted a new window."""
        key = (int(getattr(trainer, "global_step", 0)), int(batch_idx))
        if self._seen == key:
            return False
        self._seen = key
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        if self.totals is not None and batch_idx % accumulate != 0:
            return False  # inside an open window
        more = accumulate - 1
        limit = getattr(trainer, "num_training_batches", float("inf"))
        finite = isinstance(limit, (int, float)) and limit != float("inf")
        if finite:
            more = min(more, max(int(limit) - batch_idx - 1, 0))
        window = [batch, *upcoming_batches(trainer, more)]
        # the epoch ends with this window: its length says so, or the look-ahead ran out of batches
        self.reaches_epoch_end = (finite and batch_idx + len(window) >= int(limit)) or len(window) < more + 1
        totals: dict[str, torch.Tensor] = {}
        for b in window:
            for name, value in count_fn(b).items():
                v = torch.as_tensor(value, dtype=torch.float32).reshape(())
                totals[name] = totals.get(name, torch.zeros((), dtype=torch.float32)) + v.cpu()
        names = sorted(totals)
        world = int(getattr(trainer, "world_size", 1) or 1)
        if world > 1 and names:
            device = getattr(pl_module, "device", torch.device("cpu"))
            stacked = torch.stack([totals[k] for k in names]).to(device)
            stacked = trainer.strategy.reduce(stacked, reduce_op="sum")
            totals = {k: stacked[i] for i, k in enumerate(names)}
        self.totals = totals
        return True

    def end(self) -> None:
        self.totals = None

    @property
    def active(self) -> bool:
        return self.totals is not None
