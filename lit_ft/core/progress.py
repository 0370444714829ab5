"""Progress on the long phases lit_ft runs outside Lightning's own loops: the evaluation before training and the
exact-match generation, reference scoring, asset download and conversion.

One helper, :func:`progress`, wraps an iterable in a ``tqdm`` bar on stderr (tqdm rather than rich: Lightning's
``RichProgressBar`` holds rich's single live display during fit, and a second rich bar would raise). The bar is
transient (``leave=False``), drawn on rank 0 only, and off when ``LIT_FT_PROGRESS=0`` (logs of batch jobs) or when
the caller passes ``enabled=False``.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator, TypeVar

__all__ = ["progress", "progress_enabled"]

T = TypeVar("T")


def progress_enabled(is_global_zero: bool = True) -> bool:
    """Whether bars are drawn here: rank 0 (the caller's ``is_global_zero`` and Lightning's process rank), and
    ``LIT_FT_PROGRESS`` not set to ``0`` / ``false`` / ``no`` / ``off``."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    off = os.environ.get("LIT_FT_PROGRESS", "").strip().lower() in ("0", "false", "no", "off")
    return bool(is_global_zero) and getattr(rank_zero_only, "rank", 0) == 0 and not off


def progress(iterable: Iterable[T], desc: str, total: int | None = None, enabled: bool = True,
             unit: str = "batch") -> Iterator[T]:
    """``iterable`` with a transient progress bar labelled ``desc`` (``total`` items when known)."""
    if not (enabled and progress_enabled()):
        yield from iterable
        return
    from tqdm.auto import tqdm

    with tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True) as bar:
        yield from bar
