"""Pictures a technique logs: one place that writes a matplotlib figure as a PNG under the run's log dir and, when a
``WandbLogger`` is attached, logs the same file as a W&B image.

Techniques draw with :func:`new_figure` (matplotlib's Agg canvas directly: no global backend switch, safe on headless
machines and inside notebooks) and hand the figure to :func:`log_figure`; every rank must call :func:`log_figure`
(``trainer.log_dir`` is broadcast), only rank 0 writes — so a figure need only be built on rank 0 (pass ``None``
elsewhere). Paths: ``<log_dir>/<technique>/<name>_step{step}.png``. :func:`log_html` does the same for an HTML page
(``<name>_step{step}.html``, W&B ``wandb.Html``).

The family bases (token scorers, parameter plans, prompts) draw every ``picture_every_n_steps`` optimizer steps
(:func:`check_picture_every`, :func:`is_picture_step`); the drawings are :mod:`lit_ft.core.picture_tokens`,
:mod:`lit_ft.core.picture_params` and :mod:`lit_ft.core.picture_prompts`.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = [
    "new_figure", "figure_path", "save_figure", "log_figure", "html_path", "log_html", "check_picture_every",
    "is_picture_step", "PictureEvery",
]


class PictureEvery:
    """Mixin of the family bases: ``picture_every_n_steps`` (0 = no pictures, the default), checked whenever it is
    set — by every technique's constructor argument (so from YAML and the CLI) or by assignment
    (``cb.picture_every_n_steps = 50``)."""

    _picture_every: int = 0

    @property
    def picture_every_n_steps(self) -> int:
        """Every how many optimizer steps the family's picture is drawn (0 = never)."""
        return self._picture_every

    @picture_every_n_steps.setter
    def picture_every_n_steps(self, value: int) -> None:
        self._picture_every = check_picture_every(type(self).__name__, value)


def check_picture_every(owner: str, value: Any, argname: str = "picture_every_n_steps") -> int:
    """``value`` if it is an int >= 0 (0 = no pictures); raises naming ``owner`` and ``argname`` otherwise."""
    from lit_ft.core.validate import check_int

    out = check_int(owner, argname, value, minimum=0)
    assert out is not None
    return out


def is_picture_step(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (1-based: the steps done once it ends) gets a picture: ``every > 0`` and
    ``step`` a positive multiple of it. The same answer on every rank (it reads only the step count)."""
    return every > 0 and step > 0 and step % every == 0


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
    ``WandbLogger`` is attached. Call on every rank (``fig`` may be ``None`` except on rank 0); returns the path on
    rank 0, ``None`` elsewhere."""
    from lightning.pytorch.loggers import WandbLogger

    root = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank must ask
    if not trainer.is_global_zero:
        return None
    path = save_figure(fig, figure_path(root, technique, name, step))
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            lg.log_image(key=f"lit_ft/{technique}/{name}", images=[path], step=step)
    return path


def html_path(root: str, technique: str, name: str, step: int) -> str:
    """``<root>/<technique>/<name>_step{step}.html``."""
    return os.path.join(str(root), technique, f"{name}_step{int(step)}.html")


def log_html(trainer: Any, html: str | None, technique: str, name: str, step: int) -> str | None:
    """Write the HTML page ``html`` under the trainer's log dir (``<log_dir>/<technique>/<name>_step{step}.html``)
    and log it to W&B as ``wandb.Html`` (key ``lit_ft/<technique>/<name>``) when a ``WandbLogger`` is attached.
    Call on every rank (``html`` may be ``None`` except on rank 0: only rank 0 writes); returns the path on rank 0,
    ``None`` elsewhere or when rank 0 has no page."""
    from lightning.pytorch.loggers import WandbLogger

    root = trainer.log_dir or trainer.default_root_dir  # log_dir broadcasts: every rank must ask
    if not trainer.is_global_zero or html is None:
        return None
    path = html_path(root, technique, name, step)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(html)
    for lg in trainer.loggers:
        if isinstance(lg, WandbLogger):
            import wandb

            lg.log_metrics({f"lit_ft/{technique}/{name}": wandb.Html(html)}, step=step)
    return path
