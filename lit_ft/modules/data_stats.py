"""Log the DataModule's accounting (samples, truncation, drops) so truncation is visible in the run's logs."""

from __future__ import annotations

import lightning.pytorch as pl


def log_data_stats(module: pl.LightningModule) -> dict[str, float]:
    """Send ``trainer.datamodule.stats`` (lit_ft DataModules fill it at setup) to every logger as ``data/<key>``.

    Returns what was logged (empty when the DataModule has no stats)."""
    dm = getattr(module.trainer, "datamodule", None)
    stats = getattr(dm, "stats", None) or {}
    metrics = {f"data/{k}": float(v) for k, v in stats.items() if isinstance(v, (int, float))}
    if metrics and module.trainer.is_global_zero:
        for lg in module.loggers:
            lg.log_metrics(metrics, step=0)
    return metrics
