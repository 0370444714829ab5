"""CAFT (concept-aware fine-tuning): auxiliary heads on the final hidden state predict the tokens 2..K+1 places
ahead through the shared lm_head; their cross-entropies, decayed and scheduled, are added to the next-token loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lit_ft.callbacks._objective import ObjectiveCallback
from lit_ft.core.batch import IGNORE_INDEX, refuse_packed
from lit_ft.core.host_modules import register_child, unregister_child
from lit_ft.core.introspect import causal_lm_parts, find_base_model, find_hf_model
from lit_ft.core.loss import ObjectiveInputs
from lit_ft.core.multi_token_heads import (
    HEAD_ARCHS,
    HOST_ATTR,
    HeadsError,
    MultiTokenHeadSet,
    build_heads,
    load_heads,
    save_heads,
)
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_optional_lr, \
    check_optional_wd, check_str

SCHEDULES = ("rsine", "sine", "linear", "constant", "sine_<ratio>")


def schedule_value(schedule: str, step: int, total: int) -> float:
    """The authors' coefficient schedule ``c(step)`` over ``total`` optimizer steps: ``rsine`` sin(π/2·(T−t)/T)
    (1 → 0), ``sine`` sin(π/2·t/T) (0 → 1), ``linear`` t/T, ``constant`` 1, ``sine_<r>`` sin(π/2·t/(rT)) up to
    ``t = rT`` then 1. ``total <= 0`` (unknown length) gives 1, as the authors' code does for ``max_steps == 0``."""
    if schedule == "constant" or total <= 0:
        return 1.0
    frac = step / total
    if schedule == "rsine":
        return math.sin((total - step) / total * math.pi / 2)
    if schedule == "sine":
        return math.sin(frac * math.pi / 2)
    if schedule == "linear":
        return frac
    ratio = float(schedule.split("_", 1)[1])
    return math.sin(frac / ratio * math.pi / 2) if frac < ratio else 1.0


def _check_schedule(value: Any) -> str:
    if isinstance(value, str) and value.startswith("sine_"):
        try:
            ratio = float(value.split("_", 1)[1])
        except ValueError:
            ratio = float("nan")
        if 0.0 < ratio <= 1.0:
            return value
    if isinstance(value, str) and value in SCHEDULES[:4]:
        return value
    raise ValueError(f"MultiTokenHeads: `schedule` must be one of {SCHEDULES} (ratio in (0, 1]), got {value!r}")


def shift_left(x: torch.Tensor, k: int, fill: Any) -> torch.Tensor:
    """``out[:, t] = x[:, t + k]`` (``fill`` past the row's end): head ``k``'s view of a target-space tensor."""
    if k == 0:
        return x
    return F.pad(x, (0, k), value=fill)[:, k:]


def head_counts(labels: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    """Supervised targets of each auxiliary head ``k = 1..K`` in ``labels`` (head ``k`` at ``t`` predicts
    ``labels[t + 1 + k]``, within the same row)."""
    return [(labels[:, 1 + k:] != IGNORE_INDEX).sum().to(torch.float32) for k in range(1, num_heads + 1)]


@technique(name="multi_token_heads", family="objectives",
           paper="Improving large language models with concept-aware fine-tuning", arxiv="2506.07833")
class MultiTokenHeads(ObjectiveCallback):
    """CAFT, concept-aware fine-tuning: multi-token prediction during fine-tuning through auxiliary heads.

    Paper: Chen, Zhang, Huang & Tao, *Improving large language models with concept-aware fine-tuning* (arXiv
    2506.07833); code github.com/michaelchen-lab/caft-llm (``caft/core.py``, ``scripts/train.py``,
    ``scripts/train_aux_heads.py``), which sets the defaults here.

    Algorithm: ``K`` auxiliary heads (a decoder layer each, or a zero-initialised residual block) read the model's
    final hidden state ``h_t``; head ``k`` feeds the shared lm_head and predicts token ``t + 1 + k``. The loss is
    ``CE_0 + Σ_{k=1..K} hcoef · decay^k · c(step) · CE_k`` with ``CE_0`` the ordinary next-token loss, ``CE_k`` head
    ``k``'s mean cross-entropy and ``c`` a schedule over the run (``rsine``: from 1 down to 0). The heads are first
    trained alone on the frozen model (``heads_only=True``: coefficient 1, constant schedule, the base and lm_head
    frozen), saved (:meth:`save_heads`), then loaded (``heads_path``) for fine-tuning; inference never uses them.

    How it runs: an :class:`~lit_ft.core.loss.Objective` on the token-loss engine. The heads are modules this
    callback owns, registered on the LightningModule at ``setup`` (``lit_ft_heads.multi_token_heads``: checkpointed,
    moved, DDP-synchronised with it, in the optimizer). All heads' cross-entropies go through one call of the fused
    linear cross-entropy op (:func:`lit_ft.kernels.multi_head_ce.multi_head_ce`): no ``[N, V]`` or ``[K, N, V]``
    logits. Each head's mean is over its own supervised targets of the whole accumulation window and all ranks, so
    gradient accumulation and DDP train exactly like one large batch. Token-selection callbacks compose: head ``k``
    at ``t`` takes the keep-mask and weight of the token it predicts (the next-token term's entry at ``t + k``).
    Level 3 for :class:`lit_ft.modules.TokenLossMixin` modules; level 2 (a plain ``self.model(**batch).loss``)
    captures the trunk's output with a forward hook. Packed batches are refused (a shifted target would cross into
    the next example). Evaluation forwards leave the heads out (the validation loss is the model's own, as at
    inference).
    Logs ``lit_ft/multi_token_heads/loss`` (the term), ``.../coefficient`` (``hcoef · c``) and ``.../ce_head<k>``.

    The authors' heads-only pre-training feeds the second-to-last hidden state while fine-tuning feeds the final
    one; here both feed the final (normalised) hidden state, so pre-trained heads see the input they are tuned on.

    Args:
        num_heads: K, auxiliary heads (int >= 1; the paper's n = 5 tokens means 4).
        head_arch: ``"transformer"`` (a copy of the model's decoder-layer class) or ``"linear"`` (``x + SiLU(Wx+b)``,
            ``W = 0`` at init).
        init_layer: decoder layer whose weights each transformer head starts from (the authors copy layer ``-2``);
            ``null`` = the layer class's own random initialisation (the authors' fine-tuning without pre-trained
            heads).
        heads_coefficient: hcoef, the weight of the auxiliary terms (>= 0).
        decay: weight ``decay^k`` of head ``k`` (> 0).
        schedule: ``c(step)``: ``"rsine"``, ``"sine"``, ``"linear"``, ``"constant"`` or ``"sine_<ratio>"`` (warm-up
            over that share of the run, then 1); ``T`` is ``max_steps`` (else the trainer's estimated steps).
        heads_only: pre-train the heads alone: everything else frozen (lm_head included), coefficient 1, constant
            schedule; ``heads_coefficient`` and ``schedule`` are not used.
        learning_rate: lr of the heads (their own param group); ``null`` = the optimizer's lr.
        weight_decay: weight decay of the heads; ``null`` = that of the group they came from.
        heads_path: start from heads saved by :meth:`save_heads` (a folder); ``null`` = fresh heads.
        save_dir: write the heads there when fit ends (rank 0; relative to ``default_root_dir``); ``null`` = do not.
        chunk_size: rows per chunk of the fused cross-entropy (across all heads); ``null`` = the op's default.
        integration: ``"auto"`` (level 3 for ``TokenLossMixin`` modules, else level 2), ``"mixin"`` or ``"hook"``.
    """

    technique_name = "multi_token_heads"
    objective_name = "multi_token_heads"

    def __init__(self, num_heads: int = 4, head_arch: str = "transformer", init_layer: int | None = -2,
                 heads_coefficient: float = 0.01, decay: float = 0.8, schedule: str = "rsine",
                 heads_only: bool = False, learning_rate: float | None = None, weight_decay: float | None = None,
                 heads_path: str | None = None, save_dir: str | None = None, chunk_size: int | None = None,
                 integration: str = "auto") -> None:
        super().__init__(integration)
        owner = "MultiTokenHeads"
        self.num_heads = int(check_int(owner, "num_heads", num_heads, 1))
        self.head_arch = check_choice(owner, "head_arch", head_arch, HEAD_ARCHS)
        self.init_layer = check_int(owner, "init_layer", init_layer, allow_none=True, null_means="random init")
        self.heads_coefficient = float(check_number(owner, "heads_coefficient", heads_coefficient, 0.0))
        self.decay = float(check_number(owner, "decay", decay, 0.0, low_open=True))
        self.schedule = _check_schedule(schedule)
        self.heads_only = check_bool(owner, "heads_only", heads_only)
        self.learning_rate = check_optional_lr(learning_rate, "learning_rate", owner)
        self.weight_decay = check_optional_wd(weight_decay, "weight_decay", owner)
        self.heads_path = check_str(owner, "heads_path", heads_path, allow_none=True, null_means="fresh heads")
        self.save_dir = check_str(owner, "save_dir", save_dir, allow_none=True, null_means="do not save")
        self.chunk_size = check_int(owner, "chunk_size", chunk_size, 1, allow_none=True, null_means="the default")
        self.heads: MultiTokenHeadSet | None = None
        self._host: pl.LightningModule | None = None
        self._step = 0
        self._total_steps = 0
        self._captured: torch.Tensor | None = None
        self._capture_handle: Any = None
        self.last_head_ce: torch.Tensor | None = None

    # -- the heads -------------------------------------------------------------------------------------------------
    @property
    def heads_name(self) -> str:
        return self.technique_name

    def head_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        prefix = f"{HOST_ATTR}.{self.heads_name}."
        return [n for n, _ in pl_module.named_parameters() if n.startswith(prefix)]

    def install(self, pl_module: pl.LightningModule) -> None:
        """Build (or load) the heads and register them on ``pl_module`` (before the optimizer and a restore)."""
        hf = find_hf_model(pl_module, require_lm_head=True)
        heads = build_heads(hf, self.num_heads, self.head_arch, self.init_layer)
        if self.heads_path:
            load_heads(heads, self.heads_path)
        register_child(pl_module, HOST_ATTR, self.heads_name, heads, HeadsError, "a head set")
        self.heads, self._host = heads, pl_module
        n = sum(p.numel() for p in heads.parameters())
        rank_zero_info(f"MultiTokenHeads: {self.num_heads} {self.head_arch} heads installed ({n:,} parameters)"
                       + (f", loaded from {self.heads_path}" if self.heads_path else ""))

    def remove(self) -> None:
        """Take the heads off the LightningModule (what inference runs without)."""
        if self._host is not None:
            unregister_child(self._host, HOST_ATTR, self.heads_name)
        self.heads = self._host = None

    def save_heads(self, path: str) -> str:
        """Write the heads to the folder ``path`` (``heads.safetensors`` + ``heads_config.json``); ``heads_path``
        loads them."""
        if self.heads is None:
            raise HeadsError("MultiTokenHeads.save_heads: no heads are installed (the callback has not been set up)")
        base = ""
        if self._host is not None:
            base = str(getattr(getattr(find_hf_model(self._host), "config", None), "_name_or_path", ""))
        return save_heads(self.heads, path, {"technique": "MultiTokenHeads", "base_model": base})

    def load_heads(self, path: str) -> None:
        """Load heads saved by :meth:`save_heads` into the installed ones."""
        if self.heads is None:
            raise HeadsError("MultiTokenHeads.load_heads: no heads are installed (the callback has not been set up)")
        load_heads(self.heads, path)

    # -- life cycle --------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lit_ft.core.strategy import refuse_sharded_strategies

        refuse_sharded_strategies(trainer, "MultiTokenHeads", "the heads sit outside the sharded model, so their "
                                  "gradients would not be averaged across ranks")
        if self.heads is None or self._host is not pl_module:
            self.install(pl_module)
        super().setup(trainer, pl_module, stage)
        if self.level == "hook" and self._capture_handle is None:
            self._capture_handle = find_base_model(find_hf_model(pl_module)).register_forward_hook(self._capture)
        if stage == "fit" and self.heads_only:
            from lit_ft.callbacks._param_plan import param_plans_for, selection_plan

            reg = param_plans_for(pl_module)
            plan, _ = selection_plan(pl_module, self.head_param_names(pl_module), reg.baseline, "MultiTokenHeads",
                                     required=False, what="heads_only=True (the heads)")
            reg.set(f"{self.technique_name}/heads_only", plan, pl_module)

    def _capture(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output.last_hidden_state

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._capture_handle is not None:
            self._capture_handle.remove()
            self._capture_handle = None
        self._captured = None
        if stage == "fit" and self.heads_only:  # heads-only pre-training ends with its fit: the base trains again
            from lit_ft.callbacks._param_plan import param_plans_for

            param_plans_for(pl_module).set(f"{self.technique_name}/heads_only", None, pl_module)
        super().teardown(trainer, pl_module, stage)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lit_ft.core.optim import assign_group_hparams, sync_schedulers

        hp: dict[str, float] = {}
        if self.learning_rate is not None:
            hp["lr"] = self.learning_rate
        if self.weight_decay is not None:
            hp["weight_decay"] = self.weight_decay
        params = dict(pl_module.named_parameters())
        assignments = {n: dict(hp) for n in self.head_param_names(pl_module) if params[n].requires_grad}
        for opt in trainer.optimizers:  # also adds heads an optimizer over `self.model.parameters()` misses
            r = assign_group_hparams(opt, pl_module, assignments)
            if r.changed and trainer.lr_scheduler_configs:
                sync_schedulers(trainer, opt, origin=r.origin, scale=r.scale, owner="MultiTokenHeads")

    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        refuse_packed(batch, "MultiTokenHeads", "head k's target is the token k + 1 places ahead in the same row, "
                      "which would cross into the next example")
        self._step = int(trainer.global_step)
        total = int(trainer.max_steps) if trainer.max_steps and trainer.max_steps > 0 else 0
        if total <= 0:
            est = trainer.estimated_stepping_batches
            total = int(est) if math.isfinite(est) else 0
        self._total_steps = total
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    # -- the term ----------------------------------------------------------------------------------------------------
    def coefficient(self) -> float:
        """``hcoef · c(step)`` of the current step (1 in heads-only mode)."""
        if self.heads_only:
            return 1.0
        return self.heads_coefficient * schedule_value(self.schedule, self._step, self._total_steps)

    @override
    def objective_counts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch.get("labels") if isinstance(batch, Mapping) else None
        if labels is None:
            return {f"head{k}": torch.zeros(()) for k in range(1, self.num_heads + 1)}
        return {f"head{k}": c for k, c in zip(range(1, self.num_heads + 1), head_counts(labels, self.num_heads))}

    def _keep_ratio(self) -> float:
        pipe = None if self._attachment is None else self._attachment.pipeline
        return 1.0 if pipe is None else pipe.nominal_keep_ratio()

    @override
    def objective_normaliser(self, totals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # one divisor per objective: head 1's count; the other heads' sums are rescaled to their own counts
        return (totals["head1"] * self._keep_ratio()).clamp_min(1.0)

    def _window_totals(self, inputs: ObjectiveInputs) -> dict[str, torch.Tensor]:
        pipe = None if self._attachment is None else self._attachment.pipeline
        prefix = f"{self.objective_name}/"
        if inputs.training and pipe is not None and pipe.window.totals is not None:
            return {k[len(prefix):]: v for k, v in pipe.window.totals.items() if k.startswith(prefix)}
        return self.objective_counts(inputs.batch)

    @override
    def objective_loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        if not inputs.training or self.heads is None:
            self._captured = None
            return None  # evaluation measures the model as used at inference: without the heads
        hidden = inputs.hidden
        parts = inputs.head
        if hidden is None:  # level 2: the trunk's output of this forward, captured by the hook
            hidden, self._captured = self._captured, None
            if hidden is None:
                raise RuntimeError("MultiTokenHeads: the trunk's hidden states of this forward were not captured "
                                   "(integration='hook' needs the HF model's own forward to run its trunk)")
            parts = causal_lm_parts(find_hf_model(self._host, require_lm_head=True))
        assert parts is not None
        from lit_ft.kernels.multi_head_ce import multi_head_ce

        keep, targets = inputs.keep, inputs.targets.to(inputs.keep.device)
        outs = self.heads(hidden.to(next(self.heads.parameters()).dtype), parts.hf_model, inputs.batch)
        totals = self._window_totals(inputs)
        n1 = totals["head1"].float().clamp_min(1.0)
        coef = self.coefficient()
        k_range = range(1, self.num_heads + 1)
        head_targets = torch.stack([shift_left(targets, k, IGNORE_INDEX) for k in k_range])
        head_keep = torch.stack([shift_left(keep, k, False) for k in k_range]) & (head_targets != IGNORE_INDEX)
        head_weights = None
        if inputs.weights is not None:
            head_weights = torch.stack([shift_left(inputs.weights.float(), k, 0.0) for k in k_range])
        scale = [coef * self.decay ** k * float(n1 / totals[f"head{k}"].float().clamp_min(1.0)) for k in k_range]
        b, t, d = hidden.shape
        out = multi_head_ce(
            torch.stack(outs).reshape(self.num_heads, b * t, d), parts.weight, head_targets.reshape(self.num_heads, -1),
            scale, token_weights=None if head_weights is None else head_weights.reshape(self.num_heads, -1),
            keep=head_keep.reshape(self.num_heads, -1), bias=parts.bias, logit_softcap=parts.logit_softcap,
            logit_scale=parts.logit_scale, chunk_size=self.chunk_size,
        )
        local = head_keep.reshape(self.num_heads, -1).sum(1).clamp_min(1).to(out.per_head.dtype)
        self.last_head_ce = (out.per_head / local).detach()
        return out.loss

    # -- logging, saving, state --------------------------------------------------------------------------------------
    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        pl_module.log("lit_ft/multi_token_heads/coefficient", self.coefficient(), on_step=True, on_epoch=False,
                      batch_size=1)
        if self.last_head_ce is not None:
            for k, v in enumerate(self.last_head_ce.tolist(), start=1):
                pl_module.log(f"lit_ft/multi_token_heads/ce_head{k}", v, on_step=True, on_epoch=False, batch_size=1)
            self.last_head_ce = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir and self.heads is not None and trainer.is_global_zero:
            import os

            out = self.save_dir if os.path.isabs(self.save_dir) else os.path.join(trainer.default_root_dir,
                                                                                    self.save_dir)
            self.save_heads(out)
            rank_zero_info(f"MultiTokenHeads: heads saved to {out}")

    @override
    def state_dict(self) -> dict[str, Any]:
        # the heads' weights are in the LightningModule's state dict; the term has no other state (the schedule
        # reads the restored global step)
        return {"num_heads": self.num_heads, "head_arch": self.head_arch}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("num_heads", "head_arch"):
            if key in state_dict and state_dict[key] != getattr(self, key):
                raise ValueError(f"MultiTokenHeads: the checkpoint was trained with {key}={state_dict[key]!r}, this "
                                 f"run has {key}={getattr(self, key)!r}; a resume must keep the same heads")
