"""cDPO's critical-token scoring: per-token weights of the preference pairs from a positive and a negative model."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from lit_ft.callbacks.objectives._critical_cache import CriticalWeightsCache, StaleCacheError
from lit_ft.callbacks.objectives._critical_data import (PairRecord, collect, data_digest,
                                                        require_preference_batch)
from lit_ft.callbacks.objectives._critical_models import (ContrastiveTraining, base_copy, files_fingerprint,
                                                          load_contrastive, score_rows, tensors_fingerprint,
                                                          train_contrastive)
from lit_ft.core.frozen import DTYPES
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_str, check_str_list

__all__ = ["CriticalTokenScoring", "StaleCacheError"]

SPLIT = "train"
KEYS = ("chosen_token_weights", "rejected_token_weights")


@technique(name="critical_token_scoring", family="objectives",
           paper="Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning Capability",
           arxiv="2411.19943")
class CriticalTokenScoring(pl.Callback):
    """Critical-token weights for token-level DPO (cDPO's contrastive estimation).

    Paper: Lin et al., *Critical Tokens Matter: Token-Level Contrastive Estimation Enhances LLM's Reasoning
    Capability* (arXiv 2411.19943, ICML 2025); code ``chenzhiling9954/Critical-Tokens-Matter``.

    Algorithm:

    1. a positive and a negative model are LoRA-SFT'd from the base (the trained model as it starts) on the
       positive and the negative trajectories — here the train split's chosen and rejected responses — or loaded;
    2. for every supervised token ``y_t`` of a response, ``p_t = softmax((1 + β)·z_pos − β·z_neg)[y_t]`` (β = 1:
       the authors' ``2·z_pos − z_neg``); a low ``p_t`` on a rejected response marks a likely critical token;
    3. rejected weights ``1 − p_t``; chosen weights ``p_t``, or all 1 with ``only_neg`` (the authors' default).

    The scores are computed once, before the first training step, for the whole train split (a no-grad pass of
    both models; the contrastive log-softmax runs over vocabulary chunks, :mod:`lit_ft.kernels.contrastive_logprob`,
    never building either model's ``[T, V]`` logits) and written to ``cache_path``, keyed by split and
    ``sample_idx``, with a fingerprint of the models and β and a digest of the data: a later or resumed run reads
    the file, and a file made from other models, data or arguments is refused, never silently reused. Every
    training batch then gets ``chosen_token_weights`` and ``rejected_token_weights`` (float ``[B, T]``, aligned
    with the unshifted labels, 1 where the label is -100) at ``on_train_batch_start``;
    :class:`lit_ft.modules.TokenDPO` weights the rejected (and chosen) per-token log-ratios with them. Needs the
    preference batch of :class:`lit_ft.data.PreferenceDataModule`. Logs ``lit_ft/critical_token_scoring/
    rejected_weight_mean`` and ``critical_fraction`` (share of rejected tokens with ``p_t < 0.5``).

    Args:
        positive_model: the positive model to load instead of training it: a PEFT adapter folder (applied to the
            trained model as it starts), a local HF folder or a ``lit_ft.assets`` name; ``None`` = train it.
        negative_model: the negative model, likewise.
        train_contrastive: train the two models (LoRA-SFT of the base on the chosen / rejected responses of the
            train split); ``None`` = train them unless both models are given.
        beta: β >= 0 of the contrast ``(1 + β)·z_pos − β·z_neg`` (paper: 1).
        only_neg: weight only the rejected responses (chosen weights all 1), the authors' default.
        cache_path: the weights file; ``None`` = ``<default_root_dir>/critical_token_scoring/weights.pt``. Trained
            contrastive adapters are saved next to it (``positive_adapter/``, ``negative_adapter/``).
        score_batch_size: responses per scoring forward (int >= 1).
        contrastive_rank: LoRA rank of the contrastive models (authors: 8).
        contrastive_alpha: LoRA alpha (authors: 2 × rank = 16).
        contrastive_dropout: LoRA dropout in [0, 1) (authors: 0.1).
        contrastive_target_modules: module names LoRA wraps (authors: the MLP projections).
        contrastive_learning_rate: AdamW learning rate (authors: 3e-4; cosine schedule after warm-up).
        contrastive_epochs: epochs over the responses (authors: 1).
        contrastive_max_steps: stop each model's training after this many steps (``None`` = the epochs).
        contrastive_batch_size: responses per training step (authors: 6).
        contrastive_warmup_steps: linear warm-up steps (authors: 100), capped at a tenth of the run.
        seed: seed of the LoRA initialisation and the shuffle (the training run's random state is untouched).
        model_dtype: dtype of the contrastive models while scoring: ``"float32"``, ``"bfloat16"`` or ``"float16"``.
        vocab_chunk: vocabulary columns per block of the scoring kernel (``None`` = 8192).
    """

    technique_name = "critical_token_scoring"

    def __init__(self, positive_model: str | None = None, negative_model: str | None = None,
                 train_contrastive: bool | None = None, beta: float = 1.0, only_neg: bool = True,
                 cache_path: str | None = None, score_batch_size: int = 8, contrastive_rank: int = 8,
                 contrastive_alpha: float = 16.0, contrastive_dropout: float = 0.1,
                 contrastive_target_modules: list[str] | None = None, contrastive_learning_rate: float = 3e-4,
                 contrastive_epochs: int = 1, contrastive_max_steps: int | None = None,
                 contrastive_batch_size: int = 6, contrastive_warmup_steps: int = 100, seed: int = 0,
                 model_dtype: str = "float32", vocab_chunk: int | None = None) -> None:
        super().__init__()
        owner = type(self).__name__
        self.positive_model = check_str(owner, "positive_model", positive_model, allow_none=True,
                                        null_means="train it")
        self.negative_model = check_str(owner, "negative_model", negative_model, allow_none=True,
                                        null_means="train it")
        given = (self.positive_model is not None, self.negative_model is not None)
        if train_contrastive is None:
            train_contrastive = not all(given)
        self.train_contrastive = check_bool(owner, "train_contrastive", train_contrastive)
        if self.train_contrastive and any(given):
            raise ValueError(f"{owner}: `train_contrastive`=true trains both models, but positive_model / "
                             f"negative_model were given ({positive_model!r}, {negative_model!r}): load them "
                             "(train_contrastive=false or null) or train them, not both")
        if not self.train_contrastive and not all(given):
            raise ValueError(f"{owner}: `train_contrastive`=false needs both positive_model and negative_model, got "
                             f"({positive_model!r}, {negative_model!r})")
        self.beta = check_number(owner, "beta", beta, low=0)
        self.only_neg = check_bool(owner, "only_neg", only_neg)
        self.cache_path = check_str(owner, "cache_path", cache_path, allow_none=True,
                                    null_means="<default_root_dir>/critical_token_scoring/weights.pt")
        self.score_batch_size = check_int(owner, "score_batch_size", score_batch_size, minimum=1)
        targets = ["gate_proj", "up_proj", "down_proj"] if contrastive_target_modules is None else \
            check_str_list(owner, "contrastive_target_modules", contrastive_target_modules)
        self.contrastive = ContrastiveTraining(
            rank=check_int(owner, "contrastive_rank", contrastive_rank, minimum=1),
            alpha=check_number(owner, "contrastive_alpha", contrastive_alpha, low=0, low_open=True),
            dropout=check_number(owner, "contrastive_dropout", contrastive_dropout, low=0, high=1, high_open=True),
            target_modules=list(targets),
            learning_rate=check_number(owner, "contrastive_learning_rate", contrastive_learning_rate, low=0,
                                       low_open=True),
            epochs=check_int(owner, "contrastive_epochs", contrastive_epochs, minimum=1),
            max_steps=check_int(owner, "contrastive_max_steps", contrastive_max_steps, minimum=1, allow_none=True,
                                null_means="the epochs"),
            batch_size=check_int(owner, "contrastive_batch_size", contrastive_batch_size, minimum=1),
            warmup_steps=check_int(owner, "contrastive_warmup_steps", contrastive_warmup_steps, minimum=0),
            seed=check_int(owner, "seed", seed, minimum=0))
        self.model_dtype = check_choice(owner, "model_dtype", model_dtype, tuple(DTYPES))
        self.vocab_chunk = check_int(owner, "vocab_chunk", vocab_chunk, minimum=1, allow_none=True,
                                     null_means="8192")
        self.cache: CriticalWeightsCache | None = None
        self._fingerprint: str | None = None  # of the models the weights came from (checkpointed)
        self._restored_fingerprint: str | None = None
        self.scored_now = False  # whether this run scored (False: it read the file)
        self._checked = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(positive_model=self.positive_model, negative_model=self.negative_model,
                                        beta=self.beta, only_neg=self.only_neg, cache_path=self.cache_path)

    # -- the weights file ----------------------------------------------------------------------------------------
    def resolved_cache_path(self, trainer: pl.Trainer) -> Path:
        """``cache_path``, or its default under the Trainer's ``default_root_dir``."""
        if self.cache_path is not None:
            return Path(os.path.expanduser(self.cache_path))
        return Path(trainer.default_root_dir) / "critical_token_scoring" / "weights.pt"

    def _models_fingerprint(self, trained: torch.nn.Module, data: str) -> tuple[str, str]:
        """(fingerprint, description) of the contrastive models this run would use, and β."""
        if self.train_contrastive:
            # the models are a function of the base, the training arguments and the data
            # the base without any adapter of the trained model (whose random LoRA init must not matter)
            models = (f"trained from base {tensors_fingerprint(base_copy(trained))} with "
                      f"{self.contrastive.describe()} on {data}")
            desc = "LoRA-SFT of the base on the chosen / rejected responses"
        else:
            from lit_ft.assets import resolve

            models = "; ".join(f"{side} {files_fingerprint(resolve(src))}"
                               for side, src in (("positive", self.positive_model), ("negative", self.negative_model)))
            desc = f"positive {self.positive_model!r}, negative {self.negative_model!r}"
        h = hashlib.blake2b(digest_size=16)
        h.update(f"{models}|beta={self.beta!r}|dtype={self.model_dtype}".encode())
        return h.hexdigest(), desc

    def _train_batches(self, trainer: pl.Trainer) -> Any:
        """The whole train split in order, collated as the Trainer's loader collates it, through a loader of our own:
        the Trainer's loader (its sampler's position, which a checkpoint records, and its rank's shard under DDP) and
        the DataModule are left untouched."""
        from torch.utils.data import DataLoader, IterableDataset

        loader = trainer.train_dataloader
        if not isinstance(loader, DataLoader):
            raise TypeError("CriticalTokenScoring: the training data must be one torch DataLoader (e.g. "
                            f"lit_ft.data.PreferenceDataModule's), got {type(loader).__name__}")
        if isinstance(loader.dataset, IterableDataset):
            return loader  # no random access: one pass of the loader itself
        pre_batched = loader.batch_size is None and loader.batch_sampler is None
        return DataLoader(loader.dataset, batch_size=None if pre_batched else self.score_batch_size, shuffle=False,
                          collate_fn=loader.collate_fn, num_workers=0)

    def _build(self, trained: torch.nn.Module, device: torch.device, records: list[PairRecord], fingerprint: str,
               data: str, desc: str, path: Path) -> CriticalWeightsCache:
        who = type(self).__name__
        models = {}
        for side, source, rows in (("positive", self.positive_model, [r.chosen for r in records]),
                                   ("negative", self.negative_model, [r.rejected for r in records])):
            if self.train_contrastive:
                models[side] = train_contrastive(base_copy(trained), rows, self.contrastive, device,
                                                 f"lit_ft: training the {side} contrastive model",
                                                 path.parent / f"{side}_adapter", self.model_dtype)
            else:
                models[side] = load_contrastive(source, trained, who, self.model_dtype)
        kw = dict(beta=self.beta, batch_size=self.score_batch_size, device=device, vocab_chunk=self.vocab_chunk)
        rejected = score_rows(models["positive"], models["negative"], [r.rejected for r in records],
                              desc="lit_ft: scoring rejected responses (critical tokens)", **kw)
        chosen = None if self.only_neg else score_rows(models["positive"], models["negative"],
                                                       [r.chosen for r in records],
                                                       desc="lit_ft: scoring chosen responses", **kw)
        meta = {"models": desc, "beta": self.beta, "model_dtype": self.model_dtype,
                "contrastive": self.contrastive.describe() if self.train_contrastive else "loaded"}
        return CriticalWeightsCache.from_scores(records, rejected, chosen, split=SPLIT, fingerprint=fingerprint,
                                                data=data, meta=meta)

    def prepare(self, batches: Any, trained: torch.nn.Module, path: str | os.PathLike,
                device: torch.device | str | None = None, *, is_global_zero: bool = True,
                barrier: Any = None) -> CriticalWeightsCache:
        """The weights of the preference pairs in ``batches`` (one pass over the train split): read from ``path``
        when it holds this run's weights (a stale file raises :class:`StaleCacheError`), else made (the two models
        loaded or trained from ``trained``, the HF model as training starts, then every pair scored) and written
        there. What ``on_train_start`` runs; callable without a Trainer (e.g. to make the file ahead of a run)."""
        path = Path(path)
        device = torch.device(device) if device is not None else next(trained.parameters()).device
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # a shuffling sampler must not move the run's random state
            records = collect(batches, type(self).__name__)
        data = data_digest(records)
        resumed = self._restored_fingerprint
        if resumed is not None:
            fingerprint, desc = resumed, "the checkpoint's"
        else:
            fingerprint, desc = self._models_fingerprint(trained, data)
        self.scored_now = False
        if path.is_file():
            cache = CriticalWeightsCache.load(path)
            cache.check(split=SPLIT, fingerprint=fingerprint, data=data, need_chosen=not self.only_neg)
        else:
            if resumed is not None and self.train_contrastive:
                raise FileNotFoundError(
                    f"CriticalTokenScoring: the resumed run's weights file {str(path)!r} is missing, and the "
                    "contrastive models were trained from the base weights, which a resumed run no longer has. "
                    "Restore the file (or its positive_adapter/ and negative_adapter/ folders and pass them as "
                    "positive_model / negative_model)")
            if resumed is not None and self._models_fingerprint(trained, data)[0] != resumed:
                raise StaleCacheError("CriticalTokenScoring: the resumed run's contrastive models differ from the "
                                      "ones its checkpoint was trained with; pass the same positive_model / "
                                      "negative_model")
            if is_global_zero:
                self._build(trained, device, records, fingerprint, data, desc, path).save(path)
                self.scored_now = True
            if barrier is not None:
                barrier()
            cache = CriticalWeightsCache.load(path)
        self.cache = cache
        self._fingerprint = fingerprint
        return cache

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lit_ft.core.introspect import find_hf_model

        self.prepare(self._train_batches(trainer), find_hf_model(pl_module, require_lm_head=True),
                     self.resolved_cache_path(trainer), pl_module.device, is_global_zero=trainer.is_global_zero,
                     barrier=lambda: trainer.strategy.barrier("critical_token_scoring"))

    # -- the batch -----------------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if not self._checked:
            require_preference_batch(batch, type(self).__name__)
            self._checked = True
        if self.cache is None:
            raise RuntimeError("CriticalTokenScoring: no weights at the first training batch (on_train_start did "
                               "not run)")
        chosen, rejected = self.cache.lookup(batch, self.only_neg)
        batch[KEYS[0]], batch[KEYS[1]] = chosen, rejected
        sup = batch["rejected_labels"] != -100
        sup[:, 0] = False
        n = sup.sum().clamp_min(1)
        w = rejected.masked_fill(~sup, 0.0)
        pl_module.log("lit_ft/critical_token_scoring/rejected_weight_mean", w.sum() / n, on_step=True,
                      on_epoch=False, batch_size=int(sup.shape[0]))
        pl_module.log("lit_ft/critical_token_scoring/critical_fraction", ((w > 0.5) & sup).sum() / n, on_step=True,
                      on_epoch=False, batch_size=int(sup.shape[0]))

    # -- checkpoint ----------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # the models' fingerprint: a resumed run (whose weights are no longer the base) checks the file against it
        return {"fingerprint": self._fingerprint}

    @override
    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self._restored_fingerprint = state_dict.get("fingerprint")
