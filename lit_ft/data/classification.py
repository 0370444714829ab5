"""Sequence classification data: ``{"text", "label"}`` rows -> padded batches with one label per sample (or a
multi-hot vector with ``multi_label``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lit_ft.data._base import _TextDataModule
from lit_ft.data._common import check_int, pad_right
from lit_ft.data.sources import DataSource


def class_label_names(features: Any, key: str, n: int) -> list[str] | None:
    """The class names of a ``datasets`` ``ClassLabel`` column ``key`` (or a sequence of them, multi-label) when
    there are exactly ``n`` of them, else None."""
    feat = features.get(key) if hasattr(features, "get") else None
    names = getattr(feat, "names", None) or getattr(getattr(feat, "feature", None), "names", None)
    return [str(x) for x in names] if names and len(names) == n else None


class ClassificationDataModule(_TextDataModule):
    """Text classification rows -> ``input_ids``/``attention_mask``/``labels``/``sample_idx`` batches.

    Labels may be integers (``num_labels`` inferred as max + 1 unless given; names from a ``label_names.json``
    beside the data file, or from the ``ClassLabel`` feature of a ``datasets.Dataset`` column, when present, else
    ``"0"``, ``"1"``, ...) or strings (mapped to ids in sorted order of the
    training labels); the mapping is :attr:`label_names`. Texts longer than ``max_length`` are truncated by the
    tokenizer (special tokens kept) and counted in :attr:`stats`, with a warning at setup. A tokenizer without a pad
    token (decoder models) pads with eos. Training batches are shuffled with a seeded, resumable sampler.

    Batch: ``input_ids``, ``attention_mask`` (long [B, T], right-padded), ``labels`` (long [B]; with ``multi_label``
    float [B, num_labels] multi-hot), ``sample_idx`` (long [B]: the row's index in its split).

    Args:
        data: training data: a .jsonl/.json/.parquet file, an asset name (``python -m lit_ft.assets list``), a
            ``datasets.Dataset``, a ``datasets.DatasetDict`` (its "train" split; its "validation"/"test" split
            becomes ``val_data``) or a ``datasets.load_dataset`` spec dict (e.g. ``{"path": "parquet",
            "data_files": "train.parquet"}``). Parquet, Dataset objects and specs need ``lit-ft[datasets]``.
        val_data: validation data (the same kinds). Default: the validation split of a ``DatasetDict`` ``data``,
            else the ``<data>-val`` asset when there is one, else a seeded ``val_split`` fraction of ``data``.
        val_split: fraction of ``data`` held out for validation when there is no ``val_data``; in [0, 1), 0 = none.
        tokenizer: HF tokenizer folder or model asset name (no model hub is used).
        text_key: the row key holding the text.
        label_key: the row key holding the label (int or string).
        num_labels: number of classes (>= 2); None = inferred from the data.
        max_length: maximum tokens per text (>= 2), special tokens included.
        batch_size: training batch size (>= 1).
        eval_batch_size: validation batch size (>= 1); default ``batch_size``.
        num_workers: DataLoader worker processes (>= 0).
        max_train_samples: keep a seeded random subset of this many training rows (>= 1); None = all.
        max_val_samples: same for validation rows.
        seed: seed of the validation split, subsets and the per-epoch shuffle.
        multi_label: every row's label is a list of labels (ints or strings, possibly empty); ``labels`` is then a
            multi-hot float matrix (for ``ClassificationModule(multi_label=True)``).
        template: a pattern with one ``{text}`` placeholder wrapped around every text before tokenisation (PET-style
            prompts for ``VerbalizerClassificationModule``, e.g. ``"{text} Is it sarcastic? Answer:"``); only the
            text is truncated, so the pattern always stays whole. None = the text as is.
        patterns: several such patterns for PET's pattern ensemble at prediction: validation (and predict) batches
            then also hold every text under each pattern, ``pattern_input_ids`` / ``pattern_attention_mask`` (long
            [B, P, T], right-padded), which ``VerbalizerClassificationModule.predict_step`` scores and averages.
            Training batches are unchanged (they use ``template``). None = no ensemble.
    """

    def __init__(
        self,
        data: DataSource = "sarcasm",
        val_data: DataSource | None = None,
        val_split: float = 0.1,
        tokenizer: str = "minilm-l6-v2",
        text_key: str = "text",
        label_key: str = "label",
        num_labels: int | None = None,
        max_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
        multi_label: bool = False,
        template: str | None = None,
        patterns: list[str] | None = None,
    ) -> None:
        for name, value in (("text_key", text_key), ("label_key", label_key)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(multi_label, bool):
            raise ValueError(f"multi_label must be true or false, got {multi_label!r}")
        if template is not None and (not isinstance(template, str) or template.count("{text}") != 1):
            raise ValueError(f"template must be a string with exactly one '{{text}}' placeholder, got {template!r}")
        if patterns is not None and (not isinstance(patterns, (list, tuple)) or not patterns or any(
                not isinstance(p, str) or p.count("{text}") != 1 for p in patterns)):
            raise ValueError(f"patterns must be a non-empty list of strings with exactly one '{{text}}' placeholder "
                             f"each, got {patterns!r}")
        check_int("num_labels", num_labels, 2, optional=True)
        super().__init__(
            data=data, val_data=val_data, val_split=val_split, tokenizer=tokenizer, max_length=max_length,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            max_train_samples=max_train_samples, max_val_samples=max_val_samples, seed=seed,
        )
        self.text_key = text_key
        self.label_key = label_key
        self.num_labels = num_labels
        self.multi_label = multi_label
        self.template = template
        self.patterns = None if patterns is None else list(patterns)
        self.label_names: list[str] | None = None
        self._mapping: dict = {}

    # ----------------------------------------------------------------------------------------------------------
    def _check_rows(self, rows: list[dict], split: str) -> None:
        for i, r in enumerate(rows):
            missing = [k for k in (self.text_key, self.label_key) if k not in r]
            if missing:
                raise ValueError(
                    f"{split} row {i}: missing key(s) {missing}; keys found: {sorted(r)}. Accepted format: "
                    f'{{"{self.text_key}": str, "{self.label_key}": int | str}} (set text_key/label_key to match)'
                )
            if not isinstance(r[self.text_key], str):
                raise ValueError(f"{split} row {i}: {self.text_key!r} must be a string, got {r[self.text_key]!r}")
            lab = r[self.label_key]
            if self.multi_label:
                if not isinstance(lab, list) or any(isinstance(x, bool) or not isinstance(x, (int, str)) for x in lab):
                    raise ValueError(
                        f"{split} row {i}: with multi_label=true, {self.label_key!r} must be a list of ints or strings, "
                        f"got {lab!r}"
                    )
            elif isinstance(lab, bool) or not isinstance(lab, (int, str)):
                raise ValueError(f"{split} row {i}: label {self.label_key!r} must be an int or a string, got {lab!r}")

    def _row_labels(self, row: dict) -> list:
        lab = row[self.label_key]
        return list(lab) if self.multi_label else [lab]

    def _label_mapping(self, train: list[dict], val: list[dict], info: dict) -> dict:
        labels = [x for r in train + val for x in self._row_labels(r)]
        if not labels:
            raise ValueError(f"no labels under {self.label_key!r} in the data")
        kinds = {type(x) for x in labels}
        if len(kinds) > 1:
            raise ValueError(f"labels under {self.label_key!r} mix ints and strings; use one kind")
        if kinds == {str}:
            names = sorted({x for r in train for x in self._row_labels(r)})
            unknown = sorted({x for r in val for x in self._row_labels(r)} - set(names))
            if unknown:
                raise ValueError(f"validation labels {unknown[:10]} never occur in the training data")
            if self.num_labels is not None and self.num_labels < len(names):
                raise ValueError(f"num_labels={self.num_labels} but the training data has {len(names)} labels")
            names += [str(i) for i in range(len(names), self.num_labels or len(names))]
            self.label_names = names
            return {n: i for i, n in enumerate(names)}
        lo, hi = min(labels), max(labels)
        n = self.num_labels if self.num_labels is not None else max(2, hi + 1)
        if lo < 0 or hi >= n:
            raise ValueError(f"integer labels must lie in [0, num_labels={n}); found range [{lo}, {hi}]")
        names = class_label_names(info.get("features"), self.label_key, n) or [str(i) for i in range(n)]
        side = Path(info["data_path"]).parent / "label_names.json" if "data_path" in info else None
        if side is not None and side.is_file():
            try:
                loaded = json.loads(side.read_text())
                if isinstance(loaded, list) and len(loaded) == n:
                    names = [str(x) for x in loaded]
            except ValueError:
                pass
        self.label_names = names
        return {i: i for i in range(n)}

    def _setup_rows(self, train_rows: list[dict], val_rows: list[dict], info: dict[str, Any]) -> None:
        self._check_rows(train_rows, "train")
        self._check_rows(val_rows, "val")
        self._mapping = self._label_mapping(train_rows, val_rows, info)
        self.num_labels = len(self.label_names)

    def _apply_template(self, text: str, template: str | None = None) -> str:
        template = self.template if template is None else template
        return text if template is None else template.replace("{text}", text)

    def _fit_template(self, text: str, over: int, template: str | None = None) -> list[int]:
        """Ids of the templated ``text`` cut (in the text only, about ``over`` tokens) to ``max_length`` tokens."""
        tok = self.tokenizer
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ends = [e for _, e in enc["offset_mapping"]]
        keep = max(0, len(ends) - over) + 1
        while keep > 0:
            keep -= 1
            cut = text[: ends[keep - 1]] if keep else ""
            ids = tok(self._apply_template(cut, template), add_special_tokens=True)["input_ids"]
            if len(ids) <= self.max_length:
                return ids
        raise ValueError(
            f"ClassificationDataModule: the template {template or self.template!r} alone is longer than max_length="
            f"{self.max_length} tokens; raise max_length or shorten the template"
        )

    def _encode_texts(self, rows: list[dict], keep: list[int], template: str | None) -> tuple[list, list[int], int]:
        """Ids of ``rows[i]`` (``i`` in ``keep``) under ``template`` cut to ``max_length``, the positions cut and the
        tokens cut."""
        tok = self.tokenizer
        texts = [self._apply_template(rows[i][self.text_key], template) for i in keep]
        full = tok(texts, add_special_tokens=True, truncation=False)["input_ids"] if texts else []
        long = [j for j, ids in enumerate(full) if len(ids) > self.max_length]
        n_tok = sum(len(full[j]) - self.max_length for j in long)
        if long and (template or self.template) is not None:
            for j in long:
                full[j] = self._fit_template(rows[keep[j]][self.text_key], len(full[j]) - self.max_length, template)
        elif long:
            cut = tok([texts[j] for j in long], truncation=True, max_length=self.max_length)["input_ids"]
            for j, ids in zip(long, cut):
                full[j] = ids
        return full, long, n_tok

    def _encode_split(self, rows: list[dict], keep: list[int], split: str) -> tuple[list[dict], dict[str, int]]:
        full, long, n_tok = self._encode_texts(rows, keep, None)
        examples = [
            {"input_ids": ids, "sample_idx": i,
             "label": ([self._mapping[x] for x in rows[i][self.label_key]] if self.multi_label
                       else self._mapping[rows[i][self.label_key]])}
            for i, ids in zip(keep, full)
        ]
        if self.patterns and split != "train":  # the pattern ensemble is a prediction-time device
            per_pattern = [self._encode_texts(rows, keep, p)[0] for p in self.patterns]
            for j, e in enumerate(examples):
                e["pattern_ids"] = [ids[j] for ids in per_pattern]
        return examples, {"truncated_samples": len(long), "truncated_tokens": n_tok}

    def _truncation_warning(self) -> str | None:
        stats = self.stats
        if not stats["truncated_samples"]:
            return None
        return (
            f"ClassificationDataModule: max_length={self.max_length} truncated {stats['truncated_samples']} "
            f"texts ({stats['truncated_tokens']} tokens; train {stats['train_truncated_samples']}, val "
            f"{stats['val_truncated_samples']}). Raise max_length to keep them whole."
        )

    # ----------------------------------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().collate(examples)
        if examples and "pattern_ids" in examples[0]:
            P = len(examples[0]["pattern_ids"])
            flat = [ids for e in examples for ids in e["pattern_ids"]]  # [B * P] rows, pattern-minor
            batch["pattern_input_ids"] = pad_right(flat, self.tokenizer.pad_token_id).view(len(examples), P, -1)
            batch["pattern_attention_mask"] = pad_right([[1] * len(s) for s in flat], 0).view(len(examples), P, -1)
        return batch

    def predict_dataloader(self) -> Any:
        """The validation rows (with ``pattern_*`` tensors when ``patterns`` is set) for ``Trainer.predict``."""
        return self.val_dataloader()

    def _collate_labels(self, examples: list[dict]) -> torch.Tensor:
        if self.multi_label:
            hot = torch.zeros(len(examples), self.num_labels)
            for b, e in enumerate(examples):
                hot[b, e["label"]] = 1.0
            return hot
        return torch.tensor([e["label"] for e in examples], dtype=torch.long)

    def label_counts(self) -> list[int]:
        """How many training samples carry each label (after subsampling)."""
        counts = [0] * int(self.num_labels or 0)
        for e in self._examples("train"):
            for lab in (e["label"] if self.multi_label else [e["label"]]):
                counts[lab] += 1
        return counts
