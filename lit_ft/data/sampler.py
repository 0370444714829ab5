"""A seeded, resumable sampler that groups similar lengths into batches (length bucketing)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import BatchSampler, Sampler


class LengthGroupedSampler(Sampler[int]):
    """Yields every index once per epoch so that each run of ``batch_size`` consecutive indices is one batch.

    Per epoch (generator seeded with ``seed + epoch``): randomly permute the indices, cut the permutation into
    mega-chunks of ``mega_batch_mult`` batches, sort each chunk by length (longest first), cut it into batches and
    shuffle the order of all batches. The single partial batch (when ``len % batch_size != 0``) is placed last so
    that ``BatchSampler(sampler, batch_size, drop_last=False)`` reproduces exactly these batches.
    ``group_by_length=False`` gives a plain seeded shuffle; ``shuffle=False`` sequential order.

    ``num_replicas`` > 1 (DDP): the unit that is sorted and shuffled is a global batch of ``batch_size *
    num_replicas`` indices, so that the interleaving ``DistributedSampler(shuffle=False)`` wrapper that Lightning
    injects (rank r takes positions r, r + W, ...) still gives each rank a length-homogeneous batch.

    Epoch: ``set_epoch`` (Lightning calls it each epoch); without it the epoch advances by one at each new iteration.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        group_by_length: bool = True,
        mega_batch_mult: int = 50,
        num_replicas: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
        self.lengths = [int(x) for x in lengths]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = shuffle
        self.group_by_length = group_by_length
        self.mega_batch_mult = max(1, int(mega_batch_mult))
        self.num_replicas = int(num_replicas)
        self.epoch = 0
        self._epoch_set = False
        self._iterated = False

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_set = True

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The ordered list of (global) batches of ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        unit = self.batch_size * self.num_replicas
        if not self.shuffle:
            order = list(range(n))
            return [order[i : i + unit] for i in range(0, n, unit)]
        g = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(n, generator=g).tolist()
        if self.group_by_length:
            mega = unit * self.mega_batch_mult
            batches = []
            for s in range(0, n, mega):
                chunk = sorted(perm[s : s + mega], key=lambda i: -self.lengths[i])
                batches.extend(chunk[i : i + unit] for i in range(0, len(chunk), unit))
        else:
            batches = [perm[i : i + unit] for i in range(0, n, unit)]
        partial = [b for b in batches if len(b) < unit]
        full = [b for b in batches if len(b) == unit]
        order = torch.randperm(len(full), generator=g).tolist()
        return [full[i] for i in order] + partial

    def __iter__(self) -> Iterator[int]:
        if self._iterated and not self._epoch_set:
            self.epoch += 1
        self._iterated, self._epoch_set = True, False
        for b in self.batches():
            yield from b


def _inner_sampler(sampler: object) -> LengthGroupedSampler | None:
    """Our sampler, also when Lightning wrapped it in a ``DistributedSamplerWrapper`` (DDP)."""
    if isinstance(sampler, LengthGroupedSampler):
        return sampler
    inner = getattr(getattr(sampler, "dataset", None), "_sampler", None)
    return inner if isinstance(inner, LengthGroupedSampler) else None


class ResumableBatchSampler(BatchSampler):
    """``BatchSampler`` that can skip the batches of an epoch already consumed before a checkpoint (resume).

    Keeps ``BatchSampler``'s signature so that Lightning can re-create it around a distributed sampler; the skip is
    applied per rank on batches, so the index stream below stays complete. It also forwards the epoch that
    Lightning sets on a ``DistributedSamplerWrapper`` to the :class:`LengthGroupedSampler` inside it.

    ``state_dict(batches_done)`` -> ``{"epoch", "seed", "batches_done"}``; after ``load_state_dict`` the next
    iteration of that epoch starts at batch ``batches_done``.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool = False) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self._skip = 0
        self._skip_epoch: int | None = None
        self.batches_done = 0

    def _epoch(self) -> int:
        inner = _inner_sampler(self.sampler)
        if inner is not self.sampler and inner is not None and hasattr(self.sampler, "epoch"):
            inner.set_epoch(int(self.sampler.epoch))  # DDP: Lightning set the wrapper's epoch, not ours
        if inner is not None:
            return inner.epoch
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self._epoch()  # with a pending skip the epoch was set explicitly, so it will not auto-advance
        skip = self._skip if self._skip_epoch == epoch else 0
        self._skip, self._skip_epoch = 0, None
        self.batches_done = 0
        for i, batch in enumerate(super().__iter__()):
            if i < skip:
                continue
            self.batches_done = i + 1
            yield batch

    def state_dict(self, batches_done: int | None = None) -> dict:
        """``batches_done``: batches of the current epoch consumed by training (default: handed out so far)."""
        inner = _inner_sampler(self.sampler)
        done = self.batches_done if batches_done is None else int(batches_done)
        return {
            "epoch": inner.epoch if inner is not None else int(getattr(self.sampler, "epoch", 0)),
            "seed": inner.seed if inner is not None else None,
            "batches_done": done,
        }

    def load_state_dict(self, state: dict) -> None:
        inner = _inner_sampler(self.sampler)
        if inner is not None and state.get("seed") is not None and int(state["seed"]) != inner.seed:
            raise ValueError(
                f"sampler state was saved with seed={state['seed']} but this DataModule has seed={inner.seed}; "
                "resume with the same seed to reproduce the data order"
            )
        epoch = int(state["epoch"])
        if inner is not None:
            inner.set_epoch(epoch)
        self._skip_epoch, self._skip = epoch, int(state.get("batches_done", 0))
