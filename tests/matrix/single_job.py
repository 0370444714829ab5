"""What a single-process cell of the compatibility matrix trains: the contract case's technique, module and data
(``tests/contract/cases.py``), and one seeded ``fit`` that every single-process setting (``single_settings.py``)
runs twice — with and without the setting — and compares.

Both runs of a comparison build the module after ``torch.manual_seed(0)`` (or load the same initial weights) and
the callbacks after ``torch.manual_seed(1)``, so a technique's own random state (a prompt's init, a random
selection) is the same in both. The optimizer is swapped for SGD (lr 1) like the distributed columns
(``worker.use_sgd``): the update is the gradient itself.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from case_data import concat_rows, plan_for
from worker import PLAIN, Progress, use_sgd


@dataclass
class Run:
    """One finished fit: its final weights (``._orig_mod`` of a compiled model stripped from the names), the weights
    when training started, the losses each step returned, and the Trainer."""

    weights: dict
    start: dict
    losses: list[float]
    trainer: Any
    module: Any
    seconds: float = 0.0


@dataclass
class SingleJob:
    """The case of ``technique`` (``plain``: the default module without a technique) and its first two batches
    (``batches``) plus their row halves (``halves``: four batches of half the size, for accumulation and the
    mid-epoch resume settings). ``plan`` (``case_data.plan_for``) says what they are: the batches themselves, or
    ranges of the DataModule's rows that it collates when the Trainer asks for the loader; ``template`` is the
    first batch as a dict (the fuzz setting reshapes it)."""

    technique: str
    cell: Path
    progress: Progress
    case: Any = None
    cls: Any = None
    kwargs: dict = field(default_factory=dict)
    ctx: Any = None
    batches: list = field(default_factory=list)
    halves: list = field(default_factory=list)
    plan: Any = None
    template: Any = None

    def __post_init__(self) -> None:
        import lit_ft
        from lit_ft.testing import make_tiny_tokenizer
        from tests.contract.cases import CASES, Case, Ctx

        if self.technique == PLAIN:
            self.case, self.cls = Case(invalid=()), None
        else:
            records = {r.name: r for r in lit_ft.techniques()}
            if self.technique not in records:
                raise KeyError(f"technique {self.technique!r} is not registered; registered: {sorted(records)}")
            if self.technique not in CASES:
                raise KeyError(f"technique {self.technique!r} has no case in tests/contract/cases.py")
            self.case, self.cls = CASES[self.technique], records[self.technique].cls
        files = self.cell / "files"
        files.mkdir(parents=True, exist_ok=True)
        self.ctx = Ctx(files, make_tiny_tokenizer(files / "tok"))
        self.kwargs = self.case.build(self.case.kwargs, self.ctx) if self.cls is not None else {}
        self.plan = plan_for(self.case)
        self.batches = self.plan.batches()
        self.halves = [half for b in self.batches for half in self.plan.halves(b)]
        self.template = self.plan.template(self.batches[0])

    # -- pieces ------------------------------------------------------------------------------------------------
    def module(self, init: dict | None = None):
        """The case's module (built after ``torch.manual_seed(0)``) with SGD, optionally loaded with ``init``."""
        import torch

        torch.manual_seed(0)
        module = use_sgd(self.case.module())
        if init is not None:
            module.load_state_dict(init)
        return module

    def callbacks(self) -> list:
        """A fresh instance of the technique (after ``torch.manual_seed(1)``), or nothing for ``plain``."""
        import torch

        torch.manual_seed(1)
        return [self.cls(**self.kwargs)] if self.cls is not None else []

    def datamodule(self, batches: list, resumable: bool = False):
        """The case's own DataModule (techniques may read its attributes) serving ``batches`` in order, one epoch.
        ``resumable``: through lit_ft's ``ResumableDataLoader``, whose position Lightning saves in the checkpoint,
        so a run resumed mid-epoch continues with the next batch (a plain DataLoader restarts the epoch)."""
        from torch.utils.data import DataLoader, SequentialSampler

        from lit_ft.data._common import ResumableDataLoader
        from lit_ft.data.sampler import ResumableBatchSampler

        dm = self.case.datamodule()
        specs, plan = list(batches), self.plan
        # made when the Trainer asks for the loader: after the technique's setup (a row selection applies)
        data = lambda: [plan.materialize(dm, s) for s in specs]  # noqa: E731
        if not resumable:
            dm.train_dataloader = lambda: DataLoader(data(), batch_size=None, shuffle=False)
            return dm

        def progress() -> int | None:
            try:
                return int(dm.trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            except (AttributeError, RuntimeError):
                return None

        def loader() -> ResumableDataLoader:
            rows = data()
            return ResumableDataLoader(rows, batch_sampler=ResumableBatchSampler(SequentialSampler(rows), 1),
                                       collate_fn=collate_batches, progress=progress)

        dm.train_dataloader = loader
        return dm

    def fit(self, batches: list, steps: int, *, module: Any = None, init: dict | None = None,
            phase: str | None = None, datamodule: Any = None, callbacks: list | None = None,
            ckpt_path: str | None = None, checkpoint_dir: Path | None = None, extra_callbacks: tuple = (),
            require_steps: bool = True, **trainer_kw: Any) -> Run:
        """Fit ``module`` (default: :meth:`module`) with the technique for ``steps`` steps on ``batches``.
        ``phase``: a name to record in the progress file (``<phase> setup``, ``<phase> step N``) so that an error is
        placed; ``checkpoint_dir``: a ModelCheckpoint there after every step (all kept); ``require_steps``: raise
        when the run made fewer than ``steps`` optimizer steps (the fuzz setting counts skipped steps instead)."""
        import lightning.pytorch as pl
        from lightning.pytorch.callbacks import ModelCheckpoint

        module = module if module is not None else self.module(init)
        start: dict = {}
        losses: list[float] = []
        cbs = [recorder(self.progress, phase, start, losses)] + list(extra_callbacks) + \
            (callbacks if callbacks is not None else self.callbacks())
        if checkpoint_dir is not None:
            cbs.append(ModelCheckpoint(dirpath=str(checkpoint_dir), every_n_train_steps=1, save_top_k=-1))
        kw = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                  enable_checkpointing=checkpoint_dir is not None, enable_progress_bar=False,
                  enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
        kw.update(trainer_kw)
        if phase:  # from here: an error Lightning raises before the callbacks' setup (its own checks) is at setup
            self.progress.phase(f"{phase} setup")
        trainer = pl.Trainer(callbacks=cbs, **kw)
        t0 = time.perf_counter()
        trainer.fit(module, datamodule=datamodule if datamodule is not None else self.datamodule(batches),
                    ckpt_path=ckpt_path)
        seconds = time.perf_counter() - t0
        if require_steps and trainer.global_step != steps:
            raise RuntimeError(f"the run stopped at step {trainer.global_step}, not {steps}")
        return Run(weights(module), start, losses, trainer, module, seconds)


def collate_batches(batches: list[dict]) -> dict:
    """The resumable loader's collate function: its dataset's items are whole batches and its sampler deals one a
    step; a technique that re-reads the loader's dataset with a batch size of its own (CriticalTokenScoring scores
    the whole split ahead) gets their rows concatenated, as a DataModule's collate of examples would give them."""
    return batches[0] if len(batches) == 1 else concat_rows(batches)


def weights(module) -> dict:
    """Detached copies of the module's state, by name, without a compiled wrapper's ``._orig_mod``."""
    return {k.replace("._orig_mod", ""): v.detach().clone() for k, v in module.state_dict().items()}


def recorder(progress: Progress, phase: str | None, start: dict, losses: list) -> Any:
    """A Lightning callback (first in the list) recording the phase (``<phase> setup`` until the first training
    batch, then ``<phase> step N``), the weights when training starts (after setup: a technique's own tensors
    exist then), and each step's returned loss."""
    import lightning.pytorch as pl

    class Recorder(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            if phase:
                progress.phase(f"{phase} setup")

        def on_train_start(self, trainer, pl_module):
            start.update(weights(pl_module))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if phase:
                progress.phase(f"{phase} step {trainer.global_step + 1}")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            losses.append(float(loss.detach().float()) if loss is not None else math.nan)

    return Recorder()


def moved(run: Run) -> list[str]:
    """Names of the weights the run changed."""
    import torch

    return [k for k, v in run.weights.items()
            if k in run.start and run.start[k].shape == v.shape and not torch.equal(v, run.start[k])]


def all_finite(run: Run) -> bool:
    """Every returned loss and every floating weight is finite."""
    import torch

    return all(math.isfinite(x) for x in run.losses) and all(
        bool(torch.isfinite(v).all()) for v in run.weights.values() if v.is_floating_point())


Setting = Callable[[SingleJob], dict]
