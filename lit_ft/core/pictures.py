"""Pictures a technique logs: one place that writes a matplotlib figure as a PNG under the run's log dir and, when a
``WandbLogger`` is attached, logs the same file as a W&B image.

Techniques draw with :func:`new_figure` (matplotlib's Agg canvas directly: no global backend switch, safe on headless
machines and inside notebooks) and hand the figure to :func:`log_figure`; every rank must call :func:`log_figure`
(``trainer.log_dir`` is broadcast), only rank 0 writes. Paths: ``<log_dir>/<technique>/<name>_step{step}.png``.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["new_figure", "figure_path", "save_figure", "log_figure"]


def new_figure(width: float = 7.0, height: float = 3.6, dpi: int = 100) -> Any:
    """A matplotlib ``Figure`` with an Agg canvas attached (not registered with pyplot)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def figure_path(root: str, technique: str, name: str, step: int) -> str:
    """``<root>/<technique>/<name>_step{step}.png``."""
    return os.path.join(str(root), technique, f"{name}_step{int(step)}.png")


def save_figure(fig: Any, path: str) -> str:
    """Write ``fig`` as a PNG at ``path`` (folders created); returns ``path``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


def log_figure(trainer: Any, fig: Any, technique: str, name: str, step: int) -> str | None:
    """Save ``fig`` under the trainer's log dir and log it to W&B (key ``lit_ft/<technique>/<name>``) when a
    ``WandbLogger`` is attached. Call on every rank; returns the path on rank 0, ``None`` elsewhere."""
    from lightning.pytorch.loggers import WandbLogger

    root = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank must ask
    if not trainer.is_global_zero:
        return None
    path = save_figure(fig, figure_path(root, technique, name, step))
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key=f"lit_ft/{technique}/{name}", images=[path], step=step)
    return path
