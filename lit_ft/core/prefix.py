"""The per-layer key/value prefix (prefix tuning's trainable tensors) as a prompt source, shared by the techniques that
put a prefix into attention: PrefixTuning (prompt family) and MAM (adapters family, prefix at attention plus a scaled
parallel adapter at the FFN). It runs through :class:`lit_ft.core.prompts.PromptInjector` (``kind = "prefix"``)."""

from __future__ import annotations

import torch
from torch import nn

from lit_ft.core.prompts import ModelGeometry, PromptError, PromptInputs, PromptSource

__all__ = ["PrefixEncoder"]


class PrefixEncoder(PromptSource):
    """Per-layer key/value prefixes, laid out like PEFT's ``PrefixEncoder`` (so its tensors load one to one).

    Without projection: ``embedding.weight`` ``[n, 2 L kv]``. With projection (``projection_hidden_size > 0``):
    ``embedding`` ``[n, kv]`` -> ``transform`` = Linear(kv, h) -> tanh -> Linear(h, 2 L kv). The ``[n, 2L, H_kv, d_h]``
    result is split so layer ``l`` gets keys ``[:, 2l]`` and values ``[:, 2l + 1]`` (PEFT's permute/split order).
    """

    kind = "prefix"

    def __init__(self, geometry: ModelGeometry, num_virtual_tokens: int = 20, projection_hidden_size: int = 0) -> None:
        super().__init__(geometry, num_virtual_tokens)
        if isinstance(projection_hidden_size, bool) or not isinstance(projection_hidden_size, int) or projection_hidden_size < 0:
            raise PromptError(f"PrefixEncoder: projection_hidden_size must be an int >= 0, got {projection_hidden_size!r}")
        self.projection_hidden_size = projection_hidden_size
        out = 2 * geometry.num_layers * geometry.kv_dim
        if projection_hidden_size:
            # PEFT's token_dim is the key/value width (num_kv_heads * head_dim), not the hidden size
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(geometry.kv_dim, projection_hidden_size), nn.Tanh(), nn.Linear(projection_hidden_size, out)
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out)

    def flat_key_values(self) -> torch.Tensor:
        """``[n, 2 L kv]``"""
        x = self.embedding.weight
        return self.transform(x) if self.projection_hidden_size else x

    def prefix_key_values(self, inputs: PromptInputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = self.geometry
        n = self.num_virtual_tokens
        kv = self.flat_key_values().view(n, 2 * g.num_layers, g.num_kv_heads, g.head_dim).permute(1, 2, 0, 3)
        return [(kv[2 * i].unsqueeze(0), kv[2 * i + 1].unsqueeze(0)) for i in range(g.num_layers)]

    def artifact_config(self) -> dict:
        return {"num_virtual_tokens": self.num_virtual_tokens, "projection_hidden_size": self.projection_hidden_size}

    def peft_export(self) -> tuple[str, dict[str, torch.Tensor], dict]:
        """PEFT ``PREFIX_TUNING``: the ``[n, 2 L kv]`` table (computed through the MLP when there is one, as PEFT's
        ``save_pretrained`` does), loadable with ``prefix_projection`` off."""
        with torch.no_grad():
            table = self.flat_key_values()
        return "PREFIX_TUNING", {"prompt_embeddings": table}, {"prefix_projection": False}
