"""SelfTraining: LiST's lite prompted self-training — a teacher prompt-tuned on a few labels, then sessions in which
a student (frozen LM + linear adapters) learns from the teacher's soft pseudo-labels on unlabelled rows, each row
weighted by meta-reweighting (one virtual SGD step, computed here in closed form for linear adapters)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_ft.callbacks.adapters.linear import INITS, LinearAdapter, LinearAdapters
from lit_ft.core.adapters import HOST_ATTR, AdapterError, AdapterSet, register_adapters, save_adapters
from lit_ft.core.introspect import find_hf_model
from lit_ft.core.progress import progress
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_str_list

__all__ = ["SelfTraining", "confidence_weights", "linear_adapter_meta_scores", "meta_scores",
           "normalise_meta_weights", "per_example_divergence", "pseudo_label_targets"]

PHASES = ("teacher", "student", "finetune", "done")
SCHEDULES = ("linear", "constant")
STUDENT = "self_training"
TEACHER = "self_training_teacher"


# ------------------------------------------------------------------------------------------------------------------
# The math (pure functions; the callback and the tests use them)
# ------------------------------------------------------------------------------------------------------------------
def pseudo_label_targets(teacher_scores: torch.Tensor, temperature: float = 1.0, soft: bool = True) -> torch.Tensor:
    """The teacher's targets from its class scores ``[B, C]``: ``softmax(scores / temperature)`` (soft labels;
    temperature < 1 sharpens) or the argmax class ids ``[B]`` (hard labels)."""
    if soft:
        z = teacher_scores.to(torch.promote_types(teacher_scores.dtype, torch.float32))
        return torch.softmax(z / temperature, dim=-1)
    return teacher_scores.argmax(-1)


def per_example_divergence(student_scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B]``: ``KL(p_teacher || softmax(student_scores))`` for soft targets ``[B, C]`` (LiST's ``kl_div`` summed
    over classes), the cross-entropy for hard targets ``[B]``."""
    logp = torch.log_softmax(student_scores.to(torch.promote_types(student_scores.dtype, torch.float32)), dim=-1)
    if targets.dim() == 1:
        return F.nll_loss(logp, targets, reduction="none")
    return F.kl_div(logp, targets.to(logp.dtype), reduction="none").sum(-1)


def confidence_weights(teacher_probs: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """LiST's weights before meta-reweighting starts: rows whose top teacher probability exceeds ``threshold``,
    each ``1 / (count + 1e-5)`` (the authors' constant); with threshold 0 every row: the mean."""
    mask = (teacher_probs.max(-1).values > threshold).float()
    return mask / (mask.sum() + 1e-5)


def normalise_meta_weights(scores: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """``w_i = max(s_i, 0) / (Σ_j max(s_j, 0) + epsilon)`` with ``s_i = -∂L_meta/∂ε_i`` (the authors' ``meta()``).
    All scores <= 0 give all-zero weights: the batch then contributes no gradient (as in the authors' code)."""
    w = scores.clamp_min(0)
    total = w.sum() + epsilon
    return w / total if total > 0 else w  # epsilon 0 and nothing positive: zeros, not 0/0


class _Capture:
    """Records each linear adapter's input ``y`` and output during a forward (forward hooks on the adapters)."""

    def __init__(self, adapters: AdapterSet) -> None:
        self.adapters = [a for a in adapters.adapters.values()]
        self.records: list[tuple[LinearAdapter, torch.Tensor, torch.Tensor]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> _Capture:
        for a in self.adapters:
            if not isinstance(a, LinearAdapter):
                raise AdapterError(f"SelfTraining: meta-reweighting in closed form needs LinearAdapter adapters, got "
                                   f"{type(a).__name__}")
            self._handles.append(a.register_forward_hook(self._hook))
        return self

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.records.append((module, args[1].detach(), output))  # type: ignore[arg-type]

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def linear_adapter_meta_scores(records: list[tuple[LinearAdapter, torch.Tensor, torch.Tensor]],
                               per_example_loss: torch.Tensor, meta_grads: Mapping[int, tuple[torch.Tensor, ...]],
                               lr: float) -> torch.Tensor:
    """``s_i = -∂L_meta(θ')/∂ε_i`` at ``ε = 0`` for ``θ' = θ - lr Σ_i ε_i ∇ℓ_i(θ)``, i.e. ``lr ⟨∇L_meta(θ),
    ∇ℓ_i(θ)⟩``, without per-example gradients or a second-order graph.

    For an adapter ``y' = y + (y W1) W2`` with output gradient ``g_t = ∂ℓ_i/∂y'_t``: ``∇_{W2} ℓ_i = Σ_t u_tᵀ g_t``
    (``u = y W1``) and ``∇_{W1} ℓ_i = Σ_t y_tᵀ (g_t W2ᵀ)``, so ``⟨∇_{W} ℓ_i, G⟩ = Σ_t (a_t G) · b_t`` with
    (a, b) = (u, g) for W2 and (y, g W2ᵀ) for W1. ``records``: each adapter's (module, input y, output) from the
    forward that gave ``per_example_loss`` ``[B]`` (its graph is kept: the caller backwards the weighted loss next);
    ``meta_grads``: ``id(adapter) -> (∂L_meta/∂W1, ∂L_meta/∂W2)``."""
    outs = [out for _, _, out in records]
    grads = torch.autograd.grad(per_example_loss.sum(), outs, retain_graph=True)
    B = per_example_loss.shape[0]
    total = torch.zeros(B, dtype=torch.float64, device=per_example_loss.device)
    for (adapter, y, _), g in zip(records, grads):
        g1, g2 = meta_grads[id(adapter)]
        w1, w2 = adapter.w1.detach(), adapter.w2.detach()
        yf = y.reshape(B, -1, y.shape[-1]).to(w1.dtype)
        gf = g.reshape(B, -1, g.shape[-1]).to(w1.dtype)
        u = yf @ w1                                          # [B, T, r]
        s2 = ((u @ g2) * gf).sum((1, 2))                     # ⟨Σ_t u_tᵀ g_t, G2⟩
        s1 = ((yf @ g1) * (gf @ w2.t())).sum((1, 2))         # ⟨Σ_t y_tᵀ (g_t W2ᵀ), G1⟩
        total += (s1 + s2).double()
    return (lr * total).to(per_example_loss.dtype)


def _to(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def meta_scores(module: pl.LightningModule, adapters: AdapterSet, unlabelled: Mapping[str, Any],
                targets: torch.Tensor, meta_batch: Mapping[str, Any], lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LiST's meta-reweighting scores for one unlabelled batch: ``(s [B], ℓ [B])`` with ``ℓ_i`` the student's
    per-example divergence from ``targets`` (graph kept for the weighted backward) and ``s_i = -∂L_meta/∂ε_i`` of
    one virtual SGD step of size ``lr`` on ``Σ ε_i ℓ_i``; ``L_meta`` is the labelled cross-entropy on
    ``meta_batch``. ``module`` maps ``(input_ids, attention_mask)`` to class scores (a SelfTrainingModule)."""
    params = [(a, a.w1, a.w2) for a in adapters.adapters.values()]
    meta_loss = F.cross_entropy(module(meta_batch["input_ids"], meta_batch.get("attention_mask")).float(),
                                meta_batch["labels"])
    flat = torch.autograd.grad(meta_loss, [p for _, w1, w2 in params for p in (w1, w2)])
    meta_grads = {id(a): (flat[2 * i].detach(), flat[2 * i + 1].detach()) for i, (a, _, _) in enumerate(params)}
    with _Capture(adapters) as cap:
        scores = module(unlabelled["input_ids"], unlabelled.get("attention_mask"))
    per = per_example_divergence(scores, targets)
    return linear_adapter_meta_scores(cap.records, per, meta_grads, lr), per


# ------------------------------------------------------------------------------------------------------------------
# Side streams with resumable positions
# ------------------------------------------------------------------------------------------------------------------
class _Stream:
    """An endless sequence of batches from ``datamodule.stream_loader(name, epoch)``; its position is (epoch,
    batches taken), and a restored stream skips to it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.epoch = 0
        self.pos = 0
        self._it: Iterator | None = None

    def next(self, datamodule: Any) -> dict[str, torch.Tensor]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(datamodule.stream_loader(self.name, self.epoch))
                for _ in range(self.pos):
                    next(self._it)
            try:
                batch = next(self._it)
            except StopIteration:
                self.epoch, self.pos, self._it = self.epoch + 1, 0, None
                continue
            self.pos += 1
            return batch
        raise ValueError(f"SelfTraining: the {self.name} stream of the DataModule gives no batches")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.epoch, self.pos, self._it = int(state["epoch"]), int(state["pos"]), None


# ------------------------------------------------------------------------------------------------------------------
# The technique
# ------------------------------------------------------------------------------------------------------------------
@technique(name="self_training", family="data_selection",
           paper="LiST: Lite Prompted Self-training Makes Parameter-efficient Few-shot Learners", arxiv="2110.06274")
class SelfTraining(pl.Callback):
    """LiST's lite self-training loop with meta-reweighted soft pseudo-labels.

    Paper: Wang et al., *LiST: Lite Prompted Self-training Makes Parameter-efficient Few-shot Learners* (Findings
    of NAACL 2022, arXiv 2110.06274); authors' code ``microsoft/LiST`` (``src/trainer.py``, ``run.sh``).

    Needs :class:`lit_ft.modules.SelfTrainingModule` (prompt-based classification through label words, manual
    optimisation) and :class:`lit_ft.data.FewShotDataModule` (``K`` labelled rows per class, the rest unlabelled).
    The LM stays frozen; only LiST's linear adapters train (``y' = y + y W1 W2`` after every attention-output and
    FFN-output dense layer, :class:`~lit_ft.callbacks.LinearAdapters`). Schedule, in optimizer steps:

    1. **Teacher** (``teacher_steps``): prompt-based fine-tuning of the adapters on the labelled batches at
       ``teacher_learning_rate``.
    2. **Sessions** (``num_sessions`` of ``student_steps + finetune_steps``). At a session start the teacher
       becomes a frozen copy of the current adapters, labels the whole unlabelled pool once (soft labels
       ``softmax(scores / temperature)``; it stays fixed for the session), the student's adapters are drawn afresh
       (``reinit_student``) and the optimizer state is reset. Then ``student_steps`` steps on unlabelled batches:
       loss ``Σ_i w_i KL(p_teacher,i || p_student,i)``, with ``w`` the mean (confidence weights) for the first
       ``meta_warmup`` fraction of the steps and the meta-weights after; then ``finetune_steps`` steps on the
       labelled batches; both at ``student_learning_rate``.
    3. **Meta-weights**: one virtual SGD step ``θ' = θ - η Σ_i ε_i ∇ℓ_i`` (``η`` = ``meta_learning_rate``), the
       labelled cross-entropy on a meta batch ``L_meta(θ')``, ``s_i = -∂L_meta/∂ε_i`` at ``ε = 0``
       ``= η ⟨∇L_meta(θ), ∇ℓ_i(θ)⟩``, ``w_i = max(s_i, 0) / (Σ_j max(s_j, 0) + meta_epsilon)``. For linear adapters
       the inner products are per-example (activation × output-gradient) contractions
       (:func:`linear_adapter_meta_scores`): no per-example gradients, no second-order graph.

    Args:
        teacher_steps: steps of the teacher phase (>= 0; LiST ``self_training_start_iter`` 400).
        num_sessions: self-training sessions (>= 0; LiST 6). Training stops after the last one.
        student_steps: unlabelled steps per session, i.e. the teacher refresh period (>= 1; LiST
            ``update_teacher_steps`` 1000).
        finetune_steps: labelled steps closing each session (>= 0); null = ``finetune_epochs`` passes over the
            labelled batches.
        finetune_epochs: labelled passes per session when ``finetune_steps`` is null (>= 0; LiST
            ``finetune_teacher_epoch`` 50).
        teacher_learning_rate: lr of the teacher phase (> 0; LiST 5e-6).
        student_learning_rate: lr within sessions (> 0; LiST ``semi_learning_rate`` 1e-4).
        lr_schedule: ``"linear"`` (decay to 0 over the teacher phase and over each session, no warm-up: HF's
            schedule in LiST's trainer) or ``"constant"``.
        meta_learning_rate: ``η`` of the virtual step (> 0; LiST uses the run's ``learning_rate``, 5e-6). It scales
            every score alike, so it changes the weights only through ``meta_epsilon``.
        meta_epsilon: added to the weights' sum before normalising (>= 0; LiST 1e-6).
        meta_warmup: fraction of each session's unlabelled steps that use confidence weights before
            meta-reweighting starts (in [0, 1]; LiST ``meta_st_warmup`` 0.6: meta-weights from step
            ``int(0.6 · student_steps) + 1`` of the session).
        confidence_threshold: rows whose top teacher probability is at most this get weight 0 before the meta
            phase (in [0, 1); LiST 0: every row).
        temperature: soft-label temperature (> 0; LiST 1: no sharpening; < 1 sharpens).
        soft_labels: KL to the teacher's distribution (LiST ``soft_label=1``); false = cross-entropy to its argmax.
        reinit_student: draw the student's adapters afresh at every session start (LiST ``--re_init``); false =
            the student starts from the teacher's adapters.
        max_grad_norm: gradient-norm clipping (>= 0, 0 = off; HF's 1.0 in LiST's trainer).
        bottleneck: the linear adapters' width (>= 1; LiST 128).
        targets: adapter targets in every decoder layer (roles or module paths); default LiST's
            ``["attention_output", "mlp_output"]``.
        init_std: std of the adapters' normal initialisation (>= 0; LiST 0.02).
        init: ``"list"`` (both adapter matrices random, the authors') or ``"identity"`` (``W2 = 0``).
        seed: seed of the adapters' initial draw (session ``s`` draws with ``seed + s``).
        save_dir: write the final student adapters (``adapters.safetensors`` + ``adapter_config.json``) here when
            fit ends; null = do not.
    """

    technique_name = "self_training"

    def __init__(self, teacher_steps: int = 400, num_sessions: int = 6, student_steps: int = 1000,
                 finetune_steps: int | None = None, finetune_epochs: int = 50, teacher_learning_rate: float = 5e-6,
                 student_learning_rate: float = 1e-4, lr_schedule: str = "linear", meta_learning_rate: float = 5e-6,
                 meta_epsilon: float = 1e-6, meta_warmup: float = 0.6, confidence_threshold: float = 0.0,
                 temperature: float = 1.0, soft_labels: bool = True, reinit_student: bool = True,
                 max_grad_norm: float = 1.0, bottleneck: int = 128, targets: list[str] | None = None,
                 init_std: float = 0.02, init: str = "list", seed: int = 0, save_dir: str | None = None) -> None:
        owner = type(self).__name__
        self.teacher_steps = check_int(owner, "teacher_steps", teacher_steps, 0)
        self.num_sessions = check_int(owner, "num_sessions", num_sessions, 0)
        self.student_steps = check_int(owner, "student_steps", student_steps, 1)
        self.finetune_steps = check_int(owner, "finetune_steps", finetune_steps, 0, allow_none=True,
                                        null_means="finetune_epochs passes over the labelled batches")
        self.finetune_epochs = check_int(owner, "finetune_epochs", finetune_epochs, 0)
        self.teacher_learning_rate = check_number(owner, "teacher_learning_rate", teacher_learning_rate, low=0,
                                                  low_open=True)
        self.student_learning_rate = check_number(owner, "student_learning_rate", student_learning_rate, low=0,
                                                  low_open=True)
        self.lr_schedule = check_choice(owner, "lr_schedule", lr_schedule, SCHEDULES)
        self.meta_learning_rate = check_number(owner, "meta_learning_rate", meta_learning_rate, low=0, low_open=True)
        self.meta_epsilon = check_number(owner, "meta_epsilon", meta_epsilon, low=0)
        self.meta_warmup = check_number(owner, "meta_warmup", meta_warmup, low=0, high=1)
        self.confidence_threshold = check_number(owner, "confidence_threshold", confidence_threshold, low=0, high=1,
                                                 high_open=True)
        self.temperature = check_number(owner, "temperature", temperature, low=0, low_open=True)
        self.soft_labels = check_bool(owner, "soft_labels", soft_labels)
        self.reinit_student = check_bool(owner, "reinit_student", reinit_student)
        self.max_grad_norm = check_number(owner, "max_grad_norm", max_grad_norm, low=0)
        self.bottleneck = check_int(owner, "bottleneck", bottleneck, 1)
        self.targets = check_str_list(owner, "targets", targets, allow_none=True) or ["attention_output", "mlp_output"]
        self.init_std = check_number(owner, "init_std", init_std, low=0)
        self.init = check_choice(owner, "init", init, INITS)
        self.seed = check_int(owner, "seed", seed, 0)
        # the student and the teacher are LiST's linear adapters, built as LinearAdapters builds them
        self._adapter_factory = LinearAdapters(bottleneck=self.bottleneck, targets=self.targets,
                                               init_std=self.init_std, init=self.init, seed=self.seed)
        if save_dir is not None and not isinstance(save_dir, str):
            raise ValueError(f"{owner}: `save_dir` must be a path string or null, got {save_dir!r}")
        self.save_dir = save_dir
        self.student: AdapterSet | None = None
        self.teacher: AdapterSet | None = None
        self._host: pl.LightningModule | None = None
        self._streams = {"unlabelled": _Stream("unlabelled"), "meta": _Stream("meta")}
        self._session_started = 0
        self._resolved_finetune_steps: int | None = finetune_steps
        self._teacher_scores: torch.Tensor | None = None  # [pool, C]: the current teacher's class scores
        self._last_batch_size = 1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(teacher_steps=self.teacher_steps, num_sessions=self.num_sessions,
                                        student_steps=self.student_steps, seed=self.seed)

    # -- schedule ---------------------------------------------------------------------------------------------------
    def session_length(self) -> int:
        """Steps of one session (unlabelled + labelled); known once fit has started when ``finetune_steps`` is null."""
        if self._resolved_finetune_steps is None:
            raise RuntimeError("SelfTraining: the session length is known once training starts (finetune_steps=null "
                               "counts labelled batches)")
        return self.student_steps + self._resolved_finetune_steps

    def total_steps(self) -> int:
        """Optimizer steps of the whole schedule (teacher phase + every session)."""
        return self.teacher_steps + self.num_sessions * self.session_length()

    def phase_at(self, step: int) -> tuple[str, int, int]:
        """``(phase, session, step within the phase's span)`` at optimizer step ``step``: phase ``"teacher"``
        (session 0), ``"student"`` / ``"finetune"`` (session 1..num_sessions, step within the session) or
        ``"done"``."""
        if step < self.teacher_steps:
            return "teacher", 0, step
        d = step - self.teacher_steps
        length = self.session_length()
        session, within = d // length + 1, d % length
        if session > self.num_sessions:
            return "done", self.num_sessions, 0
        return ("student" if within < self.student_steps else "finetune"), session, within

    def learning_rate_at(self, step: int) -> float:
        phase, _, within = self.phase_at(step)
        if phase == "teacher":
            base, span = self.teacher_learning_rate, self.teacher_steps
        else:
            base, span = self.student_learning_rate, self.session_length()
        if self.lr_schedule == "constant":
            return base
        return base * max(0.0, (span - within) / span)

    def meta_active(self, within: int) -> bool:
        """Meta-weights (rather than confidence weights) at this step of a session's unlabelled span."""
        return within > int(self.meta_warmup * self.student_steps)

    # -- setup ------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        owner = type(self).__name__
        # duck-typed (callbacks do not import lit_ft.modules): the methods SelfTrainingModule offers its driver
        if not all(callable(getattr(pl_module, m, None)) for m in ("labelled_loss", "optimizer_step_with", "log_train_step")) \
                or getattr(pl_module, "automatic_optimization", True):
            raise TypeError(f"{owner} drives its own loop (teacher phase, sessions, meta-reweighted unlabelled steps) "
                            f"and needs lit_ft.modules.SelfTrainingModule (the verbalizer classifier with manual "
                            f"optimisation); got {type(pl_module).__name__}")
        if trainer.world_size > 1:
            raise ValueError(f"{owner} runs in one process: its unlabelled and meta streams and the pool labelling are "
                             f"not sharded across ranks (world size {trainer.world_size}); use one device")
        dm = getattr(trainer, "datamodule", None)
        if not all(callable(getattr(dm, m, None)) for m in ("stream_loader", "pool_loader", "check_unlabelled")):
            raise TypeError(f"{owner} needs a DataModule with labelled, unlabelled and meta batches: "
                            f"lit_ft.data.FewShotDataModule (shots_per_class, unlabelled_batch_size, meta_batch_size); "
                            f"got {type(dm).__name__}")
        if stage == "fit" and self.num_sessions > 0 and (trainer.max_steps < 0 or trainer.max_steps > self.teacher_steps):
            dm.setup(stage)
            dm.check_unlabelled()  # a clear error now rather than at the first session
        if self.student is None or self._host is not pl_module:
            self._install(pl_module)

    def _install(self, pl_module: pl.LightningModule) -> None:
        store = getattr(pl_module, HOST_ATTR, None)
        if store is not None and (STUDENT in store or TEACHER in store):
            raise AdapterError("SelfTraining: the model already has self-training adapters (another SelfTraining "
                               "instance); use one per model")
        hf = find_hf_model(pl_module)
        device = next(hf.parameters()).device
        student = self._adapter_factory.build_adapters(None, pl_module, hf)  # type: ignore[arg-type]
        teacher = self._adapter_factory.build_adapters(None, pl_module, hf)  # type: ignore[arg-type]
        teacher.load_state_dict(student.state_dict())
        for s in (student, teacher):
            s.to(device=device)
        register_adapters(pl_module, STUDENT, student)
        register_adapters(pl_module, TEACHER, teacher)
        student.attach(hf)
        teacher.attach(hf)
        teacher.enabled = False  # on only while it labels the pool
        # LiST trains the adapters alone: everything else (backbone, label-word weights, the teacher) is frozen
        own = {id(p) for p in student.parameters()}
        for p in pl_module.parameters():
            p.requires_grad_(id(p) in own)
        self.student, self.teacher, self._host = student, teacher, pl_module
        n = sum(p.numel() for p in student.parameters())
        rank_zero_info(f"SelfTraining: {len(student.targets)} linear adapters ({n:,} trainable parameters) for the "
                       "student, a frozen copy for the teacher")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._resolved_finetune_steps is None:
            per_epoch = trainer.num_training_batches
            if not isinstance(per_epoch, int) or per_epoch < 1:
                raise ValueError("SelfTraining: finetune_steps=null counts labelled batches per epoch, which this "
                                 "run does not know; set finetune_steps")
            self._resolved_finetune_steps = self.finetune_epochs * per_epoch
        rank_zero_info(f"SelfTraining: {self.total_steps()} steps in all ({self.teacher_steps} teacher + "
                       f"{self.num_sessions} sessions x ({self.student_steps} unlabelled + "
                       f"{self._resolved_finetune_steps} labelled)); training stops after the last session")

    # -- the step ---------------------------------------------------------------------------------------------------
    def self_training_step(self, module: Any, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor | None:
        """One optimizer step of the schedule (called by ``SelfTrainingModule.training_step``)."""
        trainer = module.trainer
        step = int(trainer.global_step)
        phase, session, within = self.phase_at(step)
        if phase == "done":
            trainer.should_stop = True
            return None
        if phase != "teacher" and session != self._session_started:
            self._start_session(module, trainer, session)
        lr = self.learning_rate_at(step)
        prefix = f"lit_ft/{self.technique_name}/"
        if phase == "student":
            loss = self._student_step(module, trainer, within, lr)
            bs = self._last_batch_size
        else:
            loss, scores = module.labelled_loss(batch)
            module.optimizer_step_with(loss, lr, self.max_grad_norm)
            module.log_train_step(loss, scores, batch["labels"])
            bs = int(batch["labels"].shape[0])
            module.log(prefix + "labelled_loss", loss.detach(), batch_size=bs)
        if phase == "student":
            module.log("train/loss", loss.detach(), prog_bar=True, batch_size=bs)
        module.log(prefix + "phase", float(PHASES.index(phase)), batch_size=bs)
        module.log(prefix + "session", float(session), batch_size=bs)
        module.log(prefix + "lr", lr, batch_size=bs)
        return loss.detach()

    def _student_step(self, module: Any, trainer: pl.Trainer, within: int, lr: float) -> torch.Tensor:
        dm = trainer.datamodule
        device = module.device
        unl = _to(self._streams["unlabelled"].next(dm), device)
        assert self._teacher_scores is not None and self.student is not None
        teacher_scores = self._teacher_scores[unl["pool_idx"].cpu()].to(device)
        targets = pseudo_label_targets(teacher_scores, self.temperature, self.soft_labels)
        prefix = f"lit_ft/{self.technique_name}/"
        self._last_batch_size = bs = int(unl["input_ids"].shape[0])
        if self.meta_active(within):
            meta = _to(self._streams["meta"].next(dm), device)
            scores, per = meta_scores(module, self.student, unl, targets, meta, self.meta_learning_rate)
            weights = normalise_meta_weights(scores.detach(), self.meta_epsilon)
            module.log(prefix + "meta_positive_fraction", (scores > 0).float().mean(), batch_size=bs)
        else:
            per = per_example_divergence(module(unl["input_ids"], unl.get("attention_mask")), targets)
            weights = confidence_weights(torch.softmax(teacher_scores.float(), -1), self.confidence_threshold)
        loss = (weights.to(per.dtype) * per).sum()
        module.optimizer_step_with(loss, lr, self.max_grad_norm)
        module.log(prefix + "unlabelled_loss", loss.detach(), batch_size=bs)
        module.log(prefix + "weight_sum", weights.sum(), batch_size=bs)
        return loss

    # -- sessions ---------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _teacher_on(self) -> Iterator[None]:
        assert self.student is not None and self.teacher is not None
        was_s, was_t = self.student.enabled, self.teacher.enabled
        self.student.enabled, self.teacher.enabled = False, True
        try:
            yield
        finally:
            self.student.enabled, self.teacher.enabled = was_s, was_t

    def _start_session(self, module: Any, trainer: pl.Trainer, session: int) -> None:
        """Teacher <- the current adapters; the pool labelled by it; the student re-drawn; optimizer state reset."""
        assert self.student is not None and self.teacher is not None
        with torch.no_grad():
            self.teacher.load_state_dict(self.student.state_dict())
            if self.reinit_student:
                g = torch.Generator().manual_seed(self.seed + session)
                for a in self.student.adapters.values():
                    fresh = LinearAdapter(a.width, a.bottleneck, a.init_std, a.init)
                    fresh.reset(g)
                    a.load_state_dict(fresh.state_dict())
        opt = module.optimizers().optimizer
        for p in self.student.parameters():
            opt.state.pop(p, None)
        self._teacher_scores = self._label_pool(module, trainer, session)
        self._session_started = session

    @torch.no_grad()
    def _label_pool(self, module: Any, trainer: pl.Trainer, session: int) -> torch.Tensor:
        dm = trainer.datamodule
        loader = dm.pool_loader()
        rows: list[torch.Tensor] = []
        idx: list[torch.Tensor] = []
        was = module.training
        module.eval()
        try:
            with self._teacher_on():
                for b in progress(loader, desc=f"SelfTraining: teacher labels the unlabelled pool (session {session})",
                                  total=len(loader), enabled=trainer.is_global_zero):
                    b = _to(b, module.device)
                    rows.append(module(b["input_ids"], b.get("attention_mask")).float().cpu())
                    idx.append(b["pool_idx"].cpu())
        finally:
            module.train(was)
        pool = torch.cat(idx)
        scores = torch.zeros(int(pool.max()) + 1, rows[0].shape[-1])
        scores[pool] = torch.cat(rows)
        prefix = f"lit_ft/{self.technique_name}/"
        probs = torch.softmax(scores[pool], -1)
        module.log(prefix + "teacher_confidence", probs.max(-1).values.mean(), batch_size=len(pool))
        truth = getattr(dm, "unlabelled_labels", None)
        if callable(truth):  # a diagnostic: the hidden labels never enter a loss
            labels = truth()
            if labels.shape[0] == scores.shape[0]:
                acc = (scores.argmax(-1) == labels).float().mean()
                module.log(prefix + "pseudo_label_accuracy", acc, batch_size=len(pool))
        return scores

    # -- artifacts and state ----------------------------------------------------------------------------------------
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir and self.student is not None and trainer.is_global_zero:
            import os

            out = self.save_dir if os.path.isabs(self.save_dir) else os.path.join(trainer.default_root_dir,
                                                                                  self.save_dir)
            save_adapters(self.student, out, metadata={"technique": self.technique_name})
            rank_zero_info(f"SelfTraining: student adapters saved to {out}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "session_started": self._session_started,
            "finetune_steps": self._resolved_finetune_steps,
            "streams": {k: s.state_dict() for k, s in self._streams.items()},
            "teacher_scores": None if self._teacher_scores is None else self._teacher_scores.clone(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._session_started = int(state_dict["session_started"])
        if self.finetune_steps is None:
            self._resolved_finetune_steps = state_dict["finetune_steps"]
        elif state_dict["finetune_steps"] not in (None, self.finetune_steps):
            raise ValueError(f"SelfTraining: the checkpoint was trained with finetune_steps="
                             f"{state_dict['finetune_steps']}, this run sets finetune_steps={self.finetune_steps}: "
                             "the session boundaries would move; resume with the same value")
        for k, s in self._streams.items():
            s.load_state_dict(state_dict["streams"][k])
        scores = state_dict["teacher_scores"]
        self._teacher_scores = None if scores is None else scores.clone()
