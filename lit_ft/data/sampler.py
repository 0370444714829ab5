"""A seeded, resumable sampler that groups similar lengths into batches (length bucketing)."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class LengthGroupedSampler(Sampler[int]):
    """Yields every index once per epoch so that each run of ``batch_size`` consecutive indices is one batch.

    Per epoch (generator seeded with ``seed + epoch``): randomly permute the indices, cut the permutation into
    mega-chunks of ``mega_batch_mult`` batches, sort each chunk by length (longest first), cut it into batches and
    shuffle the order of all batches. The single partial batch (when ``len % batch_size != 0``) is placed last so
    that wrapping this sampler in ``torch.utils.data.BatchSampler(sampler, batch_size, drop_last=False)`` reproduces
    exactly these batches. ``group_by_length=False`` gives a plain seeded shuffle; ``shuffle=False`` sequential order.

    ``num_replicas`` > 1 (DDP): the unit that is sorted and shuffled is a global batch of ``batch_size *
    num_replicas`` indices, so that the interleaving ``DistributedSampler(shuffle=False)`` wrapper that Lightning
    injects (rank r takes positions r, r + W, ...) still gives each rank a length-homogeneous batch.

    Epoch: ``set_epoch`` (Lightning calls it on ``batch_sampler.sampler`` each epoch); without it the epoch
    advances by one at every new iteration. Resume: ``state_dict()`` -> ``{"epoch", "seed", "batches_done"}``;
    after ``load_state_dict`` the next iteration of that epoch skips the batches already done.
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
        self._skip_batches = 0  # pending skip (resume) ...
        self._skip_epoch: int | None = None  # ... that applies to this epoch only
        self.batches_done = 0  # batches of the current epoch handed out so far (upper bound of consumed)

    def __len__(self) -> int:
        return len(self.lengths)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._epoch_set = True

    def _pending_for(self, epoch: int) -> bool:
        return self._skip_epoch == epoch

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """The full ordered list of (global) batches of ``epoch`` (default: the current one)."""
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
        skip = self._skip_batches if self._pending_for(self.epoch) else 0
        self._skip_batches, self._skip_epoch = 0, None
        batches = self.batches()
        self.batches_done = skip
        for b in batches[skip:]:
            self.batches_done += 1
            yield from b

    def state_dict(self, batches_done: int | None = None) -> dict:
        """``batches_done``: batches of the current epoch already consumed (default: handed out by the iterator)."""
        done = self.batches_done if batches_done is None else int(batches_done)
        return {"epoch": self.epoch, "seed": self.seed, "batches_done": done}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"sampler state was saved with seed={state['seed']} but this DataModule has seed={self.seed}; "
                "resume with the same seed to reproduce the data order"
            )
        self.epoch = int(state["epoch"])
        self._skip_epoch = self.epoch
        self._skip_batches = int(state.get("batches_done", 0))
        self._epoch_set = True  # the restored epoch is the one to iterate next
