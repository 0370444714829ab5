"""Analysis family: tuning contribution (TuCo), forgetting and conjugate prompting, token-distribution shift —
callbacks over torchmetrics Metrics (``lit_ft/metrics``) that measure, log under ``lit_ft/<technique>/`` and never
change training. No technique is in this family yet."""
