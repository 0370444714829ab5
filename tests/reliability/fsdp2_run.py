"""Run by tests/reliability/test_fsdp2.py in a subprocess: ``CausalLMModule`` (SGD) trained under Lightning's
``ModelParallelStrategy`` (FSDP2 through ``CausalLMModule.configure_model``) on 2 gloo CPU ranks, or in one process
with the same global batches. Rank 0 writes the full (gathered) weights to ``<out_dir>/weights_<world>.pt``.
Usage: ``python fsdp2_run.py OUT_DIR WORLD_SIZE [CALLBACK]`` (CALLBACK: ``none`` | ``excess_loss``)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: helpers
sys.path.insert(0, str(HERE.parent.parent))  # the repo: lit_ft

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402


def main(out_dir: str, world: int, callback: str) -> None:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy

    from helpers import SGDModule, random_batch, tiny_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    module = SGDModule(model_config=tiny_config())
    data = random_batch(8, 16, prompt_len=3, seed=2)
    data["labels"][:4, 3:12] = -100  # rank 0 holds far fewer supervised tokens than rank 1
    micro = 8 // world
    batches = [{k: v[i: i + micro] for k, v in data.items()} for i in range(0, 8, micro)] * 2
    callbacks = []
    if callback == "excess_loss":  # rank-global top-k of the excess loss against a frozen reference copy
        from lit_ft.callbacks import ExcessLossSelection

        callbacks.append(ExcessLossSelection(keep_ratio=0.5, reference="initial"))
    strategy = ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1) if world > 1 else "auto"
    trainer = pl.Trainer(
        accelerator="cpu", devices=world, strategy=strategy, max_steps=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=callbacks,
        use_distributed_sampler=True,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in module.state_dict().items()}
    sharded = any(hasattr(p, "full_tensor") for p in module.parameters())
    if trainer.global_rank == 0:
        torch.save({"weights": full, "sharded": sharded}, Path(out_dir) / f"weights_{world}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "none")
