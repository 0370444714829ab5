"""Adapters family: LiST linear adapters, parallel / scaled-parallel (MAM), DSEE, approximated prompts, bottleneck.
Adapters follow the shared life cycle of :class:`lit_ft.callbacks._adapter.AdapterCallback` (``docs/architecture.md``,
"Adapters"): inserted at setup before the optimizer exists by forward hooks on named modules
(:mod:`lit_ft.core.adapters`), the backbone frozen through the parameter plan registry, their own optimizer groups,
small safetensors + JSON artifacts, merged into the base weights where exact."""

from lit_ft.callbacks.adapters.approximated_prompt import ApproximatedPrompt
from lit_ft.callbacks.adapters.bottleneck import BottleneckAdapters
from lit_ft.callbacks.adapters.dsee import DSEE
from lit_ft.callbacks.adapters.linear import LinearAdapters
from lit_ft.callbacks.adapters.mam import MAM
from lit_ft.callbacks.adapters.parallel import ParallelAdapters

__all__ = ["ApproximatedPrompt", "BottleneckAdapters", "DSEE", "LinearAdapters", "MAM", "ParallelAdapters"]
