"""The single-process settings of the compatibility matrix: each runs the technique's case (``single_job.py``) with
the setting and without it, and says ``{"category", "outcome", "detail"}`` in the matrix's outcome vocabulary.
An exception escapes to ``single_worker.py``, which records it with the phase (``refused`` at setup when its
message names the setting, else ``fails``). ``SETTING_DOC`` is what the page says each setting does and how it is
judged (no torch import here: the runner reads it).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from single_job import Run, SingleJob, all_finite, moved
from worker import compare

BF16_REL_TOL = 0.1  # bf16 autocast rounds activations to 8 bits of mantissa: the 2-step update may be ~1% off
COMPILE_RTOL, COMPILE_ATOL = 1e-4, 1e-5  # inductor fuses and reorders fp32 sums: rounding, not another result
COMPILE_BACKEND_ENV = "LIT_FT_MATRIX_COMPILE_BACKEND"  # default inductor; the fast test slice uses aot_eager

SINGLE_SETTINGS = ("bf16", "accum", "checkpointing", "compile", "lora", "resume_mid_epoch", "sigkill", "fuzz")

SETTING_DOC = {
    "bf16": '`Trainer(precision="bf16-mixed")` (CPU autocast), 2 steps, against fp32: **works** = finite losses and '
            f"weights, weights moved, and the bf16 update within {BF16_REL_TOL:g} of the fp32 one "
            "(‖w_bf16 − w_fp32‖ / ‖w_fp32 − w_0‖ over all tensors); else **runs but differs**",
    "accum": "`accumulate_grad_batches=2` on batches of half the rows against one batch of all of them (2 steps): "
             "**works (exact)** = every weight equal within the fp32 tolerance of the distributed columns; else "
             "**runs but differs** (largest difference)",
    "checkpointing": "gradient checkpointing (`CausalLMModule(gradient_checkpointing=True)`; a module without that "
                     "argument: `model.gradient_checkpointing_enable(use_reentrant=False)`) against none, 2 steps: "
                     "**works** = equal weights (fp32 tolerance)",
    "compile": "`module.model = torch.compile(module.model)` (inductor; [core/loss.md](core/loss.md#torchcompile)) "
               f"against eager, 2 steps: **works** = equal weights within `rtol={COMPILE_RTOL:g}, "
               f"atol={COMPILE_ATOL:g}` (fused kernels reorder fp32 sums) and dynamo compiled at least one graph of the "
               "step; a step that never runs the compiled model is **runs, but compiles nothing**",
    "lora": "the case's plain user module (`PlainHFModule`: the HF model computes its own loss; a classifier for "
            "a classification case) with its model wrapped by `peft.get_peft_model(model, LoraConfig(r=4, "
            "target_modules=['q_proj', 'v_proj']))`, 2 steps: **works** = finite losses and a LoRA adapter moved "
            "(whether other weights moved too is noted). `CausalLMModule` with a PEFT-wrapped `model` is not "
            "used: its fused token loss does not reach through a `PeftModel` (AttributeError in "
            "`final_hidden_states`)",
    "resume_mid_epoch": "a 3-batch epoch (the case's batches cut in half, through lit_ft's `ResumableDataLoader`), "
                        "checkpoint after step 1, a fresh module and technique resumed from it to step 3: **works** "
                        "= the uninterrupted run's weights (fp32 tolerance; 'bit for bit' when identical)",
    "sigkill": "a child process trains a 4-batch epoch with a checkpoint after every step and is SIGKILLed during "
               "step 3; this process resumes from the last checkpoint to step 4: **works** = the uninterrupted "
               "run's weights",
    "fuzz": "Hypothesis (derandomized, no shrinking): the technique's constructor with one argument replaced by a "
            "random typed value must construct or raise ValueError/TypeError (FileNotFoundError for a path) naming "
            "the argument; one training "
            "step on batches of 1-2 rows of 1-2 tokens, with all-ignored rows, fully padded rows or no "
            "`attention_mask`, must give a finite loss or a ValueError/TypeError/RuntimeError (or lit_ft's "
            "`BatchKeyError` naming a missing key) from a `raise` in lit_ft's own code (a step skipped without an "
            "error is counted apart): **works** = every example did; "
            "else **fails** with the first bad example ([tests/matrix/fuzz_cell.py](../tests/matrix/fuzz_cell.py))",
}

# a setup error "names the setting" when it says which of them it is about (the refusal column's rule)
SETTING_WORDS = {
    "bf16": r"bf16|bfloat16|precision|autocast|mixed",
    "accum": r"accumulat",
    "checkpointing": r"checkpoint",
    "compile": r"compile|dynamo|inductor|OptimizedModule",
    "lora": r"peft|lora|adapter",
    "resume_mid_epoch": r"resum|checkpoint",
    "sigkill": r"resum|checkpoint",
    "fuzz": r"$^",
}

DEFAULT_TIMEOUTS_S = {"compile": 420, "sigkill": 240, "fuzz": 180}  # others: the runner's default


def _seconds(*runs: Run) -> dict:
    return {"fit_seconds": [round(r.seconds, 2) for r in runs]}


def _equal_outcome(ref: Run, got: Run, works: str, **tol) -> dict:
    """``works`` when ``got`` has ``ref``'s weights (``worker.compare``), else ``runs but differs``."""
    if not all_finite(got):
        return {"category": "differs", "outcome": f"runs but differs (non-finite loss or weights: losses "
                                                  f"{got.losses})", "detail": _seconds(ref, got)}
    c = compare(ref.weights, got.weights, ref.start, **tol)
    detail = {**{k: c[k] for k in ("max_abs_diff", "worst_tensor", "max_diff_over_update",
                                    "worst_tensor_over_update", "keys_only_in_reference",
                                    "keys_only_in_distributed", "moved")}, **_seconds(ref, got)}
    if c["close"]:
        note = "" if c["moved"] else "; no weight moved"
        if c["max_abs_diff"] == 0.0 and works.endswith(")"):
            works = works[:-1] + ", bit for bit)"
        return {"category": "works", "outcome": works[:-1] + note + ")" if note else works, "detail": detail}
    if c["keys_only_in_reference"] or c["keys_only_in_distributed"]:
        return {"category": "differs", "outcome": "runs but differs (different parameter names)", "detail": detail}
    return {"category": "differs", "outcome": f"runs but differs (max abs diff {c['max_abs_diff']:.2g})",
            "detail": detail}


# -- the settings ---------------------------------------------------------------------------------------------------
def bf16(job: SingleJob) -> dict:
    ref = job.fit(job.batches, 2, phase="fp32")
    got = job.fit(job.batches, 2, phase="bf16", precision="bf16-mixed")
    if not all_finite(got):
        return {"category": "differs", "outcome": f"runs but differs (non-finite under bf16: losses {got.losses})",
                "detail": _seconds(ref, got)}
    num = sum(float((got.weights[k].double() - ref.weights[k].double()).pow(2).sum()) for k in ref.weights
              if ref.weights[k].is_floating_point() and k in got.weights)
    den = sum(float((ref.weights[k].double() - ref.start[k].double()).pow(2).sum()) for k in ref.weights
              if ref.weights[k].is_floating_point() and k in ref.start)
    rel = (num ** 0.5) / (den ** 0.5) if den > 0 else float("inf")
    detail = {"update_rel_diff": rel, "losses_bf16": got.losses, "losses_fp32": ref.losses, **_seconds(ref, got)}
    if not moved(got):
        return {"category": "differs", "outcome": "runs but differs (no weight moved under bf16)", "detail": detail}
    if rel <= BF16_REL_TOL:
        return {"category": "works", "outcome": f"works (update within {rel:.1g} of fp32's)", "detail": detail}
    return {"category": "differs", "outcome": f"runs but differs (update off by {rel:.2g} of fp32's)",
            "detail": detail}


def accum(job: SingleJob) -> dict:
    ref = job.fit(job.batches, 2, phase="full batch")
    got = job.fit(job.halves, 2, phase="accumulated", accumulate_grad_batches=2)
    return _equal_outcome(ref, got, "works (exact)")


def checkpointing(job: SingleJob) -> dict:
    import torch

    from worker import use_sgd

    ref = job.fit(job.batches, 2, phase="plain")
    module = job.module()
    if "gradient_checkpointing" in getattr(module, "hparams", {}):
        # the documented switch is the constructor argument: rebuild with it, then the same initial weights
        init = module.state_dict()
        torch.manual_seed(0)
        module = use_sgd(type(module)(**{**module.hparams, "gradient_checkpointing": True}))
        module.load_state_dict(init)
    else:
        module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    got = job.fit(job.batches, 2, module=module, phase="checkpointing")
    return _equal_outcome(ref, got, "works (= without)")


def compile_(job: SingleJob) -> dict:
    import torch
    from torch._dynamo.testing import CompileCounterWithBackend

    ref = job.fit(job.batches, 2, phase="eager")
    torch._dynamo.reset()
    module = job.module()
    backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
    # counts the graphs dynamo hands the backend: equal weights prove nothing when the step never ran compiled code
    counter = CompileCounterWithBackend(backend)
    module.model = torch.compile(module.model, backend=counter)
    got = job.fit(job.batches, 2, module=module, phase="compiled")
    out = _equal_outcome(ref, got, "works (= eager)", rtol=COMPILE_RTOL, atol=COMPILE_ATOL)
    out["detail"].update(backend=backend, compiled_graphs=counter.frame_count, compiled_ops=counter.op_count)
    if counter.frame_count == 0:
        out["category"] = "differs"
        out["outcome"] = ("runs, but compiles nothing (the step never calls the compiled model; "
                          f"weights {'= eager' if out['outcome'].startswith('works') else 'differ'})")
    return out


def lora(job: SingleJob) -> dict:
    import peft
    import torch

    from worker import use_sgd

    # the case's plain user module (its HF model computes the loss), as a PEFT user writes it: CausalLMModule's
    # fused token loss does not reach through a PeftModel (AttributeError in final_hidden_states, see the page)
    torch.manual_seed(0)
    module = use_sgd(job.case.plain_module())
    module.model = peft.get_peft_model(module.model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    got = job.fit(job.batches, 2, module=module, phase="lora")
    names = moved(got)
    adapters = [k for k in names if "lora_" in k]
    base = [k for k in names if "lora_" not in k]
    detail = {"losses": got.losses, "moved_adapters": len(adapters), "moved_other": base[:10], **_seconds(got)}
    if not all_finite(got):
        return {"category": "differs", "outcome": f"runs but differs (non-finite: losses {got.losses})",
                "detail": detail}
    if not adapters:
        return {"category": "differs", "outcome": f"runs but differs (no LoRA adapter moved; {len(base)} other "
                                                  "tensor(s) did)", "detail": detail}
    note = f"; {len(base)} non-adapter tensor(s) moved too" if base else "; base frozen"
    return {"category": "works", "outcome": f"works ({len(adapters)} adapter tensors trained{note})",
            "detail": detail}


def _fresh(path: Path) -> Path:
    """``path`` emptied (a rerun in the same cell must not find the last run's checkpoints or marker)."""
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    return path


def resume_mid_epoch(job: SingleJob) -> dict:
    batches = job.halves[:3]
    ckpts = _fresh(job.cell / "ckpts_resume")
    full = job.fit(batches, 3, phase="uninterrupted", checkpoint_dir=ckpts,
                   datamodule=job.datamodule(batches, resumable=True))
    ckpt = ckpts / "epoch=0-step=1.ckpt"
    if not ckpt.is_file():
        raise RuntimeError(f"no step-1 checkpoint in {sorted(p.name for p in ckpts.iterdir())}")
    got = job.fit(batches, 3, phase="resumed", ckpt_path=str(ckpt), datamodule=job.datamodule(batches, True))
    got.start = full.start
    return _equal_outcome(full, got, "works (= uninterrupted)")


KILL_AT_STEP = 3  # the child is killed during this step, after the previous step's checkpoint was written
READY = "ready_to_kill"
CHILD_CKPTS = "ckpts_sigkill"


def sigkill(job: SingleJob) -> dict:
    batches = job.halves[:4]
    ckpts = _fresh(job.cell / CHILD_CKPTS)
    _fresh(job.cell / READY)
    child_log = job.cell / "child.log"
    with open(child_log, "w") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).with_name("single_worker.py")), job.technique,
                                  "sigkill", str(job.cell), "--child"], stdout=log, stderr=subprocess.STDOUT,
                                 env=dict(os.environ, OMP_NUM_THREADS="1"))  # our process group: a cell killed
        # for its timeout takes the child with it
        job.progress.phase("child training")
        deadline = time.time() + 150
        while not (job.cell / READY).is_file():
            if child.poll() is not None:
                raise RuntimeError(f"the child exited with code {child.returncode} before step {KILL_AT_STEP}: "
                                   + child_log.read_text(errors="replace")[-1500:])
            if time.time() > deadline:
                child.send_signal(signal.SIGKILL)
                child.wait()
                raise TimeoutError(f"the child did not reach step {KILL_AT_STEP} in 150 s")
            time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait()
    saved = sorted(ckpts.glob("*.ckpt"), key=lambda p: int(p.stem.split("step=")[-1]))
    if not saved:
        raise RuntimeError("the killed child left no checkpoint")
    last = saved[-1]
    full = job.fit(batches, 4, phase="uninterrupted", datamodule=job.datamodule(batches, resumable=True))
    got = job.fit(batches, 4, phase="resumed", ckpt_path=str(last), datamodule=job.datamodule(batches, True))
    got.start = full.start
    out = _equal_outcome(full, got, "works (= uninterrupted)")
    out["detail"]["resumed_from"] = last.name
    return out


def sigkill_child(job: SingleJob) -> None:
    """The child of :func:`sigkill`: trains with a checkpoint after every step and, at the start of step
    ``KILL_AT_STEP``, says so and waits to be killed."""
    import lightning.pytorch as pl

    cell = job.cell

    class WaitForKill(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step + 1 == KILL_AT_STEP:
                (cell / READY).write_text(str(trainer.global_step))
                time.sleep(600)

    batches = job.halves[:4]
    job.fit(batches, 4, phase="child", checkpoint_dir=cell / CHILD_CKPTS, extra_callbacks=(WaitForKill(),),
            datamodule=job.datamodule(batches, resumable=True))
    raise RuntimeError("the child finished training: it was not killed")


def fuzz(job: SingleJob) -> dict:
    from fuzz_cell import run_fuzz

    return run_fuzz(job)


SETTINGS = {"bf16": bf16, "accum": accum, "checkpointing": checkpointing, "compile": compile_, "lora": lora,
            "resume_mid_epoch": resume_mid_epoch, "sigkill": sigkill, "fuzz": fuzz}
