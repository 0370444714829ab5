"""Side computations on a training batch, outside the real step, that leave no trace: a probe forward through the
module's own ``training_step`` (no ``self.log``, no token-loss window bookkeeping, the random stream untouched), and
the measured FLOPs fraction of a technique's real step against the plain step it replaces.

:class:`StepFlopsFraction` is how every technique that claims to save compute logs
``lit_ft/<technique>/flops_fraction`` (see :mod:`lit_ft.core.flops`): at a measured step it counts, with
FlopCounterMode, (1) a probe forward + backward of the batch with the parameters the technique froze made trainable
again (the full fine-tuning step) and (2) the real step, from ``training_step`` through ``on_after_backward``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from lit_ft.core.flops import TrainingStepFlops, log_flops_fraction, measured_step
from lit_ft.core.loss import token_pipeline_for


def rng_devices(pl_module: Any) -> list[int]:
    """The CUDA devices whose random state a probe must fork (none on CPU)."""
    dev = getattr(pl_module, "device", torch.device("cpu"))
    if isinstance(dev, torch.device) and dev.type == "cuda":
        return [dev.index if dev.index is not None else torch.cuda.current_device()]
    return []


@contextlib.contextmanager
def quiet(pl_module: Any) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` do nothing inside (a probe's forward must not log as if it were the step)."""
    noop = lambda *a, **k: None  # noqa: E731
    pl_module.__dict__["log"] = noop
    pl_module.__dict__["log_dict"] = noop
    try:
        yield
    finally:
        pl_module.__dict__.pop("log", None)
        pl_module.__dict__.pop("log_dict", None)


def probe_loss(trainer: Any, pl_module: Any, batch: Any, who: str, plain: bool = False) -> torch.Tensor:
    """The loss the module's own ``training_step`` returns on ``batch``, as a side computation; ``plain``: without
    lit_ft's token scorers and objectives (the plain fine-tuning step)."""
    # created if missing: a TokenLossMixin module makes its pipeline at its first loss, which may be this probe
    pipe = token_pipeline_for(pl_module)
    window = pipe.side_computation(plain) if pipe is not None else contextlib.nullcontext()
    with quiet(pl_module), trainer.strategy.precision_plugin.train_step_context(), window:
        out = type(pl_module).training_step(pl_module, batch, 0)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise RuntimeError(f"{who}: training_step returned {type(out).__name__} on the probe batch; it must return the "
                           "loss tensor (or a dict with 'loss').")
    return loss


def flops_monitor_of(owner: Any, technique: str) -> "StepFlopsFraction":
    """The :class:`StepFlopsFraction` a callback keeps in its ``__dict__`` (made on first use, so the callback's
    constructor and pickling stay untouched)."""
    mon = owner.__dict__.get("_flops_monitor")
    if mon is None:
        mon = owner.__dict__["_flops_monitor"] = StepFlopsFraction(technique)
    return mon


class StepFlopsFraction:
    """Measured FLOPs of the real step / FLOPs of the full step on the same batch.

    Two ways to drive it. Probe first (GreenTrainer): :meth:`start` at ``on_train_batch_start`` probes the full step
    and arms the real step's count. Probe after: :meth:`arm` (e.g. at the previous ``on_train_batch_end``) arms the
    real step's count and :meth:`probe` at its ``on_train_batch_end`` counts the full step on the same batch (FLOPs do
    not depend on the weights, which the optimizer step has moved meanwhile). Either way :meth:`after_backward`
    goes in ``on_after_backward``, :meth:`batch_end` in ``on_train_batch_end`` (after a probe: it logs a new
    measurement) and :meth:`abort` in ``on_exception``.
    """

    def __init__(self, technique: str) -> None:
        self.technique = technique
        self.fraction: float | None = None
        self.step_flops: float | None = None
        self.full_flops: float | None = None
        self.measurements: list[tuple[int, float, float]] = []
        self.last_step: int | None = None
        self._full: float | None = None
        self._real: float | None = None
        self._extra = 0.0  # FLOPs of the real step spent outside training_step (a scoring pass at batch start)
        self._step = TrainingStepFlops()
        self._fresh = False

    def due(self, trainer: Any, pl_module: Any, every_n_steps: int, step: int | None = None) -> bool:
        """Every ``every_n_steps`` optimizer steps (0 = never), once per step, at an accumulation window's start."""
        step = trainer.global_step if step is None else step
        if not every_n_steps or step % every_n_steps or step == self.last_step:
            return False
        pipe = token_pipeline_for(pl_module, create=False)
        return not (pipe is not None and pipe.mid_window)

    def probe(self, trainer: Any, pl_module: Any, batch: Any, full_trainable: Sequence[str],
              plain: bool = False) -> None:
        """Count a forward + backward of ``batch`` with ``full_trainable`` made trainable (the full step);
        ``plain``: without lit_ft's token scorers and objectives (see :func:`probe_loss`)."""
        named = dict(pl_module.named_parameters())
        saved = {n: p.requires_grad for n, p in named.items()}
        try:
            with torch.random.fork_rng(devices=rng_devices(pl_module)):
                for n in full_trainable:
                    named[n].requires_grad_(True)
                with measured_step() as full, torch.enable_grad():
                    loss = probe_loss(trainer, pl_module, batch, self.technique, plain)
                    params = [named[n] for n in full_trainable]
                    if loss.requires_grad and params:
                        # autograd.grad, not backward(): no .grad written, no DDP reducer hook fired
                        torch.autograd.grad(loss, params, allow_unused=True)
            self._full = full.total
        finally:
            for n, p in named.items():
                p.requires_grad_(saved[n])
        self._finish(trainer)

    def arm(self, trainer: Any, pl_module: Any, step: int | None = None) -> None:
        """Count the module's next real ``training_step`` (through ``on_after_backward``)."""
        self.last_step = trainer.global_step if step is None else step
        self._full = self._real = None
        self._extra = 0.0
        self._step.arm(pl_module)

    def start(self, trainer: Any, pl_module: Any, batch: Any, full_trainable: Sequence[str],
              plain: bool = False) -> None:
        """Probe first: count the full step now, then arm the real step's count."""
        self.last_step = trainer.global_step
        self._full = self._real = None
        self._extra = 0.0
        # before arming: the probe's own training_step is not the real one
        self.probe(trainer, pl_module, batch, full_trainable, plain)
        self._step.arm(pl_module)

    def after_backward(self, trainer: Any) -> None:
        if not self._step.counting:
            return
        real = self._step.stop(record=True)
        self._real = None if real is None else real + self._extra
        self._finish(trainer)

    def add_to_real(self, flops: float) -> None:
        """Count work the real step does outside ``training_step`` (e.g. Q-Tuning's scoring forward at batch start)."""
        self._extra += float(flops)

    def _finish(self, trainer: Any) -> None:
        if self._real is None or not self._full:
            return
        self.step_flops, self.full_flops = self._real, self._full
        self.fraction = self._real / self._full
        self.measurements.append((self.last_step, self._real, self._full))  # the step count when it was armed
        self._real = self._full = None
        self._fresh = True

    @property
    def counted(self) -> bool:
        """A real step was counted and waits for its probe."""
        return self._real is not None

    def batch_end(self, pl_module: Any) -> bool:
        """Disarm a step that skipped its backward; log a new measurement. Returns whether one was logged."""
        if self._step.armed:
            self._step.stop(record=False)
        if not self._fresh:
            return False
        self._fresh = False
        log_flops_fraction(pl_module, self.technique, self.step_flops, self.full_flops)
        return True

    def abort(self) -> None:
        if self._step.armed:
            self._step.stop(record=False)
        self._real = self._full = None
