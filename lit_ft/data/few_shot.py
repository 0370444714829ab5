"""Few-shot classification data for self-training (LiST): ``K`` labelled rows per class, the rest of the training
split as an unlabelled pool (labels hidden), and two seeded, resumable side streams of batches (unlabelled, meta)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from lit_ft.data._common import ListDataset, check_int
from lit_ft.data.classification import ClassificationDataModule
from lit_ft.data.sources import DataSource

STREAMS = ("unlabelled", "meta")


class FewShotDataModule(ClassificationDataModule):
    """A :class:`~lit_ft.data.ClassificationDataModule` split for few-shot self-training.

    After the usual loading (``max_train_samples`` first caps the training rows), ``shots_per_class`` rows of every
    class are drawn (seeded by ``seed``) as the labelled set; the training loader serves only them, in batches of
    ``batch_size``. Every other training row is the unlabelled pool: its batches carry ``input_ids``,
    ``attention_mask``, ``sample_idx`` and ``pool_idx`` (the row's position in the pool) and no ``labels``. The pool's
    true labels stay in :meth:`unlabelled_labels` for diagnostics only (``SelfTraining`` logs its teacher's accuracy
    on the pool from them; they never enter a loss).

    Side streams for ``lit_ft.callbacks.SelfTraining``: :meth:`stream_loader` gives the unlabelled batches
    (``unlabelled_batch_size``, full batches only) and the meta batches (labelled rows, ``meta_batch_size``) of one
    pass ("epoch") in an order fixed by ``(seed, stream, epoch)``, so a consumer that records (epoch, batches taken)
    resumes at the same batch; :meth:`pool_loader` gives the whole pool in order (pseudo-labelling).

    Args:
        shots_per_class: labelled rows per class ``K`` (>= 1; LiST's runs use 10, 20, 30; default 30). Every class
            must have at least ``K`` training rows.
        unlabelled_batch_size: rows per unlabelled batch (>= 1; LiST 16). The pool must hold at least one batch.
        meta_batch_size: rows per meta batch (>= 1; LiST 4), drawn from the labelled set.
        max_unlabelled_samples: keep a seeded subset of this many pool rows (>= 1); None = all.
        batch_size: labelled batch size (LiST 4).
        tokenizer: HF tokenizer folder or asset name; default the verbalizer's default model's.

    The other arguments are :class:`~lit_ft.data.ClassificationDataModule`'s (single-label data only); ``seed`` also
    seeds the labelled draw and the side streams' order.
    """

    def __init__(
        self,
        data: DataSource = "sarcasm",
        val_data: DataSource | None = None,
        val_split: float = 0.1,
        tokenizer: str = "smollm2-135m-instruct",
        text_key: str = "text",
        label_key: str = "label",
        num_labels: int | None = None,
        max_length: int = 128,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
        template: str | None = None,
        patterns: list[str] | None = None,
        shots_per_class: int = 30,
        unlabelled_batch_size: int = 16,
        meta_batch_size: int = 4,
        max_unlabelled_samples: int | None = None,
    ) -> None:
        check_int("shots_per_class", shots_per_class, 1)
        check_int("unlabelled_batch_size", unlabelled_batch_size, 1)
        check_int("meta_batch_size", meta_batch_size, 1)
        check_int("max_unlabelled_samples", max_unlabelled_samples, 1, optional=True)
        super().__init__(
            data=data, val_data=val_data, val_split=val_split, tokenizer=tokenizer, text_key=text_key,
            label_key=label_key, num_labels=num_labels, max_length=max_length, batch_size=batch_size,
            eval_batch_size=eval_batch_size, num_workers=num_workers, max_train_samples=max_train_samples,
            max_val_samples=max_val_samples, seed=seed, multi_label=False, template=template, patterns=patterns,
        )
        self.shots_per_class = shots_per_class
        self.unlabelled_batch_size = unlabelled_batch_size
        self.meta_batch_size = meta_batch_size
        self.max_unlabelled_samples = max_unlabelled_samples
        self._labelled: list[dict] | None = None
        self._unlabelled: list[dict] = []

    # ----------------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load as ClassificationDataModule does, then split the training rows into labelled and unlabelled."""
        if self._labelled is not None:
            return
        super().setup(stage)
        train = self._splits["train"]
        by_class: dict[int, list[int]] = {c: [] for c in range(int(self.num_labels))}
        for i, e in enumerate(train):
            by_class[int(e["label"])].append(i)
        counts = [len(by_class[c]) for c in range(int(self.num_labels))]
        names = self.label_names or [str(c) for c in range(len(counts))]
        for c, n in enumerate(counts):
            if n == 0:
                raise ValueError(f"FewShotDataModule: class {c} ({names[c]!r}) has no labelled training rows "
                                 f"(rows per class: {counts}); every class needs >= shots_per_class="
                                 f"{self.shots_per_class} rows")
            if n < self.shots_per_class:
                raise ValueError(f"FewShotDataModule: `shots_per_class`={self.shots_per_class} is larger than the "
                                 f"data: class {c} ({names[c]!r}) has only {n} training rows (rows per class: "
                                 f"{counts}); lower shots_per_class to <= {min(counts)} or add rows")
        g = torch.Generator().manual_seed(self.seed)
        chosen: set[int] = set()
        for c in range(len(counts)):
            idx = by_class[c]
            pick = torch.randperm(len(idx), generator=g)[: self.shots_per_class].tolist()
            chosen.update(idx[j] for j in pick)
        labelled = [train[i] for i in sorted(chosen)]
        pool = [i for i in range(len(train)) if i not in chosen]
        if self.max_unlabelled_samples is not None and len(pool) > self.max_unlabelled_samples:
            keep = torch.randperm(len(pool), generator=g)[: self.max_unlabelled_samples].sort().values.tolist()
            pool = [pool[j] for j in keep]
        self._unlabelled = [dict(train[i], pool_idx=k) for k, i in enumerate(pool)]
        self._labelled = labelled
        self._splits["train"] = labelled
        self.stats.update({"labelled_samples": len(labelled), "unlabelled_samples": len(self._unlabelled)})

    # ----------------------------------------------------------------------------------------------------------
    @property
    def num_unlabelled(self) -> int:
        """Rows in the unlabelled pool."""
        self.setup()
        return len(self._unlabelled)

    def check_unlabelled(self) -> None:
        """Raise unless the pool holds at least one full unlabelled batch."""
        n = self.num_unlabelled
        if n < self.unlabelled_batch_size:
            raise ValueError(f"FewShotDataModule: the unlabelled pool has {n} rows, fewer than one batch "
                             f"(`unlabelled_batch_size`={self.unlabelled_batch_size}): the training split minus "
                             f"{self.shots_per_class} labelled rows per class leaves too few; lower "
                             "unlabelled_batch_size or shots_per_class, or give more training rows")

    def unlabelled_labels(self) -> torch.Tensor:
        """The pool's hidden labels ``[N]`` in pool order (diagnostics only)."""
        self.setup()
        return torch.tensor([int(e["label"]) for e in self._unlabelled], dtype=torch.long)

    def collate_unlabelled(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """An unlabelled batch: the labels dropped, ``pool_idx`` added."""
        batch = self.collate(examples)
        batch.pop("labels")
        batch["pool_idx"] = torch.tensor([e["pool_idx"] for e in examples], dtype=torch.long)
        return batch

    def pool_loader(self) -> DataLoader:
        """The whole unlabelled pool in order, ``eval_batch_size`` rows per batch."""
        self.setup()
        return DataLoader(ListDataset(self._unlabelled), batch_size=self.eval_batch_size, shuffle=False,
                          collate_fn=self.collate_unlabelled)

    def stream_loader(self, stream: str, epoch: int) -> DataLoader:
        """One pass of the ``"unlabelled"`` or ``"meta"`` stream, shuffled by ``(seed, stream, epoch)``."""
        if stream not in STREAMS:
            raise ValueError(f"FewShotDataModule.stream_loader: `stream` must be one of {STREAMS}, got {stream!r}")
        self.setup()
        if stream == "unlabelled":
            self.check_unlabelled()
            rows, bs, collate, drop = self._unlabelled, self.unlabelled_batch_size, self.collate_unlabelled, True
        else:
            rows, bs, collate, drop = self._labelled, self.meta_batch_size, self.collate, False
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 2 * int(epoch) + STREAMS.index(stream))
        order = torch.randperm(len(rows), generator=g).tolist()
        return DataLoader(ListDataset([rows[i] for i in order]), batch_size=bs, shuffle=False, drop_last=drop,
                          collate_fn=collate)
