"""Packed language-model data: documents -> one token stream -> fixed-length sequences (long-context fine-tuning)."""

from __future__ import annotations

import random
from typing import Any

import torch

from lit_ft.data._base import _TextDataModule
from lit_ft.data._common import check_int, companion_val, load_source, load_tokenizer, subsample
from lit_ft.data.sources import describe

# documents are tokenised in chunks of this many so that a large corpus never holds all encodings at once twice
_TOKENIZE_CHUNK = 1024


class PackedTextDataModule(_TextDataModule):
    """Text JSONL -> non-overlapping sequences of exactly ``seq_len`` tokens, every token supervised.

    Every row's ``text_key`` string is tokenised without special tokens, the tokenizer's eos id is appended (it marks
    the document boundary), all documents are concatenated in file order and the stream is cut into consecutive
    sequences of ``seq_len`` tokens; the final partial sequence is dropped (counted in :attr:`stats`). Sequences
    cross document boundaries, and attention is not reset at them (plain causal LM packing). Meant for long-context
    fine-tuning, e.g. :class:`lit_ft.callbacks.TokenElimination` (LeMo) at 4k+ tokens.

    Validation: with ``val_data`` (or a ``<data>-val`` asset) that file is packed the same way on its own; else a
    seeded ``val_split`` fraction of the packed *sequences* is held out (whole sequences, so no token is in both
    splits; at least one when ``val_split > 0``). Both splits keep stream order.

    Batch: ``input_ids`` (long [B, seq_len]), ``attention_mask`` (all ones), ``labels`` (= ``input_ids``, unshifted:
    the model shifts) and ``sample_idx`` (long [B]: the sequence's index within its split, stable across epochs and
    resume). :attr:`stats`: per packed file (``data_*``, and ``val_data_*`` when there is one) ``_documents``,
    ``_tokens`` (eos included), ``_sequences`` and ``_dropped_tokens`` (the remainder cut off); per split
    ``{train,val}_sequences`` (before ``max_*_samples``) and ``_samples`` (after); ``dropped_tokens`` in all.

    Args:
        data: training data: a .jsonl/.json file of rows with a text field, or an asset name
            (``python -m lit_ft.assets list``; e.g. ``bbcnews``, BBC News articles).
        val_data: validation data (path or asset). Default: the ``<data>-val`` asset when there is one, else a
            seeded ``val_split`` fraction of the packed sequences of ``data``.
        val_split: fraction of the packed sequences held out for validation when there is no ``val_data``; in
            [0, 1), 0 = none.
        tokenizer: HF tokenizer folder or model asset name (no model hub is used); it must have an eos token.
        seq_len: tokens per sequence (>= 2); the model's ``max_position_embeddings`` must allow it.
        text_key: the row key holding the document text (a string).
        batch_size: training batch size (>= 1).
        eval_batch_size: validation batch size (>= 1); default ``batch_size``.
        num_workers: DataLoader worker processes (>= 0).
        max_train_samples: keep a seeded random subset of this many training sequences (>= 1); None = all.
        max_val_samples: same for validation sequences.
        seed: seed of the validation split, the subsets and the per-epoch shuffle.
    """

    def __init__(
        self,
        data: str = "bbcnews",
        val_data: str | None = None,
        val_split: float = 0.05,
        tokenizer: str = "smollm2-135m-instruct",
        seq_len: int = 4096,
        text_key: str = "text",
        batch_size: int = 1,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
    ) -> None:
        check_int("seq_len", seq_len, 2)  # before the base class, which would name it max_length
        if not isinstance(text_key, str) or not text_key:
            raise ValueError(f"text_key must be a non-empty string, got {text_key!r}")
        super().__init__(
            data=data, val_data=val_data, val_split=val_split, tokenizer=tokenizer, max_length=seq_len,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            max_train_samples=max_train_samples, max_val_samples=max_val_samples, seed=seed,
        )
        self.seq_len = seq_len
        self.text_key = text_key

    # ----------------------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Tokenise, pack and split (once). The base class splits rows; packing splits sequences, so this replaces
        its loop and keeps its loaders and sampler state."""
        if self._splits is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name)
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer={self.tokenizer_name!r} has no eos token; packing needs one between documents")
        val_name = self.val_data if self.val_data is not None else companion_val(self.data)
        stats: dict[str, int] = {}
        train, data_path = self._pack("data", self.data, stats)
        self.data_info: dict[str, Any] = {"data_path": data_path}
        if val_name is not None:
            val, self.data_info["val_path"] = self._pack("val_data", val_name, stats)
        else:
            train, val = self._split_sequences(train)
            self.data_info["val_from_split"] = int(val.shape[0])
        splits = {}
        for split, seqs, limit in (("train", train, self.max_train_samples), ("val", val, self.max_val_samples)):
            keep = subsample(int(seqs.shape[0]), limit, self.seed)
            splits[split] = [{"input_ids": seqs[i], "sample_idx": i} for i in keep]
            stats[f"{split}_sequences"] = int(seqs.shape[0])
            stats[f"{split}_samples"] = len(keep)
        stats["dropped_tokens"] = stats["data_dropped_tokens"] + stats.get("val_data_dropped_tokens", 0)
        self.stats = stats
        self._splits = splits

    def _pack(self, arg: str, value: Any, stats: dict[str, int]) -> tuple[torch.Tensor, str]:
        """([n, seq_len] sequences of ``value`` — a file, asset, ``datasets.Dataset`` or the train split of a
        ``DatasetDict`` —, its resolved path or description); adds ``<arg>_*`` counts to ``stats``."""
        rows, _, info = load_source(arg, value)
        path = info.get("data_path") or describe(value)
        texts = []
        for i, r in enumerate(rows):
            if self.text_key not in r:
                raise ValueError(
                    f"{arg}={value!r} row {i}: missing key {self.text_key!r}; keys found: {sorted(r)}. Set text_key "
                    "to the key holding the document text"
                )
            if not isinstance(r[self.text_key], str):
                raise ValueError(
                    f"{arg}={value!r} row {i}: {self.text_key!r} must be a string, got {r[self.text_key]!r}"
                )
            texts.append(r[self.text_key])
        eos = int(self.tokenizer.eos_token_id)
        stream: list[int] = []
        for s in range(0, len(texts), _TOKENIZE_CHUNK):
            for ids in self.tokenizer(texts[s : s + _TOKENIZE_CHUNK], add_special_tokens=False)["input_ids"]:
                stream += ids
                stream.append(eos)
        n = len(stream) // self.seq_len
        if n == 0:
            raise ValueError(
                f"{arg}={value!r}: its {len(rows)} documents hold {len(stream)} tokens (one eos each included), fewer "
                f"than one sequence of seq_len={self.seq_len}; add text or lower seq_len"
            )
        # int32 storage (collate widens to long): a long-context corpus is many tokens, and ids fit easily
        seqs = torch.tensor(stream[: n * self.seq_len], dtype=torch.int32).view(n, self.seq_len)
        stats.update({
            f"{arg}_documents": len(rows), f"{arg}_tokens": len(stream), f"{arg}_sequences": n,
            f"{arg}_dropped_tokens": len(stream) - n * self.seq_len,
        })
        return seqs, path

    def _split_sequences(self, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(train, val) sequences: a seeded ``val_split`` share goes to val; both keep stream order."""
        n = int(seqs.shape[0])
        n_val = int(round(self.val_split * n))
        if self.val_split > 0 and n_val == 0:
            n_val = 1  # a requested validation split is never silently empty
        if n_val >= n:
            raise ValueError(
                f"val_split={self.val_split} leaves no training sequences out of {n} (seq_len={self.seq_len}); "
                "add text, lower seq_len or val_split, or give val_data"
            )
        order = list(range(n))
        random.Random(self.seed).shuffle(order)
        is_val = torch.zeros(n, dtype=torch.bool)
        is_val[sorted(order[n - n_val :])] = True
        return seqs[~is_val], seqs[is_val]

    # ----------------------------------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        ids = torch.stack([e["input_ids"] for e in examples]).long()
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.clone(),  # a technique may edit labels in place; input_ids must not change with them
            "sample_idx": torch.tensor([e["sample_idx"] for e in examples], dtype=torch.long),
        }
