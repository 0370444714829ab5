"""Setup-time checks of the Lightning strategy, shared by techniques, so that a combination that would train wrongly
is refused with one clear message instead of running (see docs/compatibility.md for what runs where)."""

from __future__ import annotations

from typing import Any

__all__ = ["require_unused_parameter_tolerance", "refuse_sharded_strategies", "is_sharded_strategy"]


def is_sharded_strategy(trainer: Any) -> str | None:
    """The name of ``trainer``'s strategy when it shards parameters (FSDP, FSDP2 through ``ModelParallelStrategy``,
    DeepSpeed), else ``None``."""
    strategy = getattr(trainer, "strategy", None)
    name = type(strategy).__name__
    if "FSDP" in name or "DeepSpeed" in name or "ModelParallel" in name:
        return name
    return None


def refuse_sharded_strategies(trainer: Any, who: str, why: str) -> None:
    """Raise ``ValueError`` naming ``who``, the strategy and ``why`` when ``trainer`` shards parameters."""
    name = is_sharded_strategy(trainer)
    if name is not None:
        raise ValueError(f"{who} does not support {name} yet: {why}. Use DDP or a single device.")


def require_unused_parameter_tolerance(trainer: Any, who: str, why: str) -> None:
    """Under multi-process DDP, require ``find_unused_parameters=True`` (and no ``static_graph``): a technique that
    leaves parameters without gradients otherwise stalls DDP's gradient buckets, whose all-reduce then never
    runs, so the ranks' updates silently diverge (or DDP fails steps later). ``DeepSpeedStrategy`` (recognised by
    its class name: deepspeed need not be installed) is refused with the reason instead."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = getattr(trainer, "strategy", None)
    if "DeepSpeed" in type(strategy).__name__:
        # Lightning's DeepSpeedStrategy subclasses DDPStrategy, but the DDP advice below does not apply to it
        raise ValueError(f"{who} does not support {type(strategy).__name__}: it {why}, which is tested only under DDP "
                         "with find_unused_parameters=True. Use strategy='ddp_find_unused_parameters_true' or a "
                         "single device.")
    world = getattr(trainer, "world_size", None)  # unknown (a bare strategy holder): checked
    if not isinstance(strategy, DDPStrategy) or (world is not None and world <= 1):
        return
    kw = getattr(strategy, "_ddp_kwargs", {}) or {}
    if not kw.get("find_unused_parameters", False) or kw.get("static_graph", False):
        raise ValueError(
            f"{who} {why}, so DDP must tolerate parameters without gradients: use "
            "strategy='ddp_find_unused_parameters_true' (or DDPStrategy(find_unused_parameters=True), e.g. with "
            f"start_method='spawn'); got {type(strategy).__name__} with "
            f"find_unused_parameters={kw.get('find_unused_parameters', False)}, static_graph="
            f"{kw.get('static_graph', False)}."
        )
