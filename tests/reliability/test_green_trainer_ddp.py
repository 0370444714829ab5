"""issue 18 item 7: GreenTrainer under DDP with a token scorer that communicates across ranks (ExcessLossSelection's
global top-k, QTuning's triage all-gather). Its FLOPs-model probe ran ``training_step`` on rank 0 only while rank 1
waited in ``broadcast``: a deadlock. The run goes in a subprocess with a timeout, so a deadlock fails the test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent / "green_trainer_ddp_run.py"
TIMEOUT_S = 300  # a healthy run takes well under a minute on 2 cores; a deadlock waits forever


@pytest.mark.slow
@pytest.mark.parametrize("scorer", ["excess_loss", "qtuning"])
def test_green_trainer_with_communicating_scorer_under_ddp(tmp_path, scorer):
    """issue 18 item 7: 2 gloo ranks finish (no deadlock), select once, and select the same tensors with the same
    FLOPs model on both ranks."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), scorer], env=env, cwd=str(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks share this session's process group
        out, _ = proc.communicate()
        pytest.fail(f"GreenTrainer + {scorer} under 2-rank DDP did not finish in {TIMEOUT_S} s (deadlock):\n"
                    f"{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [r["global_step"] for r in ranks] == [2, 2]
    assert ranks[0]["n_selections"] >= 1 and ranks[0]["selection"]
    assert ranks[0]["selection"] == ranks[1]["selection"]
    assert ranks[0]["t_fp"] == ranks[1]["t_fp"] and ranks[0]["t_fp"] > 0


def test_green_trainer_before_a_batch_start_preparer_is_refused_at_setup():
    """issue 18 item 7 (single process): GreenTrainer's probe runs training_step at on_train_batch_start, so a token
    callback that prepares the batch there (ExcessLossSelection's reference NLL) must come first; listed after it,
    the probe failed with ExcessLossSelection's misleading "no reference NLL". Now setup names the pair and the fix."""
    import torch

    from lit_ft.callbacks import ExcessLossSelection, GreenTrainer

    from helpers import ListDataModule, SGDModule, quiet_trainer, tiny_config

    torch.manual_seed(0)
    trainer = quiet_trainer([GreenTrainer(measure_every_n_steps=0), ExcessLossSelection(keep_ratio=0.5, reference="initial")],
                            max_steps=1, limit_val_batches=0)
    with pytest.raises(ValueError, match=r"ExcessLossSelection is listed after GreenTrainer.*"
                                         r"Fix: list ExcessLossSelection before GreenTrainer"):
        trainer.fit(SGDModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=2))
