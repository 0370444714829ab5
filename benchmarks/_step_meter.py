"""A Lightning callback the CPU benchmarks share: training-step times after a few warm-up steps, and the peak
resident-memory increase from the start of training (``benchmarks/_rss.py``)."""

from __future__ import annotations

import time

import lightning.pytorch as pl

from benchmarks._rss import reset_peak_rss, rss_bytes


class StepMeter(pl.Callback):
    """Times training steps after ``skip`` warm-up steps; ``base_rss`` is the resident memory when training starts
    (model and data loaded, no step taken), from which the peak is measured."""

    def __init__(self, skip: int = 2) -> None:
        self.skip = skip
        self.times: list[float] = []
        self.base_rss = 0
        self._t0 = 0.0

    def on_train_start(self, trainer, pl_module):  # noqa: ANN001
        # freed activations stay resident (the allocator keeps them), so the peak is taken over the whole run
        self.base_rss = rss_bytes()
        reset_peak_rss()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
        if batch_idx >= self.skip:
            self.times.append(time.perf_counter() - self._t0)
