"""One cell of the compatibility matrix (issue 18): one technique under one distributed setting, run as one rank of a
2-process gloo CPU job that ``run_matrix.py`` starts (it sets ``LOCAL_RANK``, ``NODE_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR`` and ``MASTER_PORT``, so Lightning's ``LightningEnvironment`` takes the processes as created
externally, as under ``torchrun``; this script is never pytest).

Rank 0 first trains the same technique in one process (no process group yet) on the *global* batches, then both
ranks train 2 steps under the setting, each on its half of every global batch (Lightning's distributed sampler gives
rank ``r`` every ``r``-th micro-batch); rank 0 compares the two runs' weights (the sharded run's gathered with
``full_tensor``) like ``tests/core/test_tokens_ddp.py`` (``rtol=1e-4, atol=1e-6``) and writes ``result.json``.

Settings: ``ddp`` = ``strategy="ddp"`` (``DDPStrategy`` defaults); ``fsdp2`` =
``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)`` (FSDP2 through the module's
``configure_model``).

The technique's arguments, module and data come from the contract suite's case (``tests/contract/cases.py``; its
DataModule cut into batches as ``case_data.py`` says: fixed batches, or row ranges a lit-ft text DataModule collates
after the technique's setup);
``plain`` is the case's default module without any technique. Each rank writes ``rank<r>.json`` as it goes (the
phase it reached; on an exception: its type, message, traceback and the phase), so a crash or a hang is attributed.

Usage: ``python tests/matrix/worker.py TECHNIQUE SETTING CELL_DIR [--steps N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))  # case_data
sys.path.insert(0, str(HERE.parent))  # tests/: helpers
sys.path.insert(0, str(REPO))  # the repo: lit_ft, tests.contract

from case_data import plan_for  # noqa: E402

SETTINGS = ("ddp", "fsdp2")
PLAIN = "plain"
RTOL, ATOL = 1e-4, 1e-6  # tests/core/test_tokens_ddp.py's fp32 tolerance


class Progress:
    """``rank<r>.json``: the last phase this rank reached and, if it raised, the exception (written at once, so a
    killed rank still tells where it was)."""

    def __init__(self, cell: Path, rank: int) -> None:
        self.path = cell / f"rank{rank}.json"
        self.state: dict = {"rank": rank, "phase": "start", "pid": os.getpid()}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.path)

    def phase(self, phase: str) -> None:
        self.state["phase"] = phase
        self.write()

    def error(self, e: BaseException, where: str) -> None:
        self.state["error"] = {
            "where": where, "phase": self.state["phase"], "type": type(e).__name__,
            "message": str(e), "traceback": traceback.format_exc()[-6000:], "lit_ft_frame": lit_ft_frame(e),
            "raised_at": innermost_frame(e),
        }
        self.write()


def lit_ft_frame(e: BaseException) -> str | None:
    """``path:line in function`` of the innermost traceback frame inside ``lit_ft/`` (where to look first)."""
    found = None
    for frame in traceback.extract_tb(e.__traceback__):
        if f"{os.sep}lit_ft{os.sep}" in frame.filename and f"{os.sep}tests{os.sep}" not in frame.filename:
            found = f"{Path(frame.filename).relative_to(REPO) if frame.filename.startswith(str(REPO)) else frame.filename}:" \
                    f"{frame.lineno} in {frame.name}"
    return found


def innermost_frame(e: BaseException) -> str | None:
    """``file:line in function`` where ``e`` was raised (site-packages paths shortened to the package)."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return None
    f = frames[-1]
    name = f.filename.split("site-packages" + os.sep)[-1]
    if name.startswith(str(REPO)):
        name = str(Path(name).relative_to(REPO))
    return f"{name}:{f.lineno} in {f.name}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("technique")
    p.add_argument("setting", choices=SETTINGS)
    p.add_argument("cell_dir")
    p.add_argument("--steps", type=int, default=2)
    a = p.parse_args()
    cell = Path(a.cell_dir)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    progress = Progress(cell, rank)
    try:
        progress.phase("import")
        import torch

        torch.set_num_threads(1)
        progress.phase("build")
        job = Job(a.technique, cell, rank, progress)
    except Exception as e:  # noqa: BLE001  the finding is the exception itself
        progress.error(e, "build")
        return 1
    ref, ref_error = None, None
    if rank == 0:  # before any process group exists: a plain single-process fit
        progress.phase("reference")
        try:
            ref = job.fit(None, 1, a.steps)
        except Exception as e:  # noqa: BLE001
            ref_error = {"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()[-6000:],
                         "lit_ft_frame": lit_ft_frame(e), "raised_at": innermost_frame(e)}
            progress.state["reference_error"] = ref_error
            progress.write()
    progress.phase("setup")
    try:
        t0 = time.perf_counter()
        dist = job.fit(a.setting, world, a.steps)
        seconds = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        progress.error(e, "distributed")
        return 1
    progress.phase("done")
    if rank == 0:
        result = {"sharded": dist["sharded"], "fit_seconds": round(seconds, 2), "reference_error": ref_error}
        if ref is not None:
            result.update(compare(ref["weights"], dist["weights"], ref["start"]))
        (cell / "result.json").write_text(json.dumps(result, indent=1))
    return 0


class Job:
    """The case's technique factory, module factory and data, cut into the global / per-rank batch lists."""

    def __init__(self, technique: str, cell: Path, rank: int, progress: Progress) -> None:
        import lit_ft
        from lit_ft.testing import make_tiny_tokenizer
        from tests.contract.cases import CASES, Case, Ctx

        self.progress = progress
        if technique == PLAIN:
            self.case, self.cls = Case(invalid=()), None
        else:
            records = {r.name: r for r in lit_ft.techniques()}
            if technique not in records:
                raise KeyError(f"technique {technique!r} is not registered; registered: {sorted(records)}")
            if technique not in CASES:
                raise KeyError(f"technique {technique!r} has no case in tests/contract/cases.py")
            self.case, self.cls = CASES[technique], records[technique].cls
        # files a case needs (a tokenizer, a saved source prompt, a save_dir): one folder per rank, so the two
        # ranks never write the same file at once; both build the same content (fixed seeds)
        files = cell / f"files_rank{rank}"
        files.mkdir(parents=True, exist_ok=True)
        self.ctx = Ctx(files, make_tiny_tokenizer(files / "tok"))
        self.kwargs = self.case.build(self.case.kwargs, self.ctx) if self.cls is not None else {}
        # the case's first two batches: rank r trains on batch r; one process on both as one global batch (the plan,
        # case_data.plan_for, says how: rows concatenated, or the DataModule's row ranges collated by it at fit time)
        self.plan = plan_for(self.case)
        self.micro = self.plan.batches()
        self.global_batch = self.plan.merge(self.micro)

    def datamodule(self, world: int):
        """The case's own DataModule (techniques may read its attributes: label names, tokenizer) serving the
        global batch (one process) or the two micro-batches (2 ranks: the sampler deals one to each), ``steps``
        times over."""
        from torch.utils.data import DataLoader

        dm = self.case.datamodule()
        batches = [self.global_batch] if world == 1 else list(self.micro)
        specs, plan = batches * self.steps, self.plan
        # made when the Trainer asks for the loader: after the technique's setup (a row selection applies)
        dm.train_dataloader = lambda: DataLoader([plan.materialize(dm, s) for s in specs], batch_size=None,
                                                 shuffle=False)
        return dm

    def fit(self, setting: str | None, world: int, steps: int) -> dict:
        import lightning.pytorch as pl
        import torch

        self.steps = steps
        if setting is None:
            strategy, devices = "auto", 1
        elif setting == "ddp":
            strategy, devices = "ddp", world
        else:
            from lightning.pytorch.strategies import ModelParallelStrategy

            strategy, devices = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1), world
        torch.manual_seed(0)
        module = use_sgd(self.case.module())
        start: dict = {}
        callbacks = [phase_callback(self.progress, setting, start)] + ([self.cls(**self.kwargs)] if self.cls else [])
        trainer = pl.Trainer(
            accelerator="cpu", devices=devices, num_nodes=1, strategy=strategy, max_steps=steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            callbacks=callbacks, use_distributed_sampler=True, num_sanity_val_steps=0,
        )
        trainer.fit(module, datamodule=self.datamodule(world))
        if trainer.global_step != steps:
            raise RuntimeError(f"the run stopped at step {trainer.global_step}, not {steps}")
        # gathered on every rank (full_tensor is a collective under FSDP2)
        weights = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                   for k, v in module.state_dict().items()}
        return {"weights": weights, "sharded": any(hasattr(q, "full_tensor") for q in module.parameters()),
                "start": start}


ADAM_ONLY = {"betas", "eps", "amsgrad", "foreach", "maximize", "capturable", "differentiable", "fused",
             "decoupled_weight_decay", "initial_lr"}


def use_sgd(module):
    """Swap the module's optimizer for SGD (lr 1, no weight decay, no scheduler), keeping its param groups (their
    names and extra keys, which lit_ft's optimizer service reads): the update is then the gradient itself, as with
    ``tests/helpers.SGDModule`` in ``test_tokens_ddp.py``. AdamW's update is nearly invariant to the gradient's scale,
    so a normalisation error (a loss divided by the wrong count) would hide behind it for the first steps, and it
    amplifies fp32 noise in near-zero gradients (``plain`` under FSDP2 differed by 1.7e-6 with the case's AdamW)."""
    import torch

    make = module.configure_optimizers

    def configure_optimizers():
        out = make()
        opt = out["optimizer"] if isinstance(out, dict) else out
        groups = [{k: v for k, v in g.items() if k not in ADAM_ONLY} | {"lr": 1.0, "weight_decay": 0.0}
                  for g in opt.param_groups]
        return torch.optim.SGD(groups, lr=1.0)

    module.configure_optimizers = configure_optimizers
    return module


def phase_callback(progress: Progress, setting: str | None, start: dict):
    """A Lightning callback (first in the list) recording the distributed run's phase: ``setup`` until the first
    training batch, then ``step N`` (so an error or a hang is placed at setup or in training); in the one-process
    run it copies the weights into ``start`` when training starts (to tell whether the steps moved any)."""
    import lightning.pytorch as pl

    class Phase(pl.Callback):
        def setup(self, trainer, pl_module, stage):
            if setting is not None:
                progress.phase("setup")

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if setting is not None:
                progress.phase(f"step {trainer.global_step + 1}")

        def on_train_start(self, trainer, pl_module):
            if setting is None:  # after setup: techniques' own tensors (prompts) exist now
                start.update({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

        def on_train_end(self, trainer, pl_module):
            if setting is not None:
                progress.phase("gather")

    return Phase()


REL_TO_UPDATE = 1e-3  # a difference above this fraction of the steps' own update is not rounding
FP32_EPS = 1.19e-7


def compare(ref: dict, dist: dict, start: dict, rtol: float = RTOL, atol: float = ATOL) -> dict:
    """The distributed run's weights against the one-process run's: the key sets, the largest absolute difference,
    and ``close``: every tensor within ``rtol=RTOL, atol=ATOL`` *and* within ``REL_TO_UPDATE`` of how far the
    one-process steps moved it from ``start`` (its weights when training started; plus a few fp32 ulps of the
    weight; a caller may loosen ``rtol`` / ``atol``, e.g. for compiled kernels). The second test matters for
    tensors with their own small learning rate (prompts: 0.05 × a small
    gradient): an unreduced gradient there moves the weight by less than ``atol`` yet differs by as much as the
    update itself. Also whether the one-process steps moved any weight at all."""
    import torch

    only_ref, only_dist = sorted(set(ref) - set(dist)), sorted(set(dist) - set(ref))
    max_diff, worst, close, max_rel, worst_rel = 0.0, None, True, 0.0, None
    for k in sorted(set(ref) & set(dist)):
        a, b = ref[k], dist[k]
        if a.shape != b.shape:
            close, worst = False, f"{k}: shape {tuple(b.shape)} vs {tuple(a.shape)}"
            continue
        if not a.is_floating_point():
            close &= bool(torch.equal(a, b))
            continue
        if not a.numel():
            continue
        d = (a.double() - b.double()).abs().max().item()
        if d > max_diff:
            max_diff, worst = d, k
        close &= bool(torch.allclose(b.double(), a.double(), rtol=rtol, atol=atol))
        s = start.get(k)
        if s is not None and s.shape == a.shape:
            update = (a.double() - s.double()).abs().max().item()
            floor = 4 * FP32_EPS * a.double().abs().max().item()
            close &= d <= REL_TO_UPDATE * update + floor
            if update > 0 and d > floor and d / update > max_rel:
                max_rel, worst_rel = d / update, k
    moved = any(k in start and start[k].shape == v.shape and not torch.equal(v, start[k]) for k, v in ref.items())
    return {"keys_only_in_reference": only_ref[:10], "keys_only_in_distributed": only_dist[:10],
            "max_abs_diff": max_diff, "worst_tensor": worst, "max_diff_over_update": max_rel,
            "worst_tensor_over_update": worst_rel, "close": close and not only_ref and not only_dist, "moved": moved}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
