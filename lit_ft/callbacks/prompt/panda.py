"""PANDA: prompt transfer with knowledge distillation from the source prompt (Zhong et al., TKDE 2024)."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_ft.callbacks._prompt import PromptCallback
from lit_ft.core.registry import technique
from lit_ft.callbacks.prompt.prompt_tuning import build_prompt_embedding
from lit_ft.core.batch import IGNORE_INDEX, require_keys
from lit_ft.core.introspect import causal_lm_parts, find_hf_model
from lit_ft.core.prompts import PROMPT_WEIGHTS, ModelGeometry, PromptError, PromptSource, load_prompt
from lit_ft.core.loss import (
    Attachment,
    Objective,
    ObjectiveInputs,
    attach,
    causal_lm_token_nll,
    detach,
    final_hidden_states,
    logits_at,
    model_inputs,
    resolve_level,
    shift_targets,
)
from lit_ft.core.validate import check_choice, check_int, check_number, check_str

KD_FORMS = ("mse", "kl")
#: the student prompt's lr: the released code's SuperGLUE-CB recipe (run_cb_bert-panda.sh, lr 7e-3)
DEFAULT_LEARNING_RATE = 7e-3
INITS = ("source", "vocab", "text", "random")
INTEGRATIONS = ("auto", "mixin", "hook")
#: the released code's fixed factor in front of beta: ``loss + 0.1 * beta * mse / B``
MSE_FACTOR = 0.1
#: how the ``mse`` term is normalised: ``"token"`` (per supervised token / classified sequence; default) or
#: ``"release"`` (the code's ``mean over rows x classes / B``, which shrinks with the vocabulary and the batch)
KD_NORMALISATIONS = ("token", "release")


def kd_term(student: torch.Tensor, teacher: torch.Tensor, form: str, batch_size: int,
            temperature: float = 1.0, normalisation: str = "token") -> torch.Tensor:
    """The distillation term between logits ``[R, C]`` (rows = supervised positions or sequences).

    ``"mse"``, normalised per row (``normalisation="token"``, the default): ``0.1 * sum((z_s - z_t)^2) / R``, the
    squared distance of each row's logit vectors averaged over the rows; with ``"release"`` the authors' code
    (``p-tuning-v2/training/trainer_base.py``): ``0.1 * mean((z_s - z_t)^2) / B``, the mean over all ``R x C``
    entries and ``B`` the number of sequences in the batch. ``"kl"``: ``T^2 * mean_r KL(softmax(z_t / T) ||
    softmax(z_s / T))`` (per row either way). No rows: a graph-connected zero.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"PANDA: student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ")
    if student.numel() == 0:
        return student.sum() * 0.0
    s, t = student.float(), teacher.detach().float()
    if form == "mse" and normalisation == "release":
        return MSE_FACTOR * F.mse_loss(s, t) / max(int(batch_size), 1)
    if form == "mse":
        return MSE_FACTOR * (s - t).pow(2).sum() / s.shape[0]
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() * temperature**2


def kd_chunk_sum(student: torch.Tensor, teacher: torch.Tensor, form: str, temperature: float = 1.0) -> torch.Tensor:
    """The distillation term's **sum** over a block of rows (the chunked base calls it per block of student logits):
    ``"mse"``: ``0.1 · Σ (z_s − z_t)²``; ``"kl"``: ``T² · Σ_r KL(softmax(z_t / T) ‖ softmax(z_s / T))``. Divided by
    the objective's normaliser (:meth:`PANDA.objective_normaliser`) it equals :func:`kd_term` (either
    normalisation: they differ in the divisor only)."""
    s, t = student.float(), teacher.detach().float()
    if form == "mse":
        return MSE_FACTOR * (s - t).pow(2).sum()
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum() * temperature**2


@dataclass
class TeacherOutput:
    """The teacher's logits for one training batch: ``[N, V]`` at the supervised positions ``mask`` (causal LM,
    target space ``[B, T]``) or ``[B, C]`` with ``mask=None`` (sequence classification)."""

    logits: torch.Tensor
    mask: torch.Tensor | None
    batch_size: int


class _KDLossFunction:
    """Sequence classifiers only: wraps the HF model's ``loss_function`` (``pooled_logits``) and adds ``beta * KD`` in
    a training forward that has a pending teacher output. (Causal LMs go through the token-loss engine as an
    :class:`~lit_ft.core.loss.Objective`; a classifier's loss is not a token loss.)"""

    def __init__(self, callback: PANDA, previous: Any, owned: bool) -> None:
        self.callback = callback
        self.previous = previous
        self.owned = owned  # the model had its own `_loss_function` before

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        task = self.previous(*args, **kwargs)
        cb = self.callback
        if cb._pending is None or not torch.is_grad_enabled():
            return task
        teacher = cb.take_teacher()
        kd = cb.kd(kwargs["pooled_logits"], teacher)
        return task + cb.beta_value * kd


@technique(name="panda", family="prompt",
           paper="PANDA: Prompt Transfer Meets Knowledge Distillation for Efficient Model Adaptation",
           arxiv="2208.10160")
class PANDA(PromptCallback, Objective):
    """PANDA: prompt transfer (PoT) with knowledge distillation from the source-task prompt.

    Paper: Zhong, Ding, Liu, Du & Tao, *PANDA: Prompt Transfer Meets Knowledge Distillation for Efficient Model
    Adaptation* (IEEE TKDE 2024); code https://github.com/WHU-ZQH/PANDA (P-tuning v2).

    Algorithm: a prompt trained on a *source* task (a lit_ft prompt artifact, ``source_prompt``) is the teacher.
    The target prompt (the student) starts from it (vanilla prompt transfer) and trains on the target task with
    ``loss = task loss + beta * KD(student logits, teacher logits)``, which keeps it close to what the source prompt
    knew. The backbone is frozen and shared: each training batch gets one extra no-grad forward of the **same**
    model with the teacher prompt swapped in (``injector.using(teacher)``) — no copy of the model — and only the
    logits the loss needs are kept (supervised positions of a causal LM, the class logits of a classifier).

    How the term reaches the loss: for causal LMs it is an :class:`~lit_ft.core.loss.Objective` on the token-loss
    engine, at level 3 (:class:`lit_ft.modules.TokenLossMixin` modules: student logits only at the supervised
    positions, through the chunked fused-linear base) or level 2 (a plain ``self.model(**batch).loss``: the HF loss
    hook), composing with lit_ft token scorers either way. Its normaliser is its own, counted over the
    accumulation window and ranks: the supervised positions (per token, both forms; ``kd_normalisation="release"``:
    supervised positions × vocabulary × sequences for ``mse``, the released code's ``mean / B``, which makes the term
    shrink with the vocabulary and the batch size). For sequence classifiers (``ClassificationModule``) the HF
    model's ``loss_function`` is wrapped (per sequence; ``"release"``: ``mean over B x C / B``).

    Args:
        source_prompt: folder of the source prompt artifact (``prompt.safetensors`` + ``prompt_config.json``,
            written by ``lit_ft.core.prompts.save_prompt``, e.g. ``PromptTuning(save_dir=...)`` or
            ``PrefixTuning(save_dir=...)``) for the same base model. Required at setup.
        beta: weight of the distillation term (>= 0), or ``"auto"``: set once before training from a
            transferability estimate on ``auto_beta_batches`` training batches (see :meth:`estimate_beta`).
            The paper's metric (a cosine similarity of task embeddings, per its summary) could not be confirmed
            and is not in the released code, so this is a proxy; give a number to avoid it. The code's default is 0.1.
            ``0`` = vanilla prompt transfer.
        kd: ``"mse"`` (the code's form: ``0.1 * ||z_s - z_t||^2``, normalised as ``kd_normalisation`` says) or
            ``"kl"`` (temperature-scaled KL, per token).
        kd_normalisation: ``"token"`` (default): the ``mse`` term is averaged per supervised token (per sequence for
            a classifier), ``0.1 * sum ||z_s - z_t||^2 / tokens``, like the task loss and the ``kl`` form, so its
            weight does not change with the vocabulary or the batch size. ``"release"``: the released code's
            ``0.1 * mean over (tokens x V) / B``, written for SuperGLUE classifiers (a handful of classes); on a
            causal LM it divides the term by ``V x B`` (49k x 8 for SmolLM2 at batch 8). The per-token term is
            ``V`` times the per-entry mean, so ``beta`` is not interchangeable between the two.
        temperature: softmax temperature of ``kd="kl"`` (> 0).
        init: the student's start: ``"source"`` (a copy of the source prompt: vanilla prompt transfer, default) or
            a fresh soft prompt as in :class:`PromptTuning` (``"vocab"``, ``"text"``, ``"random"``). Note:
            the released code's PANDA mode starts the student from scratch and loads its teacher from a source prompt
            already transferred to the target task; to reproduce it, pass such a prompt as ``source_prompt`` with
            ``init="vocab"``.
        num_virtual_tokens: the student's length for a fresh init (default: the source's); must equal the source's
            with ``init="source"``.
        init_text: for ``init="text"``, as in :class:`PromptTuning`.
        seed: for ``init="vocab"`` / ``"random"``, as in :class:`PromptTuning`.
        tokenizer: for ``init="text"`` / ``"vocab"``, as in :class:`PromptTuning`.
        auto_beta_batches: training batches used by ``beta="auto"`` (>= 1).
        integration: ``"auto"`` (mixin for ``TokenLossMixin`` modules, else the loss-function hook), ``"mixin"``,
            ``"hook"``.
        learning_rate: the student prompt's lr (own param group). Default 7e-3, the released code's SuperGLUE-CB
            recipe (``WHU-ZQH/PANDA``, ``run_cb_bert-panda.sh``). ``None`` = the optimizer's.
        weight_decay: the student prompt's weight decay, as in :class:`PromptTuning`.
        save_dir: the student prompt's artifact folder, as in :class:`PromptTuning`.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "panda"
    objective_name = "panda"

    def __init__(self, source_prompt: str | None = None, beta: float | str = 0.1, kd: str = "mse",
                 temperature: float = 1.0, init: str = "source", num_virtual_tokens: int | None = None,
                 init_text: str | None = None, seed: int = 0, auto_beta_batches: int = 4, integration: str = "auto",
                 learning_rate: float | None = DEFAULT_LEARNING_RATE, weight_decay: float | None = None,
                 save_dir: str | None = None, tokenizer: str | None = None,
                 kd_normalisation: str = "token", picture_every_n_steps: int = 0) -> None:
        super().__init__(True, learning_rate, weight_decay, save_dir, tokenizer,
                         picture_every_n_steps=picture_every_n_steps)
        if source_prompt is not None and not isinstance(source_prompt, str):
            raise ValueError(f"PANDA: `source_prompt` must be a folder path, got {source_prompt!r}")
        if beta != "auto" and (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta)
                               or beta < 0):
            raise ValueError(f"PANDA: `beta` must be a number >= 0 or 'auto', got {beta!r}")
        self.kd_form = check_choice("PANDA", "kd", kd, KD_FORMS)
        self.kd_normalisation = check_choice("PANDA", "kd_normalisation", kd_normalisation, KD_NORMALISATIONS)
        self.temperature = check_number("PANDA", "temperature", temperature, low=0, low_open=True)
        self.init = check_choice("PANDA", "init", init, INITS)
        check_str("PANDA", "init_text", init_text, allow_none=True)
        if init == "text" and not init_text:
            raise ValueError("PANDA: init='text' needs `init_text` (the words whose embeddings start the prompt)")
        self.num_virtual_tokens = check_int("PANDA", "num_virtual_tokens", num_virtual_tokens, minimum=1,
                                            allow_none=True)
        self.auto_beta_batches = check_int("PANDA", "auto_beta_batches", auto_beta_batches, minimum=1)
        self.integration = check_choice("PANDA", "integration", integration, INTEGRATIONS)
        self.source_prompt = source_prompt
        self.beta = beta
        self.init_text = init_text
        self.peft_weights = None  # build_prompt_embedding reads it
        self.seed = check_int("PANDA", "seed", seed)
        #: the weight in use (``beta``, or the estimate once ``beta="auto"`` has run)
        self.beta_value: float | None = None if beta == "auto" else float(beta)
        #: the teacher prompt (frozen; not a submodule of the LightningModule)
        self.teacher: PromptSource | None = None
        self.level: str | None = None
        self.last_kd: torch.Tensor | None = None
        self._pending: TeacherOutput | None = None
        self._hooked: nn.Module | None = None
        self._attachment: Attachment | None = None
        self._causal = True
        self._vocab = 0  # the lm_head's rows: the width of the logits the release MSE form averages over
        self._source_digest: str | None = None

    # -- the source artifact ---------------------------------------------------------------------------------------
    def _load_source(self, hf_model: nn.Module) -> PromptSource:
        if self.source_prompt is None:
            raise PromptError("PANDA: `source_prompt` is required: the folder of a prompt trained on the source task "
                              "(written by save_prompt, e.g. PromptTuning(save_dir=...))")
        d = Path(self.source_prompt)
        if not d.is_dir():
            raise PromptError(f"PANDA: `source_prompt` {self.source_prompt!r} is not a folder (train a prompt on the "
                              "source task with PromptTuning(save_dir=...) first)")
        try:
            source = load_prompt(d, hf_model)
        except PromptError as e:
            raise PromptError(f"PANDA: `source_prompt` {self.source_prompt!r}: {e}") from None
        if source.keep_prompt_outputs:
            raise PromptError(f"PANDA: `source_prompt` holds a {type(source).__name__}, whose outputs keep the prompt "
                              "positions (CPT); its logits cannot be aligned with the student's")
        self._source_digest = hashlib.sha256((d / PROMPT_WEIGHTS).read_bytes()).hexdigest()
        return source

    def build_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module,
                     geometry: ModelGeometry) -> PromptSource:
        teacher = self._load_source(hf_model)
        teacher.requires_grad_(False)
        teacher.to(device=next(hf_model.parameters()).device)
        self.teacher = teacher
        n = self.num_virtual_tokens
        if self.init == "source":
            if n is not None and n != teacher.num_virtual_tokens:
                raise PromptError(f"PANDA: init='source' copies the source prompt ({teacher.num_virtual_tokens} virtual "
                                  f"tokens), but num_virtual_tokens={n}; leave it null or use another init")
            return load_prompt(self.source_prompt, hf_model)  # type: ignore[arg-type]  # its own tensors
        return build_prompt_embedding(self, trainer, hf_model, geometry,
                                      num_virtual_tokens=n or teacher.num_virtual_tokens)

    # -- setup: where the KD term goes -----------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit" or self.level is not None:
            return
        hf = find_hf_model(pl_module)
        self._causal = hf.get_output_embeddings() is not None
        if self._causal and self.beta == 0:
            self.level = resolve_level(pl_module, self.integration, "PANDA", INTEGRATIONS)
            return  # vanilla prompt transfer: no term to add, the module's own loss is left untouched
        if self._causal:
            self._vocab = int(hf.get_output_embeddings().weight.shape[0])
            self._attachment = attach(trainer, pl_module, self, self.integration, who="PANDA", allowed=INTEGRATIONS)
            self.level = self._attachment.level
            return
        self.level = resolve_level(pl_module, self.integration, "PANDA", INTEGRATIONS)
        if self.level == "mixin":  # pragma: no cover - a classifier is never a TokenLossMixin host
            raise TypeError("PANDA(integration='mixin') needs a causal LM")
        if not hasattr(type(hf), "loss_function"):
            raise TypeError(f"PANDA: {type(hf).__name__} has no `loss_function` to extend (transformers >= 4.46 "
                            "models have one)")
        owned = "_loss_function" in hf.__dict__
        hf.loss_function = _KDLossFunction(self, hf.loss_function, owned)
        self._hooked = hf

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        detach(self._attachment, self)
        if self._hooked is not None:
            fn = self._hooked.__dict__.get("_loss_function")
            if isinstance(fn, _KDLossFunction) and fn.callback is self:
                if fn.owned:
                    self._hooked._loss_function = fn.previous
                else:
                    del self._hooked.__dict__["_loss_function"]
        self._hooked = self._attachment = None
        self.level = None
        self._pending = None

    def _check_hook_intact(self) -> None:
        if self._hooked is None:
            return
        fn = self._hooked.__dict__.get("_loss_function")
        if not (isinstance(fn, _KDLossFunction) and fn.callback is self):
            raise RuntimeError(
                "PANDA: the classifier's loss_function was replaced after PANDA extended it; the distillation term "
                "would be lost."
            )

    # -- the teacher pass ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def teacher_logits(self, pl_module: pl.LightningModule, batch: dict[str, Any]) -> TeacherOutput:
        """The source prompt's logits on ``batch`` from the same (frozen) model: causal LM at the supervised
        positions (``shift(labels) != -100``), classifier: the class logits."""
        assert self.teacher is not None and self.injector is not None
        hf = find_hf_model(pl_module)
        p = next(hf.parameters())
        if next(self.teacher.parameters()).device != p.device:
            self.teacher.to(device=p.device)
        B = int(batch["input_ids"].shape[0])
        with self.injector.using(self.teacher):
            if self._causal:
                parts = causal_lm_parts(hf)
                mask = shift_targets(batch["labels"]) != IGNORE_INDEX
                hidden = final_hidden_states(parts, batch)
                return TeacherOutput(logits_at(parts, hidden, mask.to(hidden.device)), mask, B)
            out = hf(**model_inputs(batch))
            return TeacherOutput(out.logits.float(), None, B)

    def take_teacher(self) -> TeacherOutput:
        out = self._pending
        assert out is not None
        self._pending = None
        return out

    def check_mask(self, mask: torch.Tensor, teacher: TeacherOutput) -> torch.Tensor:
        if teacher.mask is None or mask.shape != teacher.mask.shape or not torch.equal(mask, teacher.mask.to(mask.device)):
            raise RuntimeError(
                "PANDA: the supervised positions of the training forward differ from those of the teacher pass run at "
                "on_train_batch_start (was the batch edited after PANDA's hook? put PANDA after batch-editing "
                "callbacks)."
            )
        return mask

    def kd(self, student: torch.Tensor, teacher: TeacherOutput) -> torch.Tensor:
        if teacher.mask is None and student.shape != teacher.logits.shape:
            raise RuntimeError(f"PANDA: student logits {tuple(student.shape)} and teacher logits "
                               f"{tuple(teacher.logits.shape)} differ (a different batch?)")
        value = kd_term(student, teacher.logits.to(student.device), self.kd_form, teacher.batch_size,
                        self.temperature, self.kd_normalisation)
        self.last_kd = value.detach()
        return value

    # -- the objective (causal LMs) ---------------------------------------------------------------------------------
    def objective_weight(self) -> float:
        return float(self.beta_value or 0.0)

    def objective_counts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Supervised positions (rows) and sequences of one micro-batch; the vocabulary width is a constant."""
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if labels is None:
            return {"rows": torch.zeros(()), "sequences": torch.zeros(())}
        rows = (shift_targets(labels) != IGNORE_INDEX).sum().float()
        return {"rows": rows, "sequences": torch.tensor(float(labels.shape[0]))}

    def objective_normaliser(self, totals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The supervised positions (per token; both forms). ``kd_normalisation="release"`` with ``mse``: the code's
        ``mean over rows × V entries / B`` → rows · V · sequences."""
        if self.kd_form == "mse" and self.kd_normalisation == "release":
            return totals["rows"] * float(self._vocab) * totals["sequences"]
        return totals["rows"]

    def objective_loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        """The KD sum between the student's logits at the supervised positions and the teacher's (taken at batch
        start), through :meth:`ObjectiveInputs.chunked_loss` (level 3: no ``[N, V]`` student logits)."""
        if not inputs.training or self._pending is None:
            return None
        teacher = self.take_teacher()
        mask = self.check_mask(inputs.valid, teacher)
        form, temperature = self.kd_form, self.temperature
        total = inputs.chunked_loss(lambda logits, teacher: kd_chunk_sum(logits, teacher, form, temperature), mask,
                                    rows={"teacher": teacher.logits.to(mask.device)})
        own = self.objective_normaliser({k: v.to(total.device) for k, v in self.objective_counts(inputs.batch).items()})
        self.last_kd = (total.detach() / own.clamp_min(1e-12))
        return total

    # -- beta="auto" -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def task_loss(self, pl_module: pl.LightningModule, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum of the task loss over the batch's supervised tokens (causal LM) or sequences (classifier), and their
        count, with whatever prompt the injector runs now."""
        hf = find_hf_model(pl_module)
        if self._causal:
            nll = causal_lm_token_nll(hf, batch)
            valid = shift_targets(batch["labels"]) != IGNORE_INDEX
            return nll[valid].double().sum(), valid.sum().double()
        logits = hf(**model_inputs(batch)).logits.float()
        return F.cross_entropy(logits, batch["labels"].to(logits.device), reduction="sum").double(), \
            torch.tensor(float(logits.shape[0]), dtype=torch.float64, device=logits.device)

    def estimate_beta(self, pl_module: pl.LightningModule, batches: list[dict[str, Any]]) -> float:
        """``beta = clamp((L_bare - L_source) / L_bare, 0, 1)``: the relative reduction of the target task's loss
        that the source prompt brings, zero-shot, over the bare frozen model (``L``: mean task loss on ``batches``).

        This is a proxy. The paper's transferability metric maps both tasks into one space with their prompts and
        takes a cosine similarity of task embeddings (per the paper's summary; the formula and the released code's
        version are not available here), which needs a prompt trained on the target task; zero-shot transfer
        performance is the quantity such metrics are built to predict, and is computable before training."""
        assert self.injector is not None and self.teacher is not None
        if next(self.teacher.parameters()).device != next(find_hf_model(pl_module).parameters()).device:
            self.teacher.to(device=next(find_hf_model(pl_module).parameters()).device)
        sums = torch.zeros(3, dtype=torch.float64)
        for b in batches:
            with self.injector.using(None):
                bare, n = self.task_loss(pl_module, b)
            with self.injector.using(self.teacher):
                src, _ = self.task_loss(pl_module, b)
            sums += torch.stack([bare.cpu(), src.cpu(), n.cpu()])
        l_bare, l_src = float(sums[0] / sums[2].clamp_min(1)), float(sums[1] / sums[2].clamp_min(1))
        if not l_bare > 0:
            return 0.0
        return float(min(max((l_bare - l_src) / l_bare, 0.0), 1.0))

    def _probe_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[dict[str, Any]]:
        dm = getattr(trainer, "datamodule", None)
        loader = dm.train_dataloader() if dm is not None else trainer.train_dataloader
        out = []
        for i, b in enumerate(loader):
            if i >= self.auto_beta_batches:
                break
            out.append(pl_module.transfer_batch_to_device(b, pl_module.device, 0))
        if not out:
            raise RuntimeError("PANDA: beta='auto' found no training batch to estimate the transferability on")
        return out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.beta_value is not None:  # fixed, or restored from a checkpoint
            return
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        was_training = pl_module.training
        with torch.random.fork_rng(devices=devices):  # the probe must not shift the run's random stream
            batches = self._probe_batches(trainer, pl_module)
            pl_module.eval()
            try:
                beta = self.estimate_beta(pl_module, batches)
            finally:
                pl_module.train(was_training)
        if trainer.world_size > 1:  # one beta for all ranks
            t = torch.tensor(beta, dtype=torch.float32, device=pl_module.device)
            beta = float(trainer.strategy.reduce(t, reduce_op="mean"))
        self.beta_value = beta
        rank_zero_info(f"PANDA: beta='auto' -> {beta:.4f} (zero-shot loss reduction of the source prompt)")

    # -- per batch -------------------------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._pending = None
        self.last_kd = None
        if self._attachment is not None:
            self._attachment.begin_batch(trainer, pl_module, batch, batch_idx)
        if self.level is None or not self.beta_value:  # beta 0: nothing to distil, no teacher pass
            return
        self._check_hook_intact()
        require_keys(batch, ("input_ids", "labels"), who="PANDA")
        self._pending = self.teacher_logits(pl_module, batch)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self._attachment is not None:
            self._attachment.end_window()
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._pending = None
        if self.beta_value is not None:
            pl_module.log("lit_ft/panda/beta", float(self.beta_value), on_step=True, on_epoch=False, batch_size=1)
        if self.last_kd is not None:
            pl_module.log("lit_ft/panda/kd_loss", self.last_kd, on_step=True, on_epoch=False, batch_size=1)

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"beta": self.beta_value, "source_prompt": self.source_prompt, "source_sha256": self._source_digest}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.beta == "auto" and state_dict.get("beta") is not None:
            self.beta_value = float(state_dict["beta"])
        saved = state_dict.get("source_sha256")
        if saved is not None and self._source_digest is not None and saved != self._source_digest:
            rank_zero_warn(f"PANDA: the source prompt in {self.source_prompt!r} differs from the one the checkpoint "
                           "was trained with; the teacher changed")
