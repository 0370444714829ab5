"""``lit-ft fit --config <any config> --quick``: the same run, a few steps long, that still shows its effect.

A shipped config is sized to show its technique's effect (hundreds of steps, a held-out set of 64-200 examples, a
metric logged every 10 steps). ``--quick`` keeps the model, data and technique of the config and shrinks only what
costs time, so a first try takes a minute or two and still prints something worth reading:

* ``trainer.max_steps`` capped at :data:`QUICK_STEPS`, validation once at the last step (``val_check_interval`` =
  that step, ``check_val_every_n_epoch`` off so a short epoch cannot skip it), ``limit_val_batches`` 2, no sanity
  check, ``log_every_n_steps`` 1 (the technique's ``lit_ft/*`` metrics appear in the logs);
* a module that evaluates generation (``eval_exact_match``) generates for at most 4 prompts;
* a DataModule with a held-out cap (``max_val_samples``) keeps at most 16.

What changed is printed, so a quick run is never mistaken for the real one. Technique arguments are left alone.
"""

from __future__ import annotations

from typing import Any

__all__ = ["QUICK_STEPS", "apply_quick_mode"]

QUICK_STEPS = 5
_QUICK_TRAINER = {"limit_val_batches": 2, "num_sanity_val_steps": 0, "log_every_n_steps": 1}
_QUICK_CAPS = {"model": {"eval_exact_match": 4}, "data": {"max_val_samples": 16}}


def _init_args(section: Any) -> Any:
    """The ``init_args`` namespace of a ``class_path`` section (subclass mode), or ``None``."""
    return getattr(section, "init_args", None) if section is not None else None


def apply_quick_mode(cfg: Any) -> list[str]:
    """Shrink the parsed ``fit`` config ``cfg`` (a jsonargparse ``Namespace``) in place; returns ``key: old -> new``
    lines for what changed."""
    changes: list[str] = []

    def put(owner: Any, key: str, value: Any, label: str) -> None:
        old = getattr(owner, key, None)
        if old != value:
            setattr(owner, key, value)
            changes.append(f"{label}: {old!r} -> {value!r}")

    trainer = cfg.trainer
    steps = trainer.max_steps if trainer.max_steps is not None and trainer.max_steps > 0 else None
    steps = QUICK_STEPS if steps is None else min(steps, QUICK_STEPS)
    put(trainer, "max_steps", steps, "trainer.max_steps")
    put(trainer, "val_check_interval", steps, "trainer.val_check_interval")
    put(trainer, "check_val_every_n_epoch", None, "trainer.check_val_every_n_epoch")
    for key, value in _QUICK_TRAINER.items():
        put(trainer, key, value, f"trainer.{key}")
    for section, caps in _QUICK_CAPS.items():
        args = _init_args(getattr(cfg, section, None))
        if args is None:
            continue
        for key, cap in caps.items():
            old = getattr(args, key, None)
            # only a positive setting shrinks: 0 / None mean "off" or "all" and are the config's choice to keep
            if isinstance(old, int) and not isinstance(old, bool) and old > cap:
                put(args, key, cap, f"{section}.init_args.{key}")
    return changes
