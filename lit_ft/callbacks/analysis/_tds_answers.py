"""The answers TokenDistributionShift measures: prompts cut from SFT batches, the fine-tuned model's greedy answers
to them, and the base model's teacher-forced logits for every answer token (one base forward per answer batch)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lit_ft.core.batch import IGNORE_INDEX


@dataclass
class Answers:
    """A batch of decoded answers.

    Attributes:
        sequences: [B, P + T] left-padded prompts followed by the answers.
        attention_mask: [B, P + T] 0 on left padding and after an answer's end.
        prompt_width: P, the padded prompt length.
        tokens: [B, T] the answer tokens (column t = answer position t).
        mask: [B, T] real answer tokens (up to and including the first eos).
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompt_width: int
    tokens: torch.Tensor
    mask: torch.Tensor


def prompts_from_batch(batch: Mapping[str, Any]) -> list[torch.Tensor]:
    """Each row's prompt: the attended tokens before its first supervised label (``labels != -100``). Rows without a
    supervised token or without a prompt token are left out (there is no prompt/answer split to read)."""
    ids, labels = batch["input_ids"], batch["labels"]
    attn = batch.get("attention_mask")
    if attn is None:
        attn = torch.ones_like(ids)
    out = []
    for row_ids, row_labels, row_attn in zip(ids, labels, attn):
        supervised = torch.nonzero(row_labels != IGNORE_INDEX).flatten()
        if supervised.numel() == 0:
            continue
        prompt = row_ids[: int(supervised[0])][row_attn[: int(supervised[0])].bool()]
        if prompt.numel():
            out.append(prompt.detach().to("cpu", torch.long).clone())
    return out


def left_pad(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` [B, P] of the prompts, left-padded with ``pad_id`` to the longest."""
    width = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():] = p
        mask[i, width - p.numel():] = 1
    return ids, mask


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over attended tokens only (left padding does not shift the prompt's positions); what HF
    ``generate`` uses for a left-padded batch."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def greedy_answers(model: nn.Module, prompts: list[torch.Tensor], max_new_tokens: int, pad_id: int,
                   eos_id: int | None, device: torch.device) -> Answers:
    """``model``'s greedy answers (plain argmax decoding, none of the model's own generation settings) to
    ``prompts``; an answer ends at its first ``eos_id`` (kept as its last token)."""
    from transformers import GenerationConfig

    ids, mask = left_pad(prompts, pad_id)
    ids, mask = ids.to(device), mask.to(device)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0,
                              eos_token_id=eos_id, pad_token_id=pad_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    width = ids.shape[1]
    tokens = out[:, width:]
    valid = torch.ones_like(tokens, dtype=torch.bool)
    if eos_id is not None and tokens.numel():
        ended = (tokens == eos_id).long().cumsum(-1)
        valid = (ended == 0) | ((ended == 1) & (tokens == eos_id))  # up to and including the first eos
    full_mask = torch.cat([mask, valid.long()], dim=1)
    return Answers(out, full_mask, width, tokens, valid)


@torch.no_grad()
def base_answer_logits(model: nn.Module, answers: Answers) -> torch.Tensor:
    """[B, T, V] ``model``'s logits for each answer token given the prompt and the answer before it (one teacher-
    forced forward over prompt + answer)."""
    T = answers.tokens.shape[1]
    kwargs = dict(input_ids=answers.sequences, attention_mask=answers.attention_mask,
                  position_ids=position_ids(answers.attention_mask))
    try:  # only the last T + 1 positions' logits are needed; not every model takes logits_to_keep
        logits = model(**kwargs, logits_to_keep=T + 1).logits
    except TypeError:
        logits = model(**kwargs).logits
    return logits[:, -(T + 1):-1].float()


def find_peft_model(module: nn.Module) -> nn.Module | None:
    """The PEFT wrapper inside ``module`` (``module`` itself if it is one), or ``None``."""
    for m in module.modules():
        if type(m).__module__.startswith("peft") and callable(getattr(m, "disable_adapter", None)):
            return m
    return None


@contextmanager
def adapters_disabled(peft_model: nn.Module) -> Iterator[nn.Module]:
    """``peft_model`` with its adapters off for the block: the base model of a PEFT run."""
    with peft_model.disable_adapter():
        yield peft_model
