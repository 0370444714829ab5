"""Adapters family: LiST linear adapters, parallel / scaled-parallel (MAM), DSEE, bottleneck. Adapters follow the prompt
life cycle (``docs/architecture.md``, "Prompts"): inserted at setup before the optimizer exists, the backbone frozen
through the parameter plan registry, their own optimizer groups (:mod:`lit_ft.core.optim`), small safetensors + JSON
artifacts, merged where exact. No technique is in this family yet."""
