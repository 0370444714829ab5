"""Counting FLOPs: one profiler for every technique that claims to save compute.

What is counted: :class:`torch.utils.flop_counter.FlopCounterMode` counts matmul-class ops (mm, addmm, bmm, SDPA,
conv); elementwise ops (norms, activations, the embedding gather) count 0. lit_ft's fused linear-CE op computes
the lm_head matmuls inside one custom op, which FlopCounterMode would count as 0: every counter made here
(:func:`flop_counter`, :func:`measured_step`, :class:`TrainingStepFlops`) registers its FLOP formulas first
(``lit_ft/kernels/token_ce/flops.py``), so the kept tokens' lm_head work is counted.

Logging convention: a technique that claims to save compute measures, on the same batch in the same process, the
FLOPs of its real training step (forward + backward) and of the plain step it replaces (the baseline, e.g. full
back-propagation for GreenTrainer, every token kept for a token-dropping technique), and logs their ratio as
``lit_ft/<technique>/flops_fraction`` with :func:`log_flops_fraction` (< 1 = compute saved). Measuring is not free
(the baseline step runs once more and FlopCounterMode slows the counted step), so techniques measure every N steps
and say how often in an argument.

Per-tensor FLOPs (:func:`profile_tensor_flops` → :class:`FlopsProfile`): the weight-gradient FLOPs of every
parameter tensor and the activation-gradient FLOPs that back-propagation spends to reach it, measured on one real
batch (GreenTrainer's cost model; any tensor-selection technique with a FLOPs budget can use it).
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    import lightning.pytorch as pl

__all__ = [
    "flop_counter", "FlopCount", "measured_step", "TrainingStepFlops", "log_flops_fraction",
    "FlopsProfile", "profile_tensor_flops",
]


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------


def flop_counter() -> FlopCounterMode:
    """A silent :class:`FlopCounterMode` that also counts lit_ft's fused ops (their FLOP formulas are registered
    here, once: ``lit_ft.kernels.token_ce.flops.register``)."""
    from lit_ft.kernels.token_ce.flops import register

    register()
    return _EagerFlopCounterMode(display=False)


class _EagerUnderThisMode:
    """A dispatch mode (mixin, before the mode class) under which a ``torch.compile``-d model runs eagerly: the
    same ops, so the same counts.

    Dynamo cannot trace under an active dispatch mode: it skips the frame and keeps skipping that code for the rest
    of the run, so a step counted at step 0 (every technique that measures its FLOPs fraction does) would leave a
    compiled model eager for good. ``force_eager`` runs the counted code eagerly without that verdict; later steps
    compile. Dynamo is only touched when something imported it (nothing is compiled otherwise)."""

    def __enter__(self) -> Any:
        self._stance = _force_eager()
        try:
            return super().__enter__()  # type: ignore[misc]
        except BaseException:
            _restore(self.__dict__.pop("_stance", None))
            raise

    def __exit__(self, *args: Any) -> Any:
        try:
            return super().__exit__(*args)  # type: ignore[misc]
        finally:
            _restore(self.__dict__.pop("_stance", None))


class _EagerFlopCounterMode(_EagerUnderThisMode, FlopCounterMode):
    """lit_ft's FlopCounterMode (see :class:`_EagerUnderThisMode`)."""


def _force_eager() -> Any:
    """Enter dynamo's ``force_eager`` stance when dynamo is loaded; the handle :func:`_restore` exits."""
    if "torch._dynamo.eval_frame" not in sys.modules:
        return None
    stance = torch.compiler.set_stance("force_eager")
    stance.__enter__()
    return stance


def _restore(stance: Any) -> None:
    if stance is not None:
        stance.__exit__(None, None, None)


@dataclass
class FlopCount:
    """What :func:`measured_step` counted: ``total`` FLOPs (``None`` until the ``with`` block has exited)."""

    total: Optional[float] = None


@contextmanager
def measured_step() -> Iterator[FlopCount]:
    """Count the FLOPs of everything run inside the block (forward and backward alike)::

        with measured_step() as step:
            loss = module.training_step(batch, 0)
            loss.backward()
        log_flops_fraction(module, "my_technique", step.total, baseline)

    The count is read when the block exits (also on an exception, so no half-open counter is left behind).
    """
    count = FlopCount()
    counter = flop_counter()
    with counter:
        try:
            yield count
        finally:
            count.total = float(counter.get_total_flops())


class TrainingStepFlops:
    """Count the FLOPs of a LightningModule's next real training step when the step spans callback hooks:
    :meth:`arm` (e.g. in ``on_train_batch_start``) makes the next ``training_step`` call start counting (a one-shot
    instance attribute, so nothing runs under the counter before the forward); :meth:`stop` (e.g. in
    ``on_after_backward``) stops and returns the count. Call ``stop(record=False)`` from ``on_train_batch_end`` and
    ``on_exception`` as well: a step that skipped its backward leaves no counter or patched method behind.
    """

    def __init__(self) -> None:
        self._counter: Optional[FlopCounterMode] = None
        self._module: Optional[Any] = None

    @property
    def counting(self) -> bool:
        """True between the start of the armed ``training_step`` and :meth:`stop`."""
        return self._counter is not None

    @property
    def armed(self) -> bool:
        """True from :meth:`arm` until :meth:`stop` (whether or not the step has started)."""
        return self._module is not None

    def arm(self, pl_module: "pl.LightningModule") -> None:
        """Count from the start of ``pl_module``'s next ``training_step``."""
        self.stop(record=False)
        counter = flop_counter()
        cls_step = type(pl_module).training_step

        def counted_training_step(*args: Any, **kwargs: Any) -> Any:
            pl_module.__dict__.pop("training_step", None)  # one-shot
            counter.__enter__()
            self._counter = counter
            return cls_step(pl_module, *args, **kwargs)

        pl_module.__dict__["training_step"] = counted_training_step
        self._module = pl_module

    def stop(self, record: bool = True) -> Optional[float]:
        """Stop counting and restore ``training_step``. Returns the FLOPs counted since the step started, or
        ``None`` when ``record`` is false or the armed step never started."""
        module, self._module = self._module, None
        if module is not None:
            module.__dict__.pop("training_step", None)
        counter, self._counter = self._counter, None
        if counter is None:
            return None
        counter.__exit__(None, None, None)
        return float(counter.get_total_flops()) if record else None


def log_flops_fraction(pl_module: "pl.LightningModule", technique: str, measured: float, baseline: float) -> float:
    """Log ``lit_ft/<technique>/flops_fraction`` = ``measured / baseline`` (per step) and return it.

    ``measured``: FLOPs of the technique's real step; ``baseline``: FLOPs of the plain step it replaces on the same
    batch (see the module docstring for the convention)."""
    if not technique or not isinstance(technique, str):
        raise ValueError(f"log_flops_fraction: technique must be a non-empty string, got {technique!r}")
    if not baseline > 0:
        raise ValueError(f"log_flops_fraction: baseline must be > 0 FLOPs, got {baseline!r}")
    if not measured >= 0:
        raise ValueError(f"log_flops_fraction: measured must be >= 0 FLOPs, got {measured!r}")
    fraction = float(measured) / float(baseline)
    pl_module.log(f"lit_ft/{technique}/flops_fraction", fraction, on_step=True, on_epoch=False, batch_size=1)
    return fraction


# ----------------------------------------------------------------------------------------------------------------
# Per-tensor FLOPs model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class FlopsProfile:
    """Measured FLOPs model of one batch.

    Attributes:
        names: parameter names ordered output -> input (the order gradients become ready in a full backward;
            tensors that get no gradient come first, with zero costs).
        t_dw: weight-gradient FLOPs per tensor.
        reach: FLOPs of activation-gradient propagation needed to reach each tensor from the loss, i.e. to have
            the gradient of its op's output (cumulative, non-decreasing along ``names``).
        t_fp: forward FLOPs with nothing trainable.
        t_step_all: measured forward+backward FLOPs with every floating-point parameter trainable.
        outside_used: tensors used outside their own modules (e.g. a tied embedding in a fused linear-CE loss), whose
            ``t_dw`` was measured by difference of two full steps.
        batch_shape: ``input_ids`` shape of the profiled batch.
    """

    names: list[str]
    t_dw: list[float]
    reach: list[float]
    t_fp: float
    t_step_all: float
    outside_used: list[str] = field(default_factory=list)
    batch_shape: list[int] = field(default_factory=list)

    def restricted(self, candidates: Sequence[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Names (output -> input), ``t_dy`` and ``t_dw`` of the candidates only: ``t_dy[k]`` is the reach
        increment from the previous candidate, so ``cumsum(t_dy)[k]`` is still the reach of ``k``."""
        cset = set(candidates)
        idx = [i for i, n in enumerate(self.names) if n in cset]
        names = [self.names[i] for i in idx]
        reach = np.asarray(self.reach, dtype=np.float64)[idx] if idx else np.zeros(0)
        t_dy = np.diff(reach, prepend=0.0)
        t_dw = np.asarray(self.t_dw, dtype=np.float64)[idx] if idx else np.zeros(0)
        return names, np.maximum(t_dy, 0.0), t_dw

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, Any]) -> "FlopsProfile":
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in sd.items()})


class _UseTracker(_EagerUnderThisMode, TorchDispatchMode):
    """Marks parameters that an op reads while none of the hooked modules owning them is running."""

    def __init__(self, storages: dict[int, list[str]], active: list[set[str]]) -> None:
        super().__init__()
        self.storages = storages
        self.active = active
        self.outside: set[str] = set()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        if not self.paused:
            allowed = self.active[-1] if self.active else set()
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    try:
                        key = t.untyped_storage().data_ptr()
                    except (RuntimeError, NotImplementedError):
                        continue
                    for name in self.storages.get(key, ()):
                        if name not in allowed:
                            self.outside.add(name)
        return func(*args, **kwargs)


def _float_leaves(obj: Any) -> list[torch.Tensor]:
    if hasattr(obj, "to_tuple") and callable(obj.to_tuple):  # transformers ModelOutput
        obj = obj.to_tuple()
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _detach_floats(obj: Any) -> Any:
    from torch.utils._pytree import tree_map

    def f(t: Any) -> Any:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t.detach().requires_grad_(True)
        return t

    return tree_map(f, obj)


def profile_tensor_flops(
    model: nn.Module, loss_fn: Callable[[], torch.Tensor], names_by_id: Optional[Mapping[int, str]] = None
) -> FlopsProfile:
    """Measure the FLOPs model of ``model`` on one batch with :class:`~torch.utils.flop_counter.FlopCounterMode`.

    ``loss_fn()`` must run the forward pass on the batch and return the scalar loss. Every floating-point parameter
    is made trainable during the measurement (``requires_grad`` and ``.grad`` are restored afterwards).

    How (all numbers are FlopCounterMode counts: matmul-class ops; elementwise ops such as norms, activations and
    the embedding gather/scatter count 0, the same convention as the measured step FLOPs):

    * ``t_dw`` of a tensor owned by a module: each call of a module that owns parameters is replayed on detached
      copies of its inputs and ``torch.autograd.grad(outputs, [p])`` is counted (autograd computes only ``dW``;
      a ``Linear`` gives ``dW = dYᵀX``, the forward matmul's FLOPs). Tensors also read outside their own modules
      (found with a dispatch mode; e.g. a tied embedding used as the lm_head of a fused linear-CE loss, which
      computes its gradient during the forward) get ``t_dw`` = step FLOPs with every tensor trainable minus step
      FLOPs with all but that tensor trainable.
    * ``reach`` (the ``t_dy`` chain): one forward+backward with every tensor trainable except the outside-used ones;
      a hook on each tensor reads the running FLOPs total when its gradient is ready, which
      orders the tensors output -> input; ``reach[k]`` = running total − ``t_fp`` − ``Σ t_dw`` of the tensors
      ready so far − the ``dX`` of ``k``'s own module call (replayed as ``autograd.grad(outputs, inputs)``; it runs
      in the same autograd node as ``dW`` but is only needed to go deeper), made non-decreasing. It therefore
      contains every op back-propagation executes before ``k``'s gradient can be formed: ``dX = dY·W`` of the
      layers above, attention, the loss. (The reference code also charges ``k``'s own ``dX``; its OPT table lumps
      the attention backward into ``v``'s ``t_dy``, which this measurement reproduces by position.) Outside-used
      tensors take their position from a full backward and the reach of the tensor ready just before them.
    * Parallel branches (``q``, ``k``, ``v``) are linearised in the order autograd runs them, so selecting the
      deepest of them also charges the others' ``dX`` (an overestimate of at most a few projections).
    * ``t_fp``: a forward with nothing trainable.
    """
    params: dict[str, nn.Parameter] = {}
    if names_by_id is None:
        names_by_id = {id(p): n for n, p in model.named_parameters()}
    for p_name, p in model.named_parameters():
        params[names_by_id.get(id(p), p_name)] = p
    floats = {n: p for n, p in params.items() if p.is_floating_point()}
    saved_rg = {n: p.requires_grad for n, p in params.items()}
    saved_grad = {n: p.grad for n, p in params.items()}

    def set_trainable(names: set[str]) -> None:
        for n, p in floats.items():
            p.requires_grad_(n in names)

    def clear_grads() -> None:
        for p in params.values():
            p.grad = None

    try:
        clear_grads()
        set_trainable(set(floats))

        # -- pass A: replay every param-owning module call to count dW per tensor; find outside uses --------------
        owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))]
        storages: dict[int, list[str]] = defaultdict(list)
        for n, p in floats.items():
            storages[p.untyped_storage().data_ptr()].append(n)
        active: list[set[str]] = []
        tracker = _UseTracker(storages, active)
        replay_dw: dict[str, float] = defaultdict(float)
        first_dx: dict[str, float] = {}  # dX FLOPs of the first (deepest) call of each tensor's module

        def pre_hook(mod: nn.Module, args: Any, kwargs: Any) -> None:
            own = {names_by_id[id(p)] for p in mod.parameters(recurse=False) if id(p) in names_by_id}
            active.append(own | (active[-1] if active else set()))

        def post_hook(mod: nn.Module, args: Any, kwargs: Any, out: Any) -> None:
            active.pop()
            direct = [(names_by_id[id(p)], p) for p in mod.parameters(recurse=False)
                      if id(p) in names_by_id and p.is_floating_point()]
            if not direct:
                return
            tracker.paused = True
            try:
                with torch.enable_grad():
                    r_args, r_kwargs = _detach_floats((args, kwargs))
                    outs = [o for o in _float_leaves(mod.forward(*r_args, **r_kwargs)) if o.requires_grad]
                    if not outs:
                        return
                    grads = [torch.ones_like(o) for o in outs]
                    inputs = [t for t in _float_leaves((r_args, r_kwargs)) if t.requires_grad]
                    dx = 0.0
                    if inputs:
                        with flop_counter() as fc:
                            torch.autograd.grad(outs, inputs, grads, retain_graph=True, allow_unused=True)
                        dx = float(fc.get_total_flops())
                    for n, _ in direct:
                        first_dx.setdefault(n, dx)
                    for n, p in direct:
                        with flop_counter() as fc:
                            torch.autograd.grad(outs, [p], grads, retain_graph=True, allow_unused=True)
                        replay_dw[n] += fc.get_total_flops()
            finally:
                tracker.paused = False

        handles = []
        for m in owners:
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(m.register_forward_hook(post_hook, with_kwargs=True))
        try:
            with torch.no_grad(), tracker:
                loss_fn()
        finally:
            for h in handles:
                h.remove()
        outside = sorted(n for n in tracker.outside if n in floats)

        # -- pass B: forward FLOPs with nothing trainable ---------------------------------------------------------
        set_trainable(set())
        with torch.no_grad(), flop_counter() as fc:
            loss_fn()
        t_fp = float(fc.get_total_flops())

        def step_flops(trainable: set[str], timeline: Optional[list[tuple[str, float]]] = None) -> float:
            set_trainable(trainable)
            clear_grads()
            hooks = []
            with flop_counter() as fcs:
                if timeline is not None:
                    for n in trainable:
                        def on_ready(g: torch.Tensor, n: str = n) -> None:
                            timeline.append((n, float(fcs.get_total_flops())))
                        hooks.append(floats[n].register_hook(on_ready))
                try:
                    with torch.enable_grad():
                        loss = loss_fn()
                        if loss.requires_grad:  # autograd.grad: no .grad, no DDP reducer hooks
                            torch.autograd.grad(loss, [floats[n] for n in trainable], allow_unused=True)
                finally:
                    for h in hooks:
                        h.remove()
            clear_grads()
            return float(fcs.get_total_flops())

        # -- pass C: full step (order of gradient readiness, total) ------------------------------------------------
        all_names = set(floats)
        full_timeline: list[tuple[str, float]] = []
        t_step_all = step_flops(all_names, full_timeline)
        inside_names = all_names - set(outside)
        if outside:
            inside_timeline: list[tuple[str, float]] = []
            step_inside = step_flops(inside_names, inside_timeline)
        else:
            inside_timeline, step_inside = full_timeline, t_step_all

        t_dw: dict[str, float] = {n: float(replay_dw.get(n, 0.0)) for n in floats if n not in outside}
        for n in outside:  # measured by difference of two full steps
            without = step_inside if len(outside) == 1 else step_flops(all_names - {n})
            t_dw[n] = max(0.0, t_step_all - without)

        # reach along the inside timeline
        reach_inside: dict[str, float] = {}
        done_dw = 0.0
        running_max = 0.0
        for n, total in inside_timeline:
            done_dw += t_dw.get(n, 0.0)
            # the tensor's own dX runs in the same autograd node as its dW: needed only to go deeper
            own = total - t_fp - done_dw - first_dx.get(n, 0.0)
            running_max = max(running_max, own)
            reach_inside[n] = running_max
        order = [n for n, _ in full_timeline]
        seen = set(order)
        no_grad_names = [n for n in params if n not in seen]  # unused or non-float tensors: first, free
        names: list[str] = list(no_grad_names)
        reach: list[float] = [0.0] * len(no_grad_names)
        last = 0.0
        for n in order:
            if n in reach_inside:
                last = max(last, reach_inside[n])
            names.append(n)
            reach.append(last)
        dw_list = [t_dw.get(n, 0.0) for n in names]
        del step_inside
    finally:
        for n, p in params.items():
            p.requires_grad_(saved_rg[n])
            p.grad = saved_grad[n]
    return FlopsProfile(names=names, t_dw=dw_list, reach=reach, t_fp=t_fp, t_step_all=t_step_all,
                        outside_used=outside)
