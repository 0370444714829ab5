"""The prompt picture: for each virtual token of a learned prompt, the vocabulary tokens whose input embeddings are
nearest to it (cosine similarity), as a small HTML table.

Only ``"embeddings"`` prompt sources live in the input-embedding space; a ``"prefix"`` source (per-layer keys and
values) has no such neighbours, and a source whose prompt depends on the batch (one prompt per example) has none
that is the same for every input: :func:`static_prompt_embeddings` returns ``None`` for both.
"""

from __future__ import annotations

import html as _html
from typing import Any

import torch

__all__ = ["static_prompt_embeddings", "nearest_tokens", "nearest_tokens_html"]


@torch.no_grad()
def static_prompt_embeddings(source: Any) -> torch.Tensor | None:
    """The ``[n, D]`` virtual-token embeddings of an ``"embeddings"`` prompt source that does not depend on the
    batch, else ``None``. Built from a one-token dummy input (no model forward)."""
    if getattr(source, "kind", None) != "embeddings":
        return None
    from lit_ft.core.prompts import PromptInputs

    p = next(iter(source.parameters()), None)
    device = p.device if p is not None else torch.device("cpu")
    hidden = getattr(getattr(source, "geometry", None), "hidden_size", None) or 1
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    ones = torch.ones(1, 1, dtype=torch.long, device=device)
    dummy = PromptInputs(input_ids=ones, attention_mask=ones, position_ids=torch.zeros_like(ones),
                         inputs_embeds=torch.zeros(1, 1, hidden, dtype=dtype, device=device))
    try:
        emb = source.prompt_embeddings(dummy)
    except Exception:  # a source that needs real per-batch context (e.g. instruction masks)
        return None
    if emb.dim() == 3 and emb.shape[0] == 1:
        emb = emb[0]
    if emb.dim() != 2 or emb.shape[0] != source.num_virtual_tokens:
        return None
    return emb.detach()


@torch.no_grad()
def nearest_tokens(prompt: torch.Tensor, vocab: torch.Tensor, k: int = 5,
                   chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``prompt`` ``[n, D]``, the ``k`` rows of ``vocab`` ``[V, D]`` with the highest cosine
    similarity: ``(ids [n, k], similarities [n, k])``, best first, on the CPU. The vocabulary is visited in chunks of
    ``chunk`` rows (a large vocabulary never needs a ``[n, V]`` float32 copy of its embeddings at once)."""
    k = max(1, min(int(k), vocab.shape[0]))
    q = torch.nn.functional.normalize(prompt.detach().float(), dim=-1)
    best_s = torch.full((q.shape[0], 0), float("-inf"), device=q.device)
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.long, device=q.device)
    for start in range(0, vocab.shape[0], chunk):
        v = torch.nn.functional.normalize(vocab[start:start + chunk].detach().to(q.device).float(), dim=-1)
        s = q @ v.T
        top = s.topk(min(k, s.shape[1]), dim=1)
        best_s = torch.cat([best_s, top.values], dim=1)
        best_i = torch.cat([best_i, top.indices + start], dim=1)
        keep = best_s.topk(min(k, best_s.shape[1]), dim=1)
        best_s, best_i = keep.values, best_i.gather(1, keep.indices)
    return best_i.cpu(), best_s.cpu()


def nearest_tokens_html(ids: torch.Tensor, sims: torch.Tensor, tokenizer: Any = None, title: str = "") -> str:
    """An HTML table: one row per virtual token (``v0``, ``v1``, ...), its nearest vocabulary tokens with their
    cosine similarity; each cell ``<td class="near" data-id="...">``."""
    from lit_ft.core.picture_tokens import token_text

    head = "".join(f"<th>#{j + 1}</th>" for j in range(ids.shape[1]))
    body = []
    for r in range(ids.shape[0]):
        cells = "".join(
            f'<td class="near" data-id="{int(ids[r, j])}" title="id {int(ids[r, j])}">'
            f"{_html.escape(token_text(tokenizer, int(ids[r, j])))} <small>{float(sims[r, j]):.2f}</small></td>"
            for j in range(ids.shape[1])
        )
        body.append(f"<tr><th>v{r}</th>{cells}</tr>")
    style = ("body{font-family:monospace;font-size:13px}td,th{padding:2px 8px;border:1px solid #ddd}"
             "small{color:#888}table{border-collapse:collapse}")
    caption = f"<h3>{_html.escape(title)}</h3>" if title else ""
    note = "<p>nearest vocabulary tokens by cosine similarity to the input embedding matrix</p>"
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{style}</style></head><body>{caption}{note}'
            f'<table><tr><th>virtual token</th>{head}</tr>{"".join(body)}</table></body></html>')
