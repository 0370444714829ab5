"""Run by tests/reliability/test_green_trainer_ddp.py in a subprocess: GreenTrainer with a communicating token scorer
on 2 gloo CPU ranks (Lightning's "ddp" launcher re-runs this script per rank). Each rank writes what it selected to
``<out_dir>/rank<r>.json``. Usage: ``python green_trainer_ddp_run.py OUT_DIR SCORER`` (``excess_loss`` | ``qtuning``).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: helpers
sys.path.insert(0, str(HERE.parent.parent))  # the repo: lit_ft

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


def main(out_dir: str, scorer: str) -> None:
    import lightning.pytorch as pl

    from lit_ft.callbacks import ExcessLossSelection, GreenTrainer, QTuning

    from helpers import SGDModule, random_batch, tiny_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = SGDModule(model_config=tiny_config())
    batches = [random_batch(4, 16, prompt_len=3, seed=s) for s in range(4)]
    token_cb = (ExcessLossSelection(keep_ratio=0.5, reference="initial") if scorer == "excess_loss"
                else QTuning(sample_ratio=0.5, scoring="inline", plot_every_n_steps=0))
    green = GreenTrainer(rho=0.5, interval=1, quantization=50, measure_every_n_steps=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_steps=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[token_cb, green], use_distributed_sampler=True,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    Path(out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps({
        "selection": green.last_selection, "n_selections": green.n_selections,
        "t_fp": green.profile.t_fp if green.profile is not None else None,
        "global_step": trainer.global_step, "world_size": trainer.world_size,
    }))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
