"""The black box of black-box prompt learning: texts in, the label words' probabilities out — nothing else.

:class:`BlackBox` is the interface (a remote API returning label-word probabilities can implement it);
:class:`LocalBlackBox` implements it over a local HF causal LM, reusing ``VerbalizerClassificationModule``'s
label-word scoring (the label words' logits at the last token, the lm_head computed for their rows only), under
``torch.no_grad`` with every parameter frozen: no gradient of the model is ever taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch

from lit_ft.modules.verbalizer import VerbalizerClassificationModule, label_word_log_probs

__all__ = ["BlackBox", "LocalBlackBox"]


@runtime_checkable
class BlackBox(Protocol):
    """What black-box prompt learning may ask of a model: ``class_probs(texts)`` ``[len(texts), C]``, each row the
    probabilities of the ``C`` classes' label words as the next token after the text (renormalised over the label
    words, summed per class)."""

    num_classes: int

    def class_probs(self, texts: Sequence[str]) -> torch.Tensor: ...


class LocalBlackBox:
    """A local causal LM behind the :class:`BlackBox` interface.

    Args:
        label_words: one list of words per class (``>= 2`` classes); each word is scored as ``label_word_prefix``
            + word (``VerbalizerClassificationModule``'s rules: several tokens = mean of their logits).
        tokenizer: the model's tokenizer (an object, or a folder / asset name).
        model: a local folder or lit_ft asset name.
        model_config: a config dict (random init; tests) instead of ``model``.
        label_word_prefix: prepended to every label word (a space: the word follows "Answer:").
        torch_dtype: the model's dtype.
        batch_size: texts per forward.
        max_length: texts longer than this many tokens keep their last ``max_length`` (the answer position
            survives); default: the model's ``max_position_embeddings``.
    """

    def __init__(self, label_words: list[list[str]], tokenizer: Any, model: str = "smollm2-135m-instruct",
                 model_config: dict | None = None, label_word_prefix: str = " ", torch_dtype: str = "float32",
                 batch_size: int = 32, max_length: int | None = None) -> None:
        if isinstance(tokenizer, str):
            from lit_ft.core.prompts import load_tokenizer

            tokenizer = load_tokenizer(tokenizer)
        self.tokenizer = tokenizer
        self.scorer = VerbalizerClassificationModule(
            model=model, model_config=model_config, label_words=label_words, label_word_prefix=label_word_prefix,
            torch_dtype=torch_dtype, trainable_word_weights=False, freeze_backbone=True)
        self.scorer.build_verbalizer(tokenizer)
        self.scorer.eval()
        for p in self.scorer.parameters():
            p.requires_grad_(False)
        self.num_classes = len(label_words)
        self.batch_size = int(batch_size)
        cfg = getattr(self.scorer.model, "config", None)
        self.max_length = int(max_length or getattr(cfg, "max_position_embeddings", 2048))
        self.queries = 0  # texts scored so far (the API-call count of the paper's budget)

    def to(self, device: torch.device | str) -> "LocalBlackBox":
        self.scorer.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.scorer.parameters()).device

    def parameters(self):
        """The model's parameters (frozen; tests assert that none ever gets a gradient)."""
        return self.scorer.parameters()

    def _encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.tokenizer(list(texts), add_special_tokens=True)["input_ids"]
        ids = [x[-self.max_length:] for x in ids]  # left-cut: the answer position stays
        T = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), T), int(pad), dtype=torch.long)
        mask = torch.zeros(len(ids), T, dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, : len(x)] = 1
        return input_ids, mask

    @torch.no_grad()
    def class_probs(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), C]`` float32 class probabilities (on the model's device)."""
        if not texts:
            raise ValueError("LocalBlackBox.class_probs: no texts")
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self._encode(texts[i: i + self.batch_size])
            z = self.scorer.word_logits(ids.to(self.device), mask.to(self.device))  # [B, C, W]
            logp = label_word_log_probs(z, self.scorer.word_mask)
            out.append(torch.logsumexp(logp, dim=-1).exp())  # per class: its words' probability mass
        self.queries += len(texts)
        return torch.cat(out).float()
