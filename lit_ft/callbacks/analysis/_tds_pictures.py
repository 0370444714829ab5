"""TokenDistributionShift's pictures (drawn with lit_ft.core.pictures.new_figure, logged by the callback): the share
of each kind of position along the answer, a few answers with every token coloured by its kind, and the most often
shifted tokens. Each function returns the figure; tests read the plotted data back from its artists."""

from __future__ import annotations

import math
from typing import Any

import torch

from lit_ft.core.pictures import new_figure
from lit_ft.metrics.token_distribution_shift import CATEGORIES

#: unshifted, marginal, shifted (the paper's demo colours: calm for unshifted, warm for shifted)
COLORS: tuple[str, ...] = ("#d9e8f5", "#f6d55c", "#ed553b")


def position_curve(position_shares: torch.Tensor, position_counts: torch.Tensor) -> Any:
    """One line per kind: its share at each answer position reached by at least one answer (x = position)."""
    fig = new_figure(7.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    reached = torch.nonzero(position_counts > 0).flatten()
    xs = reached.tolist()
    for i, name in enumerate(CATEGORIES):
        ax.plot(xs, position_shares[reached, i].tolist(), marker="o", ms=3, color=COLORS[i] if i else "#3c6e9f",
                label=name)
    ax.set_xlabel("answer position")
    ax.set_ylabel("share of positions")
    ax.set_ylim(0, 1)
    ax.set_title("token distribution shift by position")
    ax.legend(loc="best", fontsize=8)
    return fig


def answer_heatmap(token_texts: list[list[str]], categories: list[list[int]]) -> Any:
    """One row per answer, one cell per answer token coloured by its kind (0/1/2) and labelled with its text;
    cells past an answer's end are blank (NaN)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    rows = len(token_texts)
    cols = max((len(t) for t in token_texts), default=0)
    grid = torch.full((max(rows, 1), max(cols, 1)), math.nan)
    for r, cats in enumerate(categories):
        grid[r, : len(cats)] = torch.tensor(cats, dtype=torch.float32)
    fig = new_figure(max(6.0, 0.55 * cols), 0.6 + 0.45 * max(rows, 1))
    ax = fig.add_subplot(1, 1, 1)
    cmap = ListedColormap(list(COLORS)).with_extremes(bad="white")
    ax.imshow(grid.numpy(), cmap=cmap, norm=BoundaryNorm([-0.5, 0.5, 1.5, 2.5], 3), aspect="auto",
              interpolation="nearest")
    for r, texts in enumerate(token_texts):
        for c, text in enumerate(texts):
            ax.text(c, r, text, ha="center", va="center", fontsize=6)
    ax.set_xlabel("answer position")
    ax.set_ylabel("answer")
    ax.set_yticks(range(rows))
    ax.set_title("answers: " + ", ".join(f"{name} = {color}" for name, color in zip(CATEGORIES, COLORS)),
                 fontsize=8)
    return fig


def top_shifted_bars(labels: list[str], shifted: list[int], seen: list[int]) -> Any:
    """Horizontal bars: how often each token was shifted (the most shifted on top), annotated ``shifted/seen``."""
    fig = new_figure(6.0, 0.8 + 0.28 * max(len(labels), 1))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(labels)))[::-1]
    ax.barh(ys, shifted, color=COLORS[2])
    ax.set_yticks(ys)
    ax.set_yticklabels(labels, fontsize=7)
    for y, s, n in zip(ys, shifted, seen):
        ax.text(s, y, f" {s}/{n}", va="center", fontsize=7)
    ax.set_xlabel("times shifted (/ times decoded)")
    ax.set_title("most frequently shifted tokens")
    return fig
