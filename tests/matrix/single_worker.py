"""One single-process cell of the compatibility matrix: one technique under one single-process setting
(``single_settings.py``: bf16, accum, checkpointing, compile, lora, resume_mid_epoch, sigkill, fuzz), run by
``run_matrix.py`` as its own subprocess with a timeout (this script is never pytest).

It writes ``rank0.json`` as it goes (the phase: ``build``, ``<run> setup``, ``<run> step N``; on an exception its
type, message, traceback and phase, like ``worker.py``) and, when the setting finished, ``result.json`` with the
setting's ``{"category", "outcome", "detail"}``. ``--child`` is the sigkill setting's training child.

Usage: ``python tests/matrix/single_worker.py TECHNIQUE SETTING CELL_DIR [--child]``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))  # worker, single_job, single_settings, fuzz_cell
sys.path.insert(0, str(HERE.parent))  # tests/: helpers
sys.path.insert(0, str(REPO))  # the repo: lit_ft, tests.contract

from single_settings import SETTINGS, SINGLE_SETTINGS  # noqa: E402
from worker import Progress  # noqa: E402


def run(technique: str, setting: str, cell: Path, child: bool = False) -> int:
    """Run the cell; 0 when the setting finished (whatever its outcome), 1 when it raised."""
    from single_job import SingleJob
    from single_settings import sigkill_child

    progress = Progress(cell / "child", 0) if child else Progress(cell, 0)
    try:
        progress.phase("import")
        import torch

        torch.set_num_threads(1)
        progress.phase("build")
        job = SingleJob(technique, cell, progress)
    except Exception as e:  # noqa: BLE001  the finding is the exception itself
        progress.error(e, "build")
        return 1
    try:
        t0 = time.perf_counter()
        if child:
            sigkill_child(job)
            return 0
        out = SETTINGS[setting](job)
        out.setdefault("detail", {})["cell_seconds"] = round(time.perf_counter() - t0, 1)
    except Exception as e:  # noqa: BLE001
        progress.error(e, "setting")
        return 1
    progress.phase("done")
    (cell / "result.json").write_text(json.dumps(out, indent=1, default=str))
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("technique")
    p.add_argument("setting", choices=SINGLE_SETTINGS)
    p.add_argument("cell_dir")
    p.add_argument("--child", action="store_true", help="the sigkill setting's training child")
    a = p.parse_args()
    cell = Path(a.cell_dir)
    if a.child:
        (cell / "child").mkdir(parents=True, exist_ok=True)
    return run(a.technique, a.setting, cell, a.child)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
