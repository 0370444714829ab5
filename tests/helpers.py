"""Small shared pieces for tests: random causal-LM batches, a list DataModule, plain user modules."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lit_ft.callbacks._param_plan import ParamPlanCallback
from lit_ft.modules import CausalLMModule
from lit_ft.testing import tiny_llama_config

REPO = str(Path(__file__).resolve().parent.parent)

VOCAB = 384


def random_batch(batch_size: int = 4, seq_len: int = 16, vocab: int = VOCAB, prompt_len: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    labels = ids.clone()
    labels[:, :prompt_len] = -100
    attn = torch.ones_like(ids)
    # ragged right padding on half the rows
    for b in range(0, batch_size, 2):
        cut = seq_len - 1 - (b % 3)
        attn[b, cut:] = 0
        labels[b, cut:] = -100
    return {"input_ids": ids, "attention_mask": attn, "labels": labels, "sample_idx": torch.arange(batch_size) + seed * batch_size}


class ListDataModule(pl.LightningDataModule):
    def __init__(self, n_batches: int = 6, batch_size: int = 4, seq_len: int = 16) -> None:
        super().__init__()
        self.batches = [random_batch(batch_size, seq_len, seed=i) for i in range(n_batches)]

    def train_dataloader(self):
        return DataLoader(self.batches, batch_size=None, shuffle=False)

    def val_dataloader(self):
        return DataLoader(self.batches[:2], batch_size=None, shuffle=False)


def tiny_config(**kw) -> dict:
    return tiny_llama_config(vocab_size=VOCAB, **kw)


class PlainHFModule(pl.LightningModule):
    """What a typical user writes: the HF model computes its own loss."""

    def __init__(self, lr: float = 1e-2) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = dict(tiny_config())
        cfg.pop("model_type")
        self.model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss  # exactly the README example (sample_idx rides along in kwargs)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SGDModule(CausalLMModule):
    """SGD (lr 1) makes the update proportional to the gradient: any selection or normalisation difference between
    runs shows in the weights."""

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


def fit_global_batches(strategy: str, devices: int, batch_size: int, init_state: dict, data: dict, callbacks: list,
                       steps: int = 1, accumulate: int = 1):
    """Train :class:`SGDModule` from ``init_state`` on ``data`` (dict of [N, ...] tensors) cut into micro-batches of
    ``batch_size`` in order; under DDP the distributed sampler gives rank r every r-th micro-batch, so 2 ranks x 4
    see exactly the global batches that 1 process x 8 sees (and 2 ranks x 2 micro-batches x 2 with ``accumulate=2``).
    Returns ``(state_dict, trainer)``."""
    module = SGDModule(model_config=tiny_config())
    module.load_state_dict(init_state)
    n = next(iter(data.values())).shape[0]
    batches = [{k: v[i : i + batch_size] for k, v in data.items()} for i in range(0, n, batch_size)]
    trainer = pl.Trainer(
        accelerator="cpu", strategy=strategy, devices=devices, max_steps=steps, accumulate_grad_batches=accumulate,
        logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        use_distributed_sampler=True,
    )
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return module.state_dict(), trainer


def tiny_hf_model(seed: int | None = 0, train: bool = False, **overrides):
    """A tiny random Llama causal LM (``tiny_config(**overrides)``), in eval mode unless ``train``; ``seed=None``
    draws from the current random state."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = dict(tiny_config(**overrides))
    cfg.pop("model_type")
    return AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **cfg)).train(train)


class NoInputEmbeddingsModule(pl.LightningModule):
    """A module whose HF model reports no input-embedding layer (prompt callbacks must refuse it clearly)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_hf_model(train=True)
        self.model.get_input_embeddings = lambda: None


def run_interpreted(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    """``python <args>`` in a subprocess with ``TRITON_INTERPRET=1`` (Triton's CPU interpreter; the variable must be
    set before triton is imported, so never in the pytest process itself), from the repo root."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


class AdamWPlain(PlainHFModule):
    """The plain user module with AdamW (weight decay 0.1): frozen tensors must not move even under decay."""

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.1)


class LoraModule(pl.LightningModule):
    """A user module around a PEFT-LoRA tiny Llama (q/v adapters trainable, base frozen by PEFT), trained with AdamW
    over its trainable tensors. ``seed``: as in :func:`tiny_hf_model` (``None`` = the current random state)."""

    def __init__(self, lr: float = 1e-2, weight_decay: float = 0.1, seed: int | None = 0, **overrides) -> None:
        super().__init__()
        import peft

        base = tiny_hf_model(seed, train=True, **overrides)
        self.model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        self.lr, self.weight_decay = lr, weight_decay

    def training_step(self, batch, batch_idx):
        return self.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=self.lr,
                                 weight_decay=self.weight_decay)


class SnapshotPrompt(pl.Callback):
    """Copies the lit_ft prompt tensors when training starts (after setup installed them)."""

    def on_train_start(self, trainer, pl_module):
        self.at_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items() if k.startswith("lit_ft_")}


def quiet_trainer(callbacks, max_steps: int = 3, **kw) -> pl.Trainer:
    """A CPU Trainer without logger, checkpoints, progress bar or model summary; its root dir is a fresh temporary
    folder unless given (pictures a technique logs must never land in the working directory)."""
    import tempfile

    kw.setdefault("default_root_dir", tempfile.mkdtemp(prefix="lit_ft_test_"))
    return pl.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **kw)


def capture_trunk_inputs(model):
    """Record the keyword arguments the decoder trunk receives (a pre-hook registered after lit_ft's prompt
    injector sees its edits). Returns ``(dict, hook handle)``."""
    seen: dict = {}

    def hook(module, args, kwargs):
        seen.update(kwargs)

    return seen, model.model.register_forward_pre_hook(hook, with_kwargs=True)


class FitAndResume(NamedTuple):
    """What :func:`fit_and_resume` ran: the uninterrupted (``full``) and the resumed run's module, Trainer and the
    callbacks ``make_callbacks`` built (without the ModelCheckpoint), plus the checkpoint the resume started from."""

    full: pl.LightningModule
    resumed: pl.LightningModule
    trainer_full: pl.Trainer
    trainer_resumed: pl.Trainer
    callbacks_full: list
    callbacks_resumed: list
    ckpt: Path


def fit_and_resume(make_module: Callable[[], pl.LightningModule], make_callbacks: Callable[[], list], save_dir,
                   max_steps: int = 4, make_datamodule: Callable[[], pl.LightningDataModule] | None = None,
                   ckpt_name: str = "epoch=0-step=2.ckpt", before_resume: Callable[[Path], object] | None = None,
                   **trainer_kw) -> FitAndResume:
    """The checkpoint -> resume check: fit ``make_module()`` with ``make_callbacks()`` uninterrupted for ``max_steps``
    with a ModelCheckpoint every 2 steps into ``save_dir``, then fit a fresh module and callbacks resumed from
    ``save_dir / ckpt_name``. ``torch.manual_seed(0)`` runs before each run's module and callbacks are built; the data
    is ``make_datamodule()`` (default ``ListDataModule(n_batches=2)``: the step-2 checkpoint falls on an epoch
    boundary, so the data order is the same). ``before_resume(ckpt)`` runs between the two fits; ``trainer_kw``
    adds to or overrides the Trainer arguments (no logger, progress bar or model summary, ``limit_val_batches=0``)."""
    make_datamodule = make_datamodule or (lambda: ListDataModule(n_batches=2))
    save_dir = Path(save_dir)
    ckpt = save_dir / ckpt_name

    def run(ckpt_path=None, checkpoint_dir=None):
        torch.manual_seed(0)
        module = make_module()
        callbacks = list(make_callbacks())
        saver = [ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=2, save_top_k=-1)] if checkpoint_dir \
            else []
        kw = dict(max_steps=max_steps, logger=False, enable_checkpointing=bool(checkpoint_dir),
                  enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                  default_root_dir=str(save_dir))
        kw.update(trainer_kw)
        trainer = pl.Trainer(callbacks=callbacks + saver, **kw)
        trainer.fit(module, datamodule=make_datamodule(), ckpt_path=ckpt_path)
        return module, trainer, callbacks

    full, trainer_full, callbacks_full = run(checkpoint_dir=save_dir)
    assert ckpt.is_file(), f"no {ckpt_name} in {sorted(q.name for q in save_dir.iterdir())}"
    if before_resume is not None:
        before_resume(ckpt)
    resumed, trainer_resumed, callbacks_resumed = run(ckpt_path=str(ckpt))
    return FitAndResume(full, resumed, trainer_full, trainer_resumed, callbacks_full, callbacks_resumed, ckpt)


def assert_state_dicts_equal(a: Mapping, b: Mapping) -> None:
    """The same keys and, under each, bit-identical values (``assert_close`` with ``rtol=0, atol=0``)."""
    assert a.keys() == b.keys(), \
        f"keys differ: only in a {sorted(set(a) - set(b))}, only in b {sorted(set(b) - set(a))}"
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


class PlanCallback(ParamPlanCallback):
    """A minimal parameter-plan callback: ``make(pl_module) -> ParamPlan`` at setup, under state key ``key``
    (composition / conflict tests)."""

    technique_name = "test_plan"

    def __init__(self, make, key: str = "test_plan"):
        self.make, self.key = make, key

    @property
    def state_key(self):
        return self.key

    def build_plan(self, trainer, pl_module):
        return self.make(pl_module)


def snapshot_params(module) -> dict:
    """Detached copies of every parameter, by name."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def moved_params(module, before: dict) -> set:
    """Names of the parameters that differ (bitwise) from ``before``."""
    return {n for n, p in module.named_parameters() if not torch.equal(p, before[n])}


GREEDY = dict(do_sample=False, eos_token_id=None, pad_token_id=0)


def greedy_generate(model, ids: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """``model.generate`` greedily for ``steps`` new tokens (no eos stop), all-ones attention mask."""
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, **GREEDY)


def check_generation(model, ids: torch.Tensor, steps: int = 5, left_pad: int = 0, before_step=None) -> torch.Tensor:
    """Assert that greedy ``generate()`` equals the step-by-step argmax of ``forward`` on the growing sequence
    (``before_step(seq)`` runs before each forward, e.g. to set a prompt's per-request context), and, with
    ``left_pad > 0``, that the row left-padded by ``left_pad`` pad tokens generates the same. Returns the output."""
    gen = greedy_generate(model, ids, steps)
    seq = ids
    with torch.no_grad():
        for _ in range(steps):
            if before_step is not None:
                before_step(seq)
            seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert gen.tolist() == seq.tolist()
    if left_pad:
        pads = torch.zeros(ids.shape[0], left_pad, dtype=torch.long)
        padded = torch.cat([pads, ids], dim=1)
        mask = torch.cat([pads, torch.ones_like(ids)], dim=1)
        out = model.generate(input_ids=padded, attention_mask=mask, max_new_tokens=steps, **GREEDY)
        assert out[:, left_pad:].tolist() == gen.tolist()
    return gen


def _one_thread_worker(rank: int, fn: Callable, *args) -> None:
    # A forked child inherits the parent's OpenMP state but not its thread pool: the first parallel region in the
    # child waits forever on threads that do not exist (seen as a CI hang whenever OMP_NUM_THREADS > 1). One
    # intra-op thread keeps the child out of parallel regions.
    torch.set_num_threads(1)
    fn(rank, *args)


def run_forked(fn: Callable, nprocs: int, args: tuple = ()) -> None:
    """``torch.multiprocessing.start_processes`` with fork (no re-import of torch / lightning in the children:
    spawn costs tens of seconds on two cores), each child single-threaded so it cannot hang on the parent's
    OpenMP pool. ``fn(rank, *args)`` as with ``start_processes``."""
    import torch.multiprocessing as mp

    mp.start_processes(_one_thread_worker, args=(fn, *args), nprocs=nprocs, join=True, start_method="fork")
