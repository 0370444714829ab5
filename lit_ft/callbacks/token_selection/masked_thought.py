"""Masked Thought (MFT): random replacement of response tokens in the input, labels unchanged."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lit_ft.core.counter_hash import M32, fmix32
from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE, adopt_saved_state, record_resume_args
from lit_ft.core.validate import check_choice, check_int, check_number

MODES = ("mask", "random")
RATE_SAMPLINGS = ("fixed", "uniform")

_M32 = M32
_SAMPLE_IDX_HINT = {
    "sample_idx": "lit_ft.data.SFTDataModule / ClassificationDataModule (always added), or add a long [B] "
    "'sample_idx' tensor in your collate_fn. MaskedThought derives each sample's noise from it so that masks do "
    "not depend on DDP sharding or resuming; pass require_sample_idx=False to fall back to the position in the "
    "batch (masks then change with the number of ranks)",
}


# -- counter-based hash: uint32 values held in int64 tensors (exact on every device, no overflow) ---------------
def _mix(h: torch.Tensor, v: torch.Tensor | int) -> torch.Tensor:
    """Fold the (non-negative, up to 64-bit) value ``v`` into the running hash ``h``."""
    v = torch.as_tensor(v, dtype=torch.int64, device=h.device)
    for word in (v & _M32, (v >> 32) & _M32):
        h = fmix32(h ^ fmix32((word + 0x9E3779B9) & _M32))
    return h


def _scalar_hash(*words: int) -> int:
    h = torch.zeros((), dtype=torch.int64)
    for w in words:
        h = _mix(h, int(w) & 0xFFFFFFFFFFFFFFF)
    return int(h)


@technique(name="masked_thought", family="token_selection",
           paper="Masked Thought: Simply Masking Partial Reasoning Steps Can Improve Mathematical Reasoning "
                 "Learning of Language Models",
           arxiv="2403.02178")
class MaskedThought(Callback):
    """Masked Thought fine-tuning, MFT (Chen et al. 2024, "Masked Thought: Simply Masking Partial Reasoning Steps
    Can Improve Mathematical Reasoning Learning of Language Models"; code: ChangyuChen347/MaskedThought).

    Algorithm, before every training forward (``on_train_batch_start``; a pure batch editor, so it works with any
    module, including a plain ``return self.model(**batch).loss``):

    1. ``p_t = max_rate * min(1, step / (warmup_fraction * total_steps))`` (``step`` = ``trainer.global_step``);
       with ``rate_sampling="uniform"`` the step's rate is ``p ~ U(0, p_t)`` instead;
    2. every *response* token of ``input_ids`` (a position whose label is not -100; prompt and padding are never
       touched) is replaced with probability ``p`` — by ``mask_token_id`` (``mode="mask"``) or by a uniformly random
       vocabulary token (``mode="random"``, the GSM8K script's ``replace=True, replace_rate=1``);
    3. ``labels`` keep the original tokens, so the model still learns to predict them from a noisy context.

    Validation batches are never edited. The noise of each sample is a counter-based hash of
    ``(seed, global_step, sample_idx, position)``: deterministic, the same whatever the number of DDP ranks or the
    padding length, and the same in a resumed run. The DataLoader's tensors are never modified (the edited
    ``input_ids`` is a new tensor). Place it before token scorers that read the batch before the forward (e.g.
    ``ExcessLossSelection``'s reference model) in the callback list, so they see the same input the model trains on.

    Args:
        max_rate: the replacement probability reached after the warm-up, in [0, 1). 0.4 is the paper's GSM8K
            setting, 0.2 its MATH / MetaMath setting; 0 disables the technique (a control).
        warmup_fraction: fraction of the total training steps over which the rate ramps linearly from 0 to
            ``max_rate``, in [0, 1] (the scripts' ``mask_rate_warmup_ratio`` 0.66); 0 = ``max_rate`` from the start.
            Total steps = ``trainer.max_steps`` if set, else ``trainer.estimated_stepping_batches``.
        mode: ``"random"`` (uniform random token ids in ``[0, vocab_size)`` of the model config, the GSM8K
            script) or ``"mask"`` (one fixed id, the MetaMath / MAmmoTH scripts).
        mask_token_id: the id used by ``mode="mask"``. ``None`` = the tokenizer's unk, else pad, else eos token
            (tokenizer from ``trainer.datamodule.tokenizer``), else the model config's ``pad_token_id``; an error
            if none exists.
        rate_sampling: ``"fixed"`` (use ``p_t``) or ``"uniform"`` (draw ``p ~ U(0, p_t)`` once per step, the
            MetaMath variant).
        exclude_special_tokens: ``mode="random"`` only: never draw the tokenizer's special ids nor the config's
            bos/eos/pad ids. Off by default, like the paper's GSM8K script as
            far as could be confirmed (its masking helper could not be consulted).
        seed: seed of the noise. ``None`` = the ``seed_everything`` seed (``PL_GLOBAL_SEED``) if set, else 0.
            Stored in the checkpoint; a resumed run uses the stored one.
        require_sample_idx: the batch must carry ``sample_idx`` (long [B], provided by ``SFTDataModule``).
            ``False`` = fall back to ``(batch_idx, row)`` when it is missing — deterministic, but the masks then
            depend on how samples are sharded across ranks.

    Resuming with changed arguments: the saved schedule position (step, run length, seed) stays valid, and the new
    ``max_rate`` / ``warmup_fraction`` / ``mode`` / ... apply from the resumed step on (a changed ``seed`` warns
    and the stored one is used).
    """

    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`)
    resume_decisions = {a: RESTORE for a in ("max_rate", "warmup_fraction", "mode", "mask_token_id", "rate_sampling",
                                             "exclude_special_tokens", "require_sample_idx")}

    def __init__(
        self,
        max_rate: float = 0.4,
        warmup_fraction: float = 0.66,
        mode: str = "random",
        mask_token_id: int | None = None,
        rate_sampling: str = "fixed",
        exclude_special_tokens: bool = False,
        seed: int | None = None,
        require_sample_idx: bool = True,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        check_number(owner, "max_rate", max_rate, low=0, high=1, high_open=True)
        check_number(owner, "warmup_fraction", warmup_fraction, low=0, high=1)
        check_choice(owner, "mode", mode, MODES)
        check_choice(owner, "rate_sampling", rate_sampling, RATE_SAMPLINGS)
        check_int(owner, "mask_token_id", mask_token_id, minimum=0, allow_none=True, null_means="the tokenizer's")
        check_int(owner, "seed", seed, minimum=0, allow_none=True, null_means="the run's seed")
        self.max_rate = float(max_rate)
        self.warmup_fraction = float(warmup_fraction)
        self.mode = mode
        self.mask_token_id = mask_token_id
        self.rate_sampling = rate_sampling
        self.exclude_special_tokens = bool(exclude_special_tokens)
        self.seed = seed
        self.require_sample_idx = bool(require_sample_idx)

        self._seed: int | None = seed  # resolved at setup / restored from a checkpoint
        self._total_steps: int | None = None  # resolved at the first batch / restored from a checkpoint
        self._mask_id: int | None = None
        self._candidates: torch.Tensor | None = None  # mode="random": the ids that may be drawn
        self._checked_batch = False
        self._step: int = 0
        self._rate: float = 0.0
        self._metrics: dict[str, torch.Tensor] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(max_rate=self.max_rate, mode=self.mode, warmup_fraction=self.warmup_fraction)

    # -- setup --------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            self._seed = int(env) % 2**32 if env is not None and env.lstrip("-").isdigit() else 0
        if stage != "fit":
            return
        from lit_ft.callbacks._token_scorer import TokenScorerCallback

        cbs = list(trainer.callbacks)
        mine = next((i for i, cb in enumerate(cbs) if cb is self), None)
        before = [type(cb).__name__ for cb in cbs[: mine or 0] if isinstance(cb, TokenScorerCallback)]
        if mine is not None and before:
            rank_zero_warn(
                f"MaskedThought comes after {before} in the callback list, so those see the batch before its "
                "tokens are replaced (e.g. a reference model scores the clean input while the model trains on the "
                "masked one). Put MaskedThought first."
            )

    # -- schedule -----------------------------------------------------------------------------------------------
    def _resolve_total_steps(self, trainer: pl.Trainer) -> int:
        if self._total_steps is None:
            if trainer.max_steps is not None and trainer.max_steps > 0:
                total = float(trainer.max_steps)
            else:
                total = float(trainer.estimated_stepping_batches)
            if not math.isfinite(total):
                if self.warmup_fraction > 0:
                    raise ValueError(
                        "MaskedThought: warmup_fraction > 0 needs a finite number of training steps; set "
                        "trainer.max_steps (or max_epochs with a sized DataLoader) or warmup_fraction=0"
                    )
                total = 0
            self._total_steps = int(total)
        return self._total_steps

    def scheduled_rate(self, step: int, total_steps: int) -> float:
        """``p_t`` at optimizer step ``step`` of ``total_steps`` (before ``rate_sampling``)."""
        ramp = self.warmup_fraction * total_steps
        if ramp <= 0:
            return self.max_rate
        return self.max_rate * min(1.0, step / ramp)

    def rate_at(self, step: int, total_steps: int) -> float:
        """The replacement probability used at ``step`` (after ``rate_sampling``; the same on every rank)."""
        p = self.scheduled_rate(step, total_steps)
        if self.rate_sampling == "uniform":
            assert self._seed is not None
            p *= _scalar_hash(self._seed, step, 0x52415445) / 2**32
        return p

    # -- token ids ----------------------------------------------------------------------------------------------
    @staticmethod
    def _tokenizer(trainer: pl.Trainer) -> Any:
        dm = getattr(trainer, "datamodule", None)
        return getattr(dm, "tokenizer", None) if dm is not None else None

    @staticmethod
    def _hf_config(pl_module: pl.LightningModule) -> Any:
        from lit_ft.core.introspect import ModelLayoutError, find_hf_model

        try:
            return find_hf_model(pl_module).config
        except ModelLayoutError:
            return None

    def _resolve_mask_id(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> int:
        if self.mask_token_id is not None:
            return self.mask_token_id
        tok = self._tokenizer(trainer)
        if tok is not None:
            for attr in ("unk_token_id", "pad_token_id", "eos_token_id"):
                tid = getattr(tok, attr, None)
                if isinstance(tid, int):
                    return tid
        cfg = self._hf_config(pl_module)
        tid = getattr(cfg, "pad_token_id", None) if cfg is not None else None
        if isinstance(tid, int):
            return tid
        raise ValueError(
            "MaskedThought(mode='mask'): no mask token id. Set mask_token_id=..., or use a DataModule with a "
            "`tokenizer` that has an unk/pad/eos token (e.g. lit_ft.data.SFTDataModule), or a model config with "
            "pad_token_id"
        )

    def _resolve_candidates(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.Tensor:
        cfg = self._hf_config(pl_module)
        tok = self._tokenizer(trainer)
        vocab = getattr(cfg, "vocab_size", None) if cfg is not None else None
        if not isinstance(vocab, int) and tok is not None:
            vocab = len(tok)
        if not isinstance(vocab, int) or vocab <= 0:
            raise ValueError(
                "MaskedThought(mode='random'): could not find the vocabulary size: the module has no Hugging Face "
                "model with config.vocab_size and the DataModule no `tokenizer`. Use mode='mask' with mask_token_id"
            )
        ids = torch.arange(vocab, dtype=torch.long)
        if self.exclude_special_tokens:
            special: set[int] = set(getattr(tok, "all_special_ids", None) or [])
            for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
                v = getattr(cfg, attr, None) if cfg is not None else None
                special.update([v] if isinstance(v, int) else [x for x in (v or []) if isinstance(x, int)])
            keep = torch.ones(vocab, dtype=torch.bool)
            keep[[s for s in special if 0 <= s < vocab]] = False
            ids = ids[keep]
            if ids.numel() == 0:
                raise ValueError("MaskedThought: exclude_special_tokens=True leaves no token to draw")
        return ids

    # -- the edit -----------------------------------------------------------------------------------------------
    def _check(self, batch: Any) -> None:
        keys = ("input_ids", "labels") + (("sample_idx",) if self.require_sample_idx else ())
        require_keys(batch, keys, who="MaskedThought", providers=_SAMPLE_IDX_HINT)
        ids, labels = batch["input_ids"], batch["labels"]
        if not isinstance(ids, torch.Tensor) or not isinstance(labels, torch.Tensor) or ids.shape != labels.shape:
            raise ValueError(
                "MaskedThought: batch['input_ids'] and batch['labels'] must be tensors of the same shape, got "
                f"{getattr(ids, 'shape', type(ids))} and {getattr(labels, 'shape', type(labels))}"
            )
        sidx = batch.get("sample_idx")
        if sidx is not None and (not isinstance(sidx, torch.Tensor) or tuple(sidx.shape) != (ids.shape[0],)):
            raise ValueError(
                f"MaskedThought: batch['sample_idx'] must be a long tensor of shape [{ids.shape[0]}], got "
                f"{getattr(sidx, 'shape', type(sidx))}"
            )

    def noise(self, sample_keys: torch.Tensor, seq_len: int, step: int, stream: int) -> torch.Tensor:
        """uint32 hash (in int64) of ``(seed, step, sample_key, position, stream)``, shape [B, seq_len]."""
        assert self._seed is not None
        device = sample_keys.device
        h = _mix(torch.zeros((), dtype=torch.int64, device=device), self._seed & 0x7FFFFFFFFFFFFFFF)
        h = _mix(h, step)
        h = _mix(h.expand(sample_keys.shape[0]), sample_keys.to(torch.int64) & 0x7FFFFFFFFFFFFFFF)  # [B]
        pos = torch.arange(seq_len, dtype=torch.int64, device=device)
        return _mix(_mix(h[:, None], pos[None, :]), stream)

    def mask_batch(self, batch: dict[str, Any], step: int, rate: float, batch_idx: int = 0) -> torch.Tensor:
        """Replace response tokens of ``batch['input_ids']`` (a new tensor is stored in the dict) and return the
        bool [B, T] mask of replaced positions."""
        ids, labels = batch["input_ids"], batch["labels"]
        B, T = ids.shape
        sidx = batch.get("sample_idx")
        if sidx is not None:
            keys, step_key = sidx.to(ids.device), step
        else:  # documented fallback: depends on batch layout
            keys = torch.arange(B, dtype=torch.int64, device=ids.device)
            step_key = _scalar_hash(step, batch_idx, 0x504F53)
        response = labels != IGNORE_INDEX
        threshold = min(int(rate * 2**32), 2**32)
        masked = response & (self.noise(keys, T, step_key, 0) < threshold) if threshold > 0 else torch.zeros_like(response)
        if self.mode == "mask":
            assert self._mask_id is not None
            new = torch.full_like(ids, self._mask_id)
        else:
            assert self._candidates is not None
            cand = self._candidates.to(ids.device)
            new = cand[self.noise(keys, T, step_key, 1) % cand.numel()].to(ids.dtype)
        batch["input_ids"] = torch.where(masked, new, ids)  # new tensor: the DataLoader's copy is untouched
        return masked

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._checked_batch:
            self._check(batch)
            if self.mode == "mask":
                self._mask_id = self._resolve_mask_id(trainer, pl_module)
            else:
                self._candidates = self._resolve_candidates(trainer, pl_module)
            self._checked_batch = True
        step = int(trainer.global_step)
        rate = self.rate_at(step, self._resolve_total_steps(trainer))
        masked = self.mask_batch(batch, step, rate, batch_idx)
        n_resp = (batch["labels"] != IGNORE_INDEX).sum().clamp_min(1)
        self._step, self._rate = step, rate
        self._metrics = {
            "lit_ft/masked_thought/rate": torch.tensor(rate, dtype=torch.float32),
            "lit_ft/masked_thought/masked_fraction": (masked.sum() / n_resp).float(),
        }

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        bs = batch["input_ids"].shape[0] if isinstance(batch, Mapping) else None
        for name, value in self._metrics.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=bs)

    # -- checkpoint ---------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._seed, "total_steps": self._total_steps, "step": self._step, "rate": self._rate}

    # -- resume with changed arguments: restore or refuse, never a silent reset (lit_ft.core.resume) -------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        record_resume_args(self, checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        adopt_saved_state(self, trainer, checkpoint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        seed, total = state_dict.get("seed"), state_dict.get("total_steps")
        if self.seed is not None and seed is not None and seed != self.seed:
            rank_zero_warn(f"MaskedThought: resuming with the checkpoint's seed {seed} instead of seed={self.seed}")
        if seed is not None:
            self._seed = int(seed)
        if total is not None:
            self._total_steps = int(total)  # the ramp of the run that wrote the checkpoint
        self._step = int(state_dict.get("step", 0))
        self._rate = float(state_dict.get("rate", 0.0))
