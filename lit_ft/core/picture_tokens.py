"""The token-selection picture: an HTML heat-map of a few training rows, each token coloured by what a token scorer
decided for it (kept / dropped, and its loss weight), with a legend.

:func:`capture_rows` copies the first rows of one micro-batch's decision to the CPU (the only tensors kept, and only
until the picture is drawn); :func:`token_heatmap_html` renders them. Target space as in
:class:`~lit_ft.core.loss.TokenScores`: decision ``t`` concerns token ``t + 1``, so the first token of a row is shown
as context (never scored).
"""

from __future__ import annotations

import html as _html
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["TokenRows", "capture_rows", "find_tokenizer", "token_text", "token_heatmap_html", "KEPT", "DROPPED", "UNSCORED"]

#: CSS classes of a token cell (tests and readers of the page can rely on them)
KEPT, DROPPED, UNSCORED = "kept", "dropped", "unscored"


@dataclass
class TokenRows:
    """The first rows of one micro-batch, on the CPU. ``tokens`` ``[n, T]``: the row's token ids (-1 = unknown);
    ``valid`` / ``keep`` ``[n, T]`` (bool) and ``weights`` ``[n, T]`` (float, ``None`` when the scorer gives none),
    in target space: position ``t`` decides token ``t + 1``."""

    tokens: torch.Tensor
    valid: torch.Tensor
    keep: torch.Tensor
    weights: torch.Tensor | None


def capture_rows(scores: Any, decision: Any, n_rows: int) -> TokenRows:
    """The first ``n_rows`` rows of a scorer's ``decision`` (a :class:`~lit_ft.core.loss.TokenDecision`) on
    ``scores`` (its :class:`~lit_ft.core.loss.TokenScores`), detached and copied to the CPU."""
    n = max(1, int(n_rows))
    targets = scores.targets[:n].detach().cpu()
    valid = scores.valid[:n].detach().cpu().bool()
    keep = valid if decision.keep is None else valid & decision.keep[:n].detach().cpu().bool()
    weights = None if decision.weights is None else decision.weights[:n].detach().float().cpu()
    batch = scores.batch if hasattr(scores.batch, "get") else {}
    ids = batch.get("input_ids")
    T = targets.shape[1]
    # token j of a row is decided at target position j - 1; where there is a target, show it (a scorer that
    # edited the labels sees its targets), else the input token (-1 = unknown: no input ids in the batch)
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and ids.shape[1] == T:
        tokens = ids[:n].detach().cpu().long().clone()
    else:  # a user's own forward without input ids in the bound batch
        tokens = torch.full_like(targets, -1)
    tokens[:, 1:] = torch.where(valid[:, :-1], targets[:, :-1].long(), tokens[:, 1:])
    return TokenRows(tokens=tokens, valid=valid, keep=keep, weights=weights)


def find_tokenizer(trainer: Any, pl_module: Any) -> Any:
    """The tokenizer of the DataModule (``trainer.datamodule.tokenizer``), else of the module (``.tokenizer``),
    else ``None`` (the picture then shows token ids)."""
    for owner in (getattr(trainer, "datamodule", None), pl_module):
        tok = getattr(owner, "tokenizer", None) if owner is not None else None
        if tok is not None and hasattr(tok, "decode"):
            return tok
    return None


_VISIBLE = {"\n": "\u21b5", "\t": "\u21e5", " ": "\u00b7"}


def token_text(tokenizer: Any, token_id: int) -> str:
    """How a token is shown: decoded by ``tokenizer`` (``"?"`` for -1; the id itself without a tokenizer or for an id
    it cannot decode), whitespace made visible (space ``·``, newline ``↵``, tab ``⇥``, other control characters as
    ``\\xNN``) and ``∅`` for a token that decodes to nothing."""
    if token_id < 0:
        return "?"
    if tokenizer is None:
        return str(token_id)
    try:
        text = tokenizer.decode([token_id])
    except Exception:  # an id outside the tokenizer's vocabulary (a model with a larger embedding table)
        return str(token_id)
    out = "".join(_VISIBLE.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in text)
    return out or "\u2205"


def _cell_style(kept: bool, weight: float | None, w_max: float) -> str:
    if not kept:
        return "background:#f4c7c3;color:#7a1d16;text-decoration:line-through"
    if weight is None or w_max <= 0:
        return "background:#b7e1cd"
    # kept: green, darker the larger the weight relative to the largest weight shown
    a = min(1.0, max(0.08, weight / w_max))
    return f"background:rgba(15,157,88,{a:.2f})"


def token_heatmap_html(rows: TokenRows, tokenizer: Any = None, title: str = "") -> str:
    """A self-contained HTML page: one line per row, each token a ``<span class="tok kept|dropped|unscored">``
    with ``data-id`` (token id), ``data-weight`` (kept tokens with weights) and a tooltip; then a legend."""
    n, width = rows.tokens.shape
    weights = rows.weights
    shown_w = weights[rows.keep] if weights is not None and rows.keep.any() else None
    w_max = float(shown_w.max()) if shown_w is not None and shown_w.numel() else 0.0
    lines = []
    for r in range(n):
        cells = []
        for j in range(width):
            tid = int(rows.tokens[r, j])
            t = j - 1  # decision index of this token
            piece = _html.escape(token_text(tokenizer, tid))
            if t < 0 or t >= rows.valid.shape[1] or not bool(rows.valid[r, t]):
                cells.append(f'<span class="tok {UNSCORED}" data-id="{tid}" title="id {tid}: no loss">{piece}</span>')
                continue
            kept = bool(rows.keep[r, t])
            w = float(weights[r, t]) if weights is not None else None
            style = _cell_style(kept, w, w_max)
            wattr = f' data-weight="{w:.4g}"' if w is not None and kept else ""
            tip = f"id {tid}: {'kept' if kept else 'dropped'}" + (f", weight {w:.4g}" if w is not None and kept else "")
            cls = KEPT if kept else DROPPED
            cells.append(f'<span class="tok {cls}" data-id="{tid}"{wattr} style="{style}" title="{tip}">{piece}</span>')
        lines.append(f'<div class="row"><span class="rowlabel">row {r}</span>{"".join(cells)}</div>')
    wnote = f"; green shade = loss weight (darkest = {w_max:.4g})" if weights is not None else ""
    legend = (
        '<div class="legend">'
        f'<span class="tok {KEPT}" style="background:#b7e1cd">kept</span> '
        f'<span class="tok {DROPPED}" style="background:#f4c7c3;text-decoration:line-through">dropped</span> '
        f'<span class="tok {UNSCORED}">no loss (prompt, padding, first token)</span>'
        f'{_html.escape(wnote)}</div>'
    )
    style = (
        "body{font-family:monospace;font-size:13px}.row{margin:4px 0;line-height:1.9}"
        ".tok{padding:1px 2px;margin:0 1px;border-radius:3px;white-space:pre}.unscored{color:#888}"
        ".rowlabel{color:#555;margin-right:8px}.legend{margin-top:10px;color:#333}"
    )
    head = f"<h3>{_html.escape(title)}</h3>" if title else ""
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><style>{style}</style></head><body>{head}'
            f'{"".join(lines)}{legend}</body></html>')
