"""Analysis family: tuning contribution (TuCo), forgetting and conjugate prompting, token-distribution shift —
monitoring callbacks over the torchmetrics Metrics in :mod:`lit_ft.metrics` that measure at validation time, log
under ``lit_ft/<technique>/``, draw pictures (:mod:`lit_ft.core.pictures`) and never change training."""

from lit_ft.callbacks.analysis.forgetting_monitor import ForgettingMonitor, evaluate_forgetting
from lit_ft.callbacks.analysis.token_distribution_shift import (
    TokenDistributionShift,
    evaluate_token_distribution_shift,
)
from lit_ft.callbacks.analysis.tuning_contribution import TuningContribution

__all__ = ["ForgettingMonitor", "TokenDistributionShift", "evaluate_forgetting", "TuningContribution", "evaluate_token_distribution_shift"]
