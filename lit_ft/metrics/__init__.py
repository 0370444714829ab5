"""torchmetrics Metrics of the analysis family: usable on their own (``MetricCollection``, DDP-synchronised states)
and run at validation time by the monitoring callbacks in :mod:`lit_ft.callbacks.analysis`."""

from lit_ft.metrics.forgetting import ForgettingMetric
from lit_ft.metrics.token_distribution_shift import TokenDistributionShiftMetric, base_ranks, categorize
from lit_ft.metrics.tuning_contribution import (
    TuningContributionMetric,
    evaluate_tuning_contribution,
    scale_fine_tuning_component,
    tuning_components,
)

__all__ = ["ForgettingMetric", "TokenDistributionShiftMetric", "TuningContributionMetric", "base_ranks", "categorize",
           "evaluate_tuning_contribution", "scale_fine_tuning_component", "tuning_components"]
