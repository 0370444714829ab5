"""Supervised fine-tuning data: prompt/completion or chat rows -> completion-only-loss batches."""

from __future__ import annotations

import re
from typing import Any, Iterator

import torch

from lit_ft.data._base import _TextDataModule
from lit_ft.data._common import KEY_SPAN_PRESETS, check_int, key_spans_in, pad_left, pad_right, tokens_in_spans
from lit_ft.data.packing import collate_packed
from lit_ft.data.pkt_spans import pkt_spans, tool_names_in
from lit_ft.data.sources import DataSource

IGNORE_INDEX = -100

ACCEPTED_FORMATS = (
    '{"prompt": str, "completion": str[, "answer": str]} or '
    '{"messages": [{"role": "system"|"user"|"assistant"|..., "content": str}, ...][, "answer": str]} '
    "(at least one assistant message); other column names: set prompt_key / completion_key / messages_key / "
    "answer_key"
)

#: the row keys SFTDataModule reads -> its argument that renames each
ROW_KEYS = {"prompt": "prompt_key", "completion": "completion_key", "messages": "messages_key", "answer": "answer_key"}


def _train_without_kv_cache(trainer: Any) -> None:
    """Packed batches: a forward that builds a KV cache skips transformers' packed-sequence mask, so the examples of a
    row would attend to each other. lit_ft's own loss passes ``use_cache=False``; a plain ``model(**batch)`` reads
    ``config.use_cache``, which is turned off here (generation keeps its own ``generation_config.use_cache``)."""
    module = getattr(trainer, "lightning_module", None) if trainer is not None else None
    if module is None:
        return
    from lightning.pytorch.utilities import rank_zero_info

    from lit_ft.core.introspect import ModelLayoutError, find_hf_model

    try:
        hf = find_hf_model(module)
    except ModelLayoutError:
        return  # no HF model to configure (a custom module owns its forward)
    config = getattr(hf, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False
        rank_zero_info("SFTDataModule(packing=True): model.config.use_cache set to False for training "
                       "(packed rows are masked per example only in a forward without a KV cache)")


class SFTDataModule(_TextDataModule):
    """Prompt/completion or chat rows -> batches with completion-only labels, length-bucketed for training.

    Rows: ``{"prompt", "completion"}`` or ``{"messages": [{"role", "content"}, ...]}`` (loss on every assistant
    turn); an optional ``"answer"`` is kept for exact-match evaluation (:meth:`generation_batches`). Other keys are
    ignored. With the chat template, a prompt/completion row is the conversation [system?, user=prompt,
    assistant=completion]; the prompt is the rendered template up to and including the generation prompt and the
    labelled completion is the assistant content + the end-of-turn/eos token. Without it: prompt + completion + eos
    (a single space is inserted between them when neither side has whitespace at the boundary; the space belongs
    to the completion).

    Labels are unshifted (HF convention): prompt tokens and padding are -100, completion tokens their ids.
    Truncation to ``max_length``: the prompt (everything before the first labelled token) is cut from the left
    first (down to ``min_prompt_length`` tokens), then the sequence from the right. Nothing is silent:
    :attr:`stats` counts truncated samples/tokens and samples whose completion was cut away entirely (these are
    dropped); a warning reports the counts at setup.

    Batch: ``input_ids``, ``attention_mask``, ``labels`` (long [B, T], right-padded with the pad id / 0 / -100) and
    ``sample_idx`` (long [B]: the row's index in its split, stable across epochs and resume); with ``key_spans`` or
    ``key_span_patterns`` also ``key_token_mask`` (bool [B, T], aligned with ``labels``: True on labelled tokens
    that hold at least one character of a key span — found in each completion / assistant turn's text and mapped
    to tokens through the fast tokenizer's offsets; used by :class:`lit_ft.callbacks.KeyTokenWeighting`).

    Args:
        data: training data: a .jsonl/.json/.parquet file, an asset name (``python -m lit_ft.assets list``), a
            ``datasets.Dataset``, a ``datasets.DatasetDict`` (its "train" split; its "validation"/"test" split
            becomes ``val_data``) or a ``datasets.load_dataset`` spec dict (e.g. ``{"path": "parquet",
            "data_files": "train.parquet"}``). Parquet, Dataset objects and specs need ``lit-ft[datasets]``; a null
            cell counts as a missing key.
        val_data: validation data (the same kinds). Default: the validation split of a ``DatasetDict`` ``data``,
            else the ``<data>-val`` asset when there is one, else a seeded ``val_split`` fraction of ``data``.
        val_split: fraction of ``data`` held out for validation when there is no ``val_data``; in [0, 1), 0 = none.
        tokenizer: HF tokenizer folder or model asset name (no model hub is used).
        max_length: maximum tokens per sample (>= 2).
        min_prompt_length: when a sample is too long, its prompt is cut from the left but keeps at least this many
            of its last tokens (>= 0); the rest is cut from the right, so a large value can cut a completion away
            entirely (that sample is then dropped and counted). 0 = the prompt may be cut away completely.
        batch_size: training batch size (>= 1).
        eval_batch_size: validation/generation batch size (>= 1); default ``batch_size``.
        num_workers: DataLoader worker processes (>= 0).
        use_chat_template: format rows with the tokenizer's chat template; None = when the tokenizer has one.
        system_prompt: a system message prepended to chat conversations that have none (chat template only).
        bucket_by_length: group similar lengths into training batches (less padding); False = plain shuffle.
        max_train_samples: keep a seeded random subset of this many training rows (>= 1); None = all.
        max_val_samples: same for validation rows.
        seed: seed of the validation split, subsets and the per-epoch batch order.
        key_spans: mark key tokens with a preset (adds ``key_token_mask`` to batches): ``"tool_call"`` = in each
            JSON tool call ``{"name": ..., "arguments": {...}}`` of a completion, the function name and every
            argument key; ``"tool_name"`` = the function name only; ``"tl_training"`` = TL-Training's PKT marks:
            the first token of the function name and the tokens where it parts from another tool name found in
            the row (key tokens), and the last token of every argument value (parameter boundaries, a second bool
            batch key ``key_boundary_mask``; see :mod:`lit_ft.data.pkt_spans`). None = no preset.
        key_span_patterns: regular expressions (Python ``re``) searched in each completion / assistant turn's
            text; every match — or its group 1 when the pattern has a group — is a key span (adds
            ``key_token_mask``; combines with ``key_spans`` by union). Needs a fast tokenizer. None = none.
        prompt_key: the row key read as ``"prompt"`` (e.g. ``"question"``).
        completion_key: the row key read as ``"completion"`` (e.g. ``"response"``).
        messages_key: the row key read as ``"messages"`` (e.g. ``"conversations"``).
        answer_key: the row key read as ``"answer"``.
        packing: padding-free packing of training batches (TRL's padding-free collator, per batch): each batch's
            examples go end to end into as few rows of ``max_length`` as fit, ``position_ids`` restart per example
            and the batch has no ``attention_mask``, so transformers masks each example off from the others; the
            first token of each example is not a target; ``packed_sample_idx`` says which example owns each token
            (:mod:`lit_ft.data.packing`). The model's ``config.use_cache`` is turned off for training (the packed
            mask needs a forward without a KV cache). Validation batches stay unpacked. Techniques that treat a row
            as one sample (prompts, sample selection, attention-based selection) refuse packed batches.
    """

    def __init__(
        self,
        data: DataSource = "asdiv",
        val_data: DataSource | None = None,
        val_split: float = 0.1,
        tokenizer: str = "smollm2-135m-instruct",
        max_length: int = 512,
        min_prompt_length: int = 0,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        bucket_by_length: bool = True,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
        key_spans: str | None = None,
        key_span_patterns: list[str] | None = None,
        prompt_key: str = "prompt",
        completion_key: str = "completion",
        messages_key: str = "messages",
        answer_key: str = "answer",
        packing: bool = False,
    ) -> None:
        check_int("min_prompt_length", min_prompt_length, 0)
        if not isinstance(packing, bool):
            raise ValueError(f"packing must be True or False, got {packing!r}")
        keys = {"prompt": prompt_key, "completion": completion_key, "messages": messages_key, "answer": answer_key}
        for std, key in keys.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"{ROW_KEYS[std]} must be a non-empty string, got {key!r}")
        if len(set(keys.values())) < len(keys):
            raise ValueError(f"prompt_key, completion_key, messages_key and answer_key must differ, got {keys}")
        if key_spans is not None and key_spans not in KEY_SPAN_PRESETS:
            raise ValueError(f"key_spans must be one of {sorted(KEY_SPAN_PRESETS)} or None, got {key_spans!r}")
        compiled: list[re.Pattern] = []
        if key_span_patterns is not None:
            if isinstance(key_span_patterns, str) or not isinstance(key_span_patterns, (list, tuple)):
                raise ValueError(
                    f"key_span_patterns must be a list of regular expressions or None, got {key_span_patterns!r}"
                )
            for i, pat in enumerate(key_span_patterns):
                if not isinstance(pat, str) or not pat:
                    raise ValueError(f"key_span_patterns[{i}] must be a non-empty string, got {pat!r}")
                try:
                    compiled.append(re.compile(pat))
                except re.error as e:
                    raise ValueError(f"key_span_patterns[{i}]={pat!r} is not a valid regular expression: {e}") from None
        if use_chat_template is not None and not isinstance(use_chat_template, bool):
            raise ValueError(f"use_chat_template must be True, False or None, got {use_chat_template!r}")
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {system_prompt!r}")
        super().__init__(
            data=data, val_data=val_data, val_split=val_split, tokenizer=tokenizer, max_length=max_length,
            batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
            max_train_samples=max_train_samples, max_val_samples=max_val_samples, seed=seed,
        )
        self.min_prompt_length = min_prompt_length
        self.use_chat_template = use_chat_template
        self.system_prompt = system_prompt
        self.bucket_by_length = bucket_by_length
        self.key_spans = key_spans
        self.key_span_patterns = None if key_span_patterns is None else list(key_span_patterns)
        self._key_patterns = compiled
        self.marks_key_tokens = key_spans is not None or key_span_patterns is not None
        self.prompt_key, self.completion_key = prompt_key, completion_key
        self.messages_key, self.answer_key = messages_key, answer_key
        # only the keys that differ from the standard names are renamed (rows are used as they are otherwise)
        self._renames = {std: key for std, key in keys.items() if key != std}
        self.packing = packing

    # ----------------------------------------------------------------------------------------------------------
    _summed_stats = ("truncated_samples", "truncated_tokens", "dropped_samples")

    def _setup_tokenizer(self) -> None:
        tok = self.tokenizer
        has_template = bool(getattr(tok, "chat_template", None))
        if self.use_chat_template and not has_template:
            raise ValueError(
                f"use_chat_template=True but tokenizer={self.tokenizer_name!r} has no chat template; "
                "set use_chat_template=False (or None to decide automatically)"
            )
        self.chat = has_template if self.use_chat_template is None else self.use_chat_template
        self._eos_id = tok.eos_token_id
        if self._eos_id is None:
            raise ValueError(f"tokenizer={self.tokenizer_name!r} has no eos token; completion-only SFT needs one")
        if self.marks_key_tokens and not getattr(tok, "is_fast", False):
            raise ValueError(
                f"key_spans/key_span_patterns need a fast tokenizer (character offsets), but "
                f"tokenizer={self.tokenizer_name!r} loads as {type(tok).__name__}; save it with a tokenizer.json"
            )
        probe = tok("a", add_special_tokens=True)["input_ids"]
        self._bos = [tok.bos_token_id] if tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] else []

    def _encode_split(self, rows: list[dict], keep: list[int], split: str) -> tuple[list[dict], dict[str, int]]:
        examples = []
        n_trunc = n_tok = n_drop = n_label = n_key = n_key_samples = 0
        for i in keep:
            ex = self._encode(rows[i], i, split)
            if ex["truncated"]:
                n_trunc += 1
                n_tok += ex["truncated"]
            if ex["n_labels"] == 0:
                n_drop += 1
                continue
            n_label += ex["n_labels"]
            if self.marks_key_tokens:
                k = sum(1 for v in ex["key_mask"] if v == 1)  # 2 = a parameter boundary (tl_training)
                n_key += k
                n_key_samples += k > 0
            examples.append(ex)
        stats = {
            "truncated_samples": n_trunc,
            "truncated_tokens": n_tok,
            "dropped_samples": n_drop,
            "label_tokens": n_label,
        }
        if self.marks_key_tokens:
            stats.update(key_tokens=n_key, key_samples=n_key_samples)
        return examples, stats

    def _check_splits(self, stage: str | None) -> None:
        if not self._splits["train"] and stage in (None, "fit"):
            raise ValueError(
                f"no training samples left after truncation to max_length={self.max_length} "
                f"({self.stats['train_dropped_samples']} dropped); raise max_length"
            )

    def _truncation_warning(self) -> str | None:
        stats = self.stats
        if not (stats["truncated_samples"] or stats["dropped_samples"]):
            return None
        return (
            f"SFTDataModule: max_length={self.max_length} truncated {stats['truncated_samples']} samples "
            f"({stats['truncated_tokens']} tokens; train {stats['train_truncated_samples']}, val "
            f"{stats['val_truncated_samples']}) and dropped {stats['dropped_samples']} whose completion was cut "
            f"away entirely (train {stats['train_dropped_samples']}, val {stats['val_dropped_samples']}). "
            "Raise max_length to keep them."
        )

    # ----------------------------------------------------------------------------------------------------------
    def _parse_row(self, row: dict, idx: int, split: str) -> tuple[list[dict] | None, str | None, str | None]:
        """(messages or None, prompt, completion) — exactly one of the two forms."""
        if "messages" in row:
            msgs = row["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs
            )
            if ok and any(m["role"] == "assistant" for m in msgs):
                return msgs, None, None
            raise ValueError(
                f"{split} row {idx}: 'messages' must be a non-empty list of {{'role': str, 'content': str}} with at "
                f"least one assistant message; got {str(msgs)[:200]}. Accepted formats: {ACCEPTED_FORMATS}"
            )
        if "prompt" in row and "completion" in row:
            p, c = row["prompt"], row["completion"]
            if not isinstance(p, str) or not isinstance(c, str):
                raise ValueError(
                    f"{split} row {idx}: 'prompt' and 'completion' must be strings, got "
                    f"{type(p).__name__} and {type(c).__name__}"
                )
            return None, p, c
        raise ValueError(
            f"{split} row {idx}: unknown row format, keys found: {sorted(row)}. Accepted formats: {ACCEPTED_FORMATS}"
        )

    def _render(self, msgs: list[dict], gen: bool) -> str:
        return self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def _labelled_ids(self, text: str, end: str = "", candidates: tuple[str, ...] = ()) -> tuple[list[int], list[int]]:
        """Token ids of a labelled text and, per token, its key class: ``True`` (1) a key token, ``2`` a parameter
        boundary (``key_spans="tl_training"`` only), ``False`` (0) neither — always 0 when no key spans are
        configured. Key spans are searched in ``text`` without its trailing ``end`` (the eos/end-of-turn string),
        then mapped to tokens by character offsets. ``candidates``: the row's tool names (``"tl_training"``)."""
        if not text:
            return [], []
        if not self.marks_key_tokens:
            ids = self._ids(text)
            return ids, [False] * len(ids)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        body = text[: len(text) - len(end)] if end and text.endswith(end) else text
        if self.key_spans != "tl_training":
            spans = key_spans_in(body, self.key_spans, self._key_patterns)
            return enc["input_ids"], tokens_in_spans(enc["offset_mapping"], spans)
        keys, bounds = pkt_spans(body, candidates)
        keys += key_spans_in(body, None, self._key_patterns)
        key = tokens_in_spans(enc["offset_mapping"], keys)
        bound = tokens_in_spans(enc["offset_mapping"], bounds)
        return enc["input_ids"], [True if k else (2 if b else False) for k, b in zip(key, bound)]  # key wins

    def _chat_pieces(self, msgs: list[dict], idx: int, split: str) -> tuple[list[tuple[str, bool]], str]:
        """Text pieces (text, is_label) of a conversation and the generation prompt for its last assistant turn."""
        if self.system_prompt is not None and msgs[0]["role"] != "system":
            msgs = [{"role": "system", "content": self.system_prompt}, *msgs]
        eos = self.tokenizer.eos_token
        pieces: list[tuple[str, bool]] = []
        prev = ""
        gen_prompt = ""
        for i, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            ctx = self._render(msgs[:i], gen=True)
            full = self._render(msgs[: i + 1], gen=False)
            if not ctx.startswith(prev) or not full.startswith(ctx):
                raise ValueError(
                    f"{split} row {idx}: the tokenizer's chat template does not render conversations "
                    "incrementally (a rendered prefix changes when a turn is added), so assistant turns cannot be "
                    "located; use single-turn rows or use_chat_template=False"
                )
            pieces.append((ctx[len(prev) :], False))
            answer = full[len(ctx) :]
            k = answer.find(eos) if eos else -1
            if k >= 0:
                pieces += [(answer[: k + len(eos)], True), (answer[k + len(eos) :], False)]
            else:
                body = answer.rstrip()
                pieces += [(body, True), (answer[len(body) :], False)]
            prev = full
            gen_prompt = ctx
        return pieces, gen_prompt

    def _standard_row(self, row: dict) -> dict:
        """The row with the configured ``*_key`` columns under the standard names; a standard name that another
        column was mapped to is dropped (``prompt_key="question"`` reads "question", never "prompt")."""
        if not self._renames:
            return row
        out = {k: v for k, v in row.items() if k not in self._renames and k not in self._renames.values()}
        out.update({std: row[key] for std, key in self._renames.items() if key in row})
        return out

    def _encode(self, row: dict, idx: int, split: str) -> dict:
        row = self._standard_row(row)
        msgs, prompt, completion = self._parse_row(row, idx, split)
        if self.chat:
            if msgs is None:
                msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
            pieces, gen_text = self._chat_pieces(msgs, idx, split)
            # merge neighbouring unlabelled pieces, then tokenise piece by piece
            ids: list[int] = []
            labels: list[int] = []
            keys: list[bool] = []
            merged: list[tuple[str, bool]] = []
            for text, lab in pieces:
                if merged and not lab and not merged[-1][1]:
                    merged[-1] = (merged[-1][0] + text, False)
                elif text:
                    merged.append((text, lab))
            cands = self._candidates("".join(text for text, _ in merged))
            for text, lab in merged:
                if lab:
                    t, k = self._labelled_ids(text, self.tokenizer.eos_token or "", cands)
                else:
                    t = self._ids(text)
                    k = [False] * len(t)
                ids += t
                keys += k
                labels += t if lab else [IGNORE_INDEX] * len(t)
            gen_ids = self._ids(gen_text)
        else:
            if msgs is not None:
                raise ValueError(
                    f"{split} row {idx}: chat 'messages' rows need a chat template, but use_chat_template is off "
                    f"(tokenizer={self.tokenizer_name!r})"
                )
            if prompt and completion and not prompt[-1].isspace() and not completion[0].isspace():
                completion = " " + completion
            p = self._bos + self._ids(prompt)
            c, ck = self._labelled_ids(completion, candidates=self._candidates(prompt + completion))
            c, ck = c + [self._eos_id], ck + [False]
            ids, labels, gen_ids = p + c, [IGNORE_INDEX] * len(p) + c, p
            keys = [False] * len(p) + ck
        # truncation: the prompt (before the first label) from the left, down to min_prompt_length tokens; then
        # the sequence from the right
        truncated = 0
        excess = len(ids) - self.max_length
        if excess > 0:
            first = next((j for j, v in enumerate(labels) if v != IGNORE_INDEX), len(labels))
            cut = min(excess, max(0, first - self.min_prompt_length))
            ids, labels, keys = ids[cut:], labels[cut:], keys[cut:]
            truncated = excess
            if len(ids) > self.max_length:
                ids, labels, keys = ids[: self.max_length], labels[: self.max_length], keys[: self.max_length]
        if len(gen_ids) > self.max_length:
            gen_ids = gen_ids[len(gen_ids) - self.max_length :]
        answer = row.get("answer")
        out = {
            "input_ids": ids,
            "labels": labels,
            "sample_idx": idx,
            "n_labels": sum(1 for v in labels if v != IGNORE_INDEX),
            "truncated": truncated,
            "gen_ids": gen_ids,
            "answer": None if answer is None else str(answer),
        }
        if self.marks_key_tokens:
            out["key_mask"] = keys
        return out

    # ----------------------------------------------------------------------------------------------------------
    def _collate_labels(self, examples: list[dict]) -> torch.Tensor:
        return pad_right([e["labels"] for e in examples], IGNORE_INDEX)

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = super().collate(examples)
        if self.marks_key_tokens:
            classes = pad_right([[int(v) for v in e["key_mask"]] for e in examples], 0)
            batch["key_token_mask"] = classes == 1
            if self.key_spans == "tl_training":
                batch["key_boundary_mask"] = classes == 2
        return batch

    def _candidates(self, row_text: str) -> tuple[str, ...]:
        """The row's tool names (tool definitions in the prompt, calls in the answers) for ``"tl_training"``."""
        return tuple(tool_names_in(row_text)) if self.key_spans == "tl_training" else ()

    def _group_by_length(self) -> bool:
        return self.bucket_by_length

    def _train_collate(self) -> Any:
        return self.collate_packed if self.packing else self.collate

    def collate_packed(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """A padding-free packed training batch (``packing=True``; see :mod:`lit_ft.data.packing`)."""
        batch = collate_packed(examples, self.max_length, self.tokenizer.pad_token_id,
                               token_keys=[("key_mask", 0)] if self.marks_key_tokens else [])
        if self.marks_key_tokens:
            classes = batch.pop("key_mask")
            batch["key_token_mask"] = classes == 1
            if self.key_spans == "tl_training":
                batch["key_boundary_mask"] = classes == 2
        return batch

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.packing and stage in (None, "fit"):
            _train_without_kv_cache(self.trainer)

    def generation_batches(
        self, split: str = "val", limit: int | None = None, batch_size: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """Left-padded prompts of the rows that have an ``"answer"``, for generate-then-exact-match evaluation.

        Yields ``{"input_ids", "attention_mask"}`` (long [B, T], left-padded; with the chat template the prompt
        ends with the generation prompt) plus ``"answers"`` (list[str]) and ``"sample_idx"`` (long [B]).
        ``limit``: at most this many rows (in split order); ``batch_size`` defaults to ``eval_batch_size``.
        """
        check_int("limit", limit, 1, optional=True)
        check_int("batch_size", batch_size, 1, optional=True)
        rows = [e for e in self._examples(split) if e["answer"] is not None]
        if limit is not None:
            rows = rows[:limit]
        bs = batch_size or self.eval_batch_size
        pad = self.tokenizer.pad_token_id
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            ids = [e["gen_ids"] for e in chunk]
            yield {
                "input_ids": pad_left(ids, pad),
                "attention_mask": pad_left([[1] * len(x) for x in ids], 0),
                "answers": [e["answer"] for e in chunk],
                "sample_idx": torch.tensor([e["sample_idx"] for e in chunk], dtype=torch.long),
            }
