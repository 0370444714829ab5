"""FSDP2 (Lightning's ``ModelParallelStrategy``, ``fully_shard`` in ``CausalLMModule.configure_model``) on 2 gloo CPU
ranks trains exactly like one process on the same global batches (issue 18, "Scale-out: FSDP2 as well as DDP")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent / "fsdp2_run.py"
TIMEOUT_S = 300


def _run(tmp_path: Path, world: int, callback: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), str(world), callback], env=env,
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"FSDP2 run (world {world}) did not finish in {TIMEOUT_S} s:\n{out[-4000:]}")
    assert proc.returncode == 0, out[-6000:]
    return torch.load(tmp_path / f"weights_{world}.pt")


@pytest.mark.slow
@pytest.mark.parametrize("callback", ["none", "excess_loss"])
def test_fsdp2_two_ranks_equal_one_process(tmp_path, callback):
    """The parameters are really sharded (DTensors) under the strategy, and after 2 SGD steps (lr 1: the update is
    the gradient) every weight equals the 1-process run's within fp32 tolerance — the global token normalisation,
    the tied lm_head's gradient (used by the fused op outside the lm_head's own forward) and the reduce-scatter
    all included."""
    single = _run(tmp_path, 1, callback)
    sharded = _run(tmp_path, 2, callback)
    assert sharded["sharded"] and not single["sharded"]
    from helpers import SGDModule, tiny_config

    torch.manual_seed(0)
    init = SGDModule(model_config=tiny_config()).state_dict()
    moved = False
    for name, w in single["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], w, rtol=1e-4, atol=1e-6, msg=name)
        moved |= not torch.equal(w, init[name])
    assert moved
