"""``_TextDataModule``: what the lit-ft DataModules share (arguments, loading, splitting, loaders, sampler state).

A subclass parses and encodes its rows, collates labels and states its own truncation warning; everything else —
the checks and attributes of the common arguments, asset fetching, the load/split/subsample/stats loop of
``setup``, the resumable training loader, the validation loader and the sampler position in checkpoints — is here.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lit_ft.data._common import (
    ListDataset,
    ResumableDataLoader,
    check_fraction,
    check_int,
    check_str,
    companion_val,
    load_splits,
    load_tokenizer,
    pad_right,
    resolve_data,
    subsample,
    warn_rank_zero,
)
from lit_ft.data.sampler import LengthGroupedSampler, ResumableBatchSampler
from lit_ft.data.sources import DataSource, check_source, is_path_like


class _TextDataModule(pl.LightningDataModule):
    """Base of the tokenizing DataModules; not meant to be used directly (see the subclasses for the arguments).

    Subclass hooks: :meth:`_encode_split` (required), :meth:`_collate_labels` (required), :meth:`_setup_tokenizer`,
    :meth:`_setup_rows`, :meth:`_check_splits`, :meth:`_truncation_warning`, :meth:`_group_by_length`, and
    :attr:`_summed_stats` (per-split stats also reported as train + val totals).
    """

    _summed_stats: tuple[str, ...] = ("truncated_samples", "truncated_tokens")

    def __init__(
        self,
        *,
        data: DataSource,
        val_data: DataSource | None,
        val_split: float,
        tokenizer: str,
        max_length: int,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        max_train_samples: int | None,
        max_val_samples: int | None,
        seed: int,
    ) -> None:
        super().__init__()
        check_source("data", data)
        check_source("val_data", val_data, optional=True)
        check_fraction("val_split", val_split)
        check_str("tokenizer", tokenizer)
        check_int("max_length", max_length, 2)
        check_int("batch_size", batch_size, 1)
        check_int("eval_batch_size", eval_batch_size, 1, optional=True)
        check_int("num_workers", num_workers, 0)
        check_int("max_train_samples", max_train_samples, 1, optional=True)
        check_int("max_val_samples", max_val_samples, 1, optional=True)
        check_int("seed", seed, 0)
        # paths as strings (os.PathLike too); Dataset objects and load_dataset specs as given
        self.data = str(data) if is_path_like(data) else data
        self.val_data = str(val_data) if is_path_like(val_data) else val_data
        self.val_split = float(val_split)
        self.tokenizer_name = str(tokenizer)
        self.max_length = max_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.max_train_samples = max_train_samples
        self.max_val_samples = max_val_samples
        self.seed = seed
        self.tokenizer: Any = None
        self.stats: dict[str, int] = {}
        self._splits: dict[str, list[dict]] | None = None
        self._train_sampler: ResumableBatchSampler | None = None
        self._pending_sampler_state: dict | None = None

    # ----------------------------------------------------------------------------------------------------------
    # loading
    # ----------------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Fetch named assets once (rank 0) so that ``setup`` on every rank finds them in the cache."""
        val = self.val_data if self.val_data is not None else companion_val(self.data)
        for arg, value in (("data", self.data), ("val_data", val), ("tokenizer", self.tokenizer_name)):
            if isinstance(value, str):  # Dataset objects are in memory; specs are loaded by datasets in setup
                resolve_data(arg, value)

    def setup(self, stage: str | None = None) -> None:
        """Load, split and tokenise all splits (once)."""
        if self._splits is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        self._setup_tokenizer()
        train_rows, val_rows, info = load_splits(self.data, self.val_data, self.val_split, self.seed)
        self.data_info = info
        self._setup_rows(train_rows, val_rows, info)
        stats: dict[str, int] = {}
        splits = {}
        for split, rows, limit in (
            ("train", train_rows, self.max_train_samples),
            ("val", val_rows, self.max_val_samples),
        ):
            examples, split_stats = self._encode_split(rows, subsample(len(rows), limit, self.seed), split)
            stats[f"{split}_rows"] = len(rows)
            stats[f"{split}_samples"] = len(examples)
            stats.update({f"{split}_{k}": v for k, v in split_stats.items()})
            splits[split] = examples
        for k in self._summed_stats:
            stats[k] = stats[f"train_{k}"] + stats[f"val_{k}"]
        self.stats = stats
        self._splits = splits
        self._check_splits(stage)
        msg = self._truncation_warning()
        if msg:
            warn_rank_zero(msg)

    def _setup_tokenizer(self) -> None:
        """Hook: inspect ``self.tokenizer`` (loaded) before the rows are read."""

    def _setup_rows(self, train_rows: list[dict], val_rows: list[dict], info: dict[str, Any]) -> None:
        """Hook: check all rows / derive data-wide settings before encoding."""

    def _encode_split(self, rows: list[dict], keep: list[int], split: str) -> tuple[list[dict], dict[str, int]]:
        """Examples of ``rows[i] for i in keep`` (each with ``input_ids`` and ``sample_idx``) and the split's stats
        (at least the keys of :attr:`_summed_stats`)."""
        raise NotImplementedError

    def _check_splits(self, stage: str | None) -> None:
        """Hook: raise when the encoded splits (``self._splits``, ``self.stats``) cannot serve ``stage``."""

    def _truncation_warning(self) -> str | None:
        """Hook: the warning to issue (rank zero) about what ``self.stats`` says was truncated/dropped, if any."""
        return None

    # ----------------------------------------------------------------------------------------------------------
    # batches and loaders
    # ----------------------------------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = [e["input_ids"] for e in examples]
        return {
            "input_ids": pad_right(ids, self.tokenizer.pad_token_id),
            "attention_mask": pad_right([[1] * len(s) for s in ids], 0),
            "labels": self._collate_labels(examples),
            "sample_idx": torch.tensor([e["sample_idx"] for e in examples], dtype=torch.long),
        }

    def _collate_labels(self, examples: list[dict]) -> torch.Tensor:
        raise NotImplementedError

    def _train_collate(self) -> Any:
        """Hook: the training loader's collate function (SFT packing replaces it); validation always uses
        :meth:`collate`."""
        return self.collate

    def _examples(self, split: str) -> list[dict]:
        if self._splits is None:
            self.setup()
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        return self._splits[split]

    def _group_by_length(self) -> bool:
        """Whether training batches group similar lengths (else a plain seeded shuffle)."""
        return False

    def train_dataloader(self) -> DataLoader:
        ex = self._examples("train")
        sampler = LengthGroupedSampler(
            [len(e["input_ids"]) for e in ex], self.batch_size, seed=self.seed, shuffle=True,
            group_by_length=self._group_by_length(), num_replicas=self._world_size(),
        )
        batch_sampler = ResumableBatchSampler(sampler, self.batch_size, drop_last=False)
        if self._pending_sampler_state:
            batch_sampler.load_state_dict(self._pending_sampler_state)
            self._pending_sampler_state = None
        self._train_sampler = batch_sampler
        return ResumableDataLoader(
            ListDataset(ex),
            batch_sampler=batch_sampler,
            collate_fn=self._train_collate(),
            num_workers=self.num_workers,
            progress=self._train_progress,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        ex = self._examples("val")
        if not ex:
            return []
        return DataLoader(
            ListDataset(ex), batch_size=self.eval_batch_size, shuffle=False, collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    # ----------------------------------------------------------------------------------------------------------
    # sampler state (resume)
    # ----------------------------------------------------------------------------------------------------------
    def _train_progress(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        try:
            return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
        except AttributeError:
            return None

    def _world_size(self) -> int:
        trainer = getattr(self, "trainer", None)
        try:
            return max(1, int(trainer.world_size))
        except (AttributeError, TypeError):
            return 1

    def state_dict(self) -> dict[str, Any]:
        """Sampler position (epoch, batches done in it, seed) so that a resumed run sees the same data order."""
        if self._train_sampler is None:
            return {}
        return {"train_sampler": self._train_sampler.state_dict(self._train_progress())}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        st = state_dict.get("train_sampler") if state_dict else None
        if not st:
            return
        if self._train_sampler is not None:
            self._train_sampler.load_state_dict(st)
        else:
            self._pending_sampler_state = st
