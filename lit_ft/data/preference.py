"""Preference data: (prompt, chosen, rejected) rows -> pair batches with completion-only labels on each side."""

from __future__ import annotations

from typing import Any

import torch

from lit_ft.data._common import pad_right
from lit_ft.data.sft import IGNORE_INDEX, SFTDataModule
from lit_ft.data.sources import DataSource

PAIR_FORMATS = (
    '{"prompt": str, "chosen": str, "rejected": str}, or a conversation before the responses: '
    '{"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...] (LLaMA-Factory) or '
    '[{"role", "content"}, ...], "chosen": ..., "rejected": ...}; a response is a string, one message '
    '({"from"/"role", "value"/"content"}) or a list of assistant messages; other column names: set prompt_key / '
    "messages_key / chosen_key / rejected_key"
)

#: LLaMA-Factory's (ShareGPT) speaker names -> chat-template roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def _message(m: Any, where: str) -> dict[str, str]:
    """A ``{"role", "content"}`` message from a ShareGPT ``{"from", "value"}`` or a chat ``{"role", "content"}``."""
    if isinstance(m, dict):
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if isinstance(role, str) and isinstance(content, str):
            if role not in ROLES:
                raise ValueError(f"{where}: unknown speaker {role!r}; expected one of {sorted(ROLES)}")
            return {"role": ROLES[role], "content": content}
    raise ValueError(f"{where}: expected a message {{'from': str, 'value': str}} or {{'role': str, 'content': str}}, "
                     f"got {str(m)[:200]}. Accepted formats: {PAIR_FORMATS}")


class PreferenceDataModule(SFTDataModule):
    """Preference pairs -> batches of chosen and rejected sequences with completion-only labels (for
    :class:`lit_ft.modules.PreferenceModule` and :class:`lit_ft.callbacks.TokenDPO`).

    Each side is encoded exactly as :class:`lit_ft.data.SFTDataModule` encodes a prompt/completion or chat row (the
    tokenizer's chat template when it has one, the same truncation rules), with labels on the response only: in a
    multi-turn conversation the earlier assistant turns are part of the prompt. A pair whose chosen or rejected
    response is cut away entirely by ``max_length`` is dropped (counted in :attr:`stats`, with a warning).

    Batch: ``chosen_input_ids``, ``chosen_attention_mask``, ``chosen_labels``, ``rejected_input_ids``,
    ``rejected_attention_mask``, ``rejected_labels`` (long ``[B, T]``, both sides right-padded to one ``T``;
    labels unshifted, -100 on the prompt and padding) and ``sample_idx`` (long ``[B]``: the pair's index in its
    split, stable across epochs and resume). Per-token weights (``chosen_token_weights`` /
    ``rejected_token_weights``) are added by a callback (``CriticalTokenScoring``), not here.

    Args:
        data: training pairs (the kinds :class:`lit_ft.data.SFTDataModule` reads: a .jsonl/.json/.parquet file, an
            asset name, a ``datasets.Dataset`` / ``DatasetDict`` or a ``load_dataset`` spec dict). Default: the
            ``dpo-en-demo`` asset (LLaMA-Factory's 300 English preference pairs).
        val_data: validation pairs (the same kinds). Default: the validation split of a ``DatasetDict``, else a
            seeded ``val_split`` fraction of ``data``.
        val_split: fraction of ``data`` held out for validation when there is no ``val_data``; in [0, 1).
        tokenizer: HF tokenizer folder or model asset name.
        max_length: maximum tokens per side (>= 2).
        min_prompt_length: a too-long side's prompt is cut from the left down to at least this many tokens (>= 0).
        batch_size: training pairs per batch (>= 1).
        eval_batch_size: validation pairs per batch (>= 1); default ``batch_size``.
        num_workers: DataLoader worker processes (>= 0).
        use_chat_template: format with the tokenizer's chat template; None = when the tokenizer has one.
        system_prompt: a system message prepended to conversations that have none (chat template only).
        bucket_by_length: group pairs of similar length into training batches; False = plain shuffle.
        max_train_samples: keep a seeded random subset of this many training pairs (>= 1); None = all.
        max_val_samples: same for validation pairs.
        seed: seed of the validation split, subsets and the per-epoch batch order.
        prompt_key: the row key read as the prompt (a string, or a list of messages).
        chosen_key: the row key read as the chosen response.
        rejected_key: the row key read as the rejected response.
        messages_key: the row key of a conversation before the responses (LLaMA-Factory: ``"conversations"``);
            used when a row has it, else ``prompt_key``.
    """

    def __init__(
        self,
        data: DataSource = "dpo-en-demo",
        val_data: DataSource | None = None,
        val_split: float = 0.1,
        tokenizer: str = "smollm2-135m-instruct",
        max_length: int = 512,
        min_prompt_length: int = 0,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        bucket_by_length: bool = True,
        max_train_samples: int | None = None,
        max_val_samples: int | None = None,
        seed: int = 0,
        prompt_key: str = "prompt",
        chosen_key: str = "chosen",
        rejected_key: str = "rejected",
        messages_key: str = "conversations",
    ) -> None:
        keys = {"prompt_key": prompt_key, "chosen_key": chosen_key, "rejected_key": rejected_key,
                "messages_key": messages_key}
        for name, key in keys.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"PreferenceDataModule: `{name}` must be a non-empty string, got {key!r}")
        if len(set(keys.values())) < len(keys):
            raise ValueError(f"PreferenceDataModule: prompt_key, chosen_key, rejected_key and messages_key must "
                             f"differ, got {keys}")
        super().__init__(
            data=data, val_data=val_data, val_split=val_split, tokenizer=tokenizer, max_length=max_length,
            min_prompt_length=min_prompt_length, batch_size=batch_size, eval_batch_size=eval_batch_size,
            num_workers=num_workers, use_chat_template=use_chat_template, system_prompt=system_prompt,
            bucket_by_length=bucket_by_length, max_train_samples=max_train_samples, max_val_samples=max_val_samples,
            seed=seed,
        )
        self.pair_keys = keys
        self._prompt_assistant_turns = 0  # assistant turns of the prompt being encoded (never labelled)

    # -- rows ---------------------------------------------------------------------------------------------------
    def _response(self, value: Any, where: str) -> list[dict[str, str]] | str:
        if isinstance(value, str):
            return value
        msgs = [value] if isinstance(value, dict) else value
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: a response must be a string, a message or a non-empty list of messages, got "
                             f"{str(value)[:200]}. Accepted formats: {PAIR_FORMATS}")
        out = [_message(m, where) for m in msgs]
        if not any(m["role"] == "assistant" for m in out):
            raise ValueError(f"{where}: the response has no assistant message: {str(value)[:200]}")
        return out

    def _side_rows(self, row: dict, idx: int, split: str) -> tuple[tuple[dict, int], tuple[dict, int]]:
        """(SFT row, assistant turns in its prompt) of the chosen and of the rejected side."""
        k = self.pair_keys
        where = f"{split} row {idx}"
        if not isinstance(row, dict) or k["chosen_key"] not in row or k["rejected_key"] not in row:
            found = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"{where}: a preference row needs {k['chosen_key']!r} and {k['rejected_key']!r}; keys "
                             f"found: {found}. Accepted formats: {PAIR_FORMATS}")
        if row.get(k["messages_key"]) is not None:
            prompt: Any = row[k["messages_key"]]
        elif row.get(k["prompt_key"]) is not None:
            prompt = row[k["prompt_key"]]
        else:
            raise ValueError(f"{where}: no prompt: the row has neither {k['messages_key']!r} nor {k['prompt_key']!r} "
                             f"(keys found: {sorted(row)}). Accepted formats: {PAIR_FORMATS}")
        if not isinstance(prompt, str):
            if not isinstance(prompt, list) or not prompt:
                raise ValueError(f"{where}: the prompt must be a string or a non-empty list of messages, got "
                                 f"{str(prompt)[:200]}")
            prompt = [_message(m, f"{where} (prompt)") for m in prompt]
        sides = []
        for key in ("chosen_key", "rejected_key"):
            resp = self._response(row[k[key]], f"{where} ({k[key]})")
            if isinstance(prompt, str) and isinstance(resp, str):
                sides.append(({"prompt": prompt, "completion": resp}, 0))
                continue
            msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            turns = sum(m["role"] == "assistant" for m in msgs)
            resp_msgs = [{"role": "assistant", "content": resp}] if isinstance(resp, str) else resp
            sides.append(({"messages": msgs + resp_msgs}, turns))
        return sides[0], sides[1]

    def _chat_pieces(self, msgs: list[dict], idx: int, split: str) -> tuple[list[tuple[str, bool]], str]:
        # the prompt's own assistant turns are context, not the response: unlabel the first ones
        pieces, gen = super()._chat_pieces(msgs, idx, split)
        skip = self._prompt_assistant_turns
        out = []
        for text, lab in pieces:
            if lab and skip > 0:
                skip -= 1
                lab = False
            out.append((text, lab))
        return out, gen

    def _encode_side(self, row: dict, turns: int, idx: int, split: str) -> dict:
        self._prompt_assistant_turns = turns
        try:
            return self._encode(row, idx, split)
        finally:
            self._prompt_assistant_turns = 0

    def _encode_split(self, rows: list[dict], keep: list[int], split: str) -> tuple[list[dict], dict[str, int]]:
        examples = []
        n_trunc = n_tok = n_drop = n_label = 0
        for i in keep:
            (crow, cturns), (rrow, rturns) = self._side_rows(rows[i], i, split)
            c = self._encode_side(crow, cturns, i, split)
            r = self._encode_side(rrow, rturns, i, split)
            if c["truncated"] or r["truncated"]:
                n_trunc += 1
                n_tok += c["truncated"] + r["truncated"]
            if c["n_labels"] == 0 or r["n_labels"] == 0:
                n_drop += 1
                continue
            n_label += c["n_labels"] + r["n_labels"]
            examples.append({
                "chosen_input_ids": c["input_ids"], "chosen_labels": c["labels"],
                "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"], "sample_idx": i,
                # what the length-grouped sampler sorts by: the pair's padded width
                "input_ids": c["input_ids"] if len(c["input_ids"]) >= len(r["input_ids"]) else r["input_ids"],
                "answer": None,
            })
        return examples, {"truncated_samples": n_trunc, "truncated_tokens": n_tok, "dropped_samples": n_drop,
                          "label_tokens": n_label}

    def _truncation_warning(self) -> str | None:
        msg = super()._truncation_warning()
        return None if msg is None else msg.replace("SFTDataModule:", "PreferenceDataModule (pairs):")

    # -- batches ------------------------------------------------------------------------------------------------
    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        n = len(examples)
        ids = [e["chosen_input_ids"] for e in examples] + [e["rejected_input_ids"] for e in examples]
        labels = [e["chosen_labels"] for e in examples] + [e["rejected_labels"] for e in examples]
        # one padded width for both sides: position t of the chosen and of the rejected row line up
        input_ids = pad_right(ids, self.tokenizer.pad_token_id)
        mask = pad_right([[1] * len(s) for s in ids], 0)
        lab = pad_right(labels, IGNORE_INDEX)
        return {
            "chosen_input_ids": input_ids[:n], "chosen_attention_mask": mask[:n], "chosen_labels": lab[:n],
            "rejected_input_ids": input_ids[n:], "rejected_attention_mask": mask[n:], "rejected_labels": lab[n:],
            "sample_idx": torch.tensor([e["sample_idx"] for e in examples], dtype=torch.long),
        }

    def _train_collate(self) -> Any:
        return self.collate
