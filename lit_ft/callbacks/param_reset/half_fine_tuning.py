"""Half Fine-Tuning (HFT): train a random half of every transformer layer per stage, the other half frozen."""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch import nn

from lit_ft.callbacks._param_plan import ParamPlanCallback, param_plans_for
from lit_ft.core.registry import technique
from lit_ft.core.resume import RESTORE
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number
from lit_ft.core.introspect import ModelLayoutError, find_decoder_layers, find_hf_model, param_names_by_id
from lit_ft.core.optim import masked_state_reset
from lit_ft.core.params import FROZEN, ParamPlan, pack_mask, unpack_mask

GRANULARITIES = ("matrix", "layer", "parameter")
RESELECTS = ("epoch", "steps", "never")
THETA0_DEVICES = ("cpu", "same")
_STATE_VERSION = 1


@dataclass
class _Unit:
    """One selectable unit: a matrix (a Linear with its bias, or a PEFT-wrapped Linear with its adapters), a norm,
    or — with ``granularity="layer"`` — a whole layer's trainable tensors."""

    layer: int
    category: str  # "norm", the layer child's name ("self_attn", "mlp", ...), or "other"
    name: str  # path inside the layer, e.g. "self_attn.q_proj"
    params: list[str]  # the LightningModule's parameter names (trainable at setup)
    numel: int


def _is_norm(child_name: str, child: nn.Module) -> bool:
    low = child_name.lower()
    return "norm" in low or low.startswith("ln") or "norm" in type(child).__name__.lower()


def _round_count(x: float, gen: torch.Generator) -> int:
    """``floor(x)``, plus one with probability ``frac(x)`` (stochastic rounding: the expected count is ``x``)."""
    k = math.floor(x + 1e-9)
    frac = x - k
    if frac > 1e-9 and float(torch.rand((), generator=gen)) < frac:
        k += 1
    return k


# -- resuming with changed arguments (lit_ft.core.resume): the current stage's selection, and the optimizer state
# laid out for it, were drawn with the saved ratio / granularity / stage rule, so a change of those is refused
# (before it could surface as an optimizer-layout error that names no argument).
_SELECTION_REASON = ("the current stage's selection, and the optimizer state laid out for it, were drawn with the "
                     "saved value")


def _reset_frozen_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> Optional[str]:
    if new and not saved and not state.get("theta0"):
        return "no copy of the pre-trained values θ0 was saved, so the frozen half cannot be reset to them"
    return None


def _seed_decision(saved: Any, new: Any, state: Mapping[str, Any]) -> Optional[str]:
    if new is None or new == state.get("seed"):
        return None  # None: the stored seed is used
    return f"the sequence of selections is drawn from the checkpoint's seed {state.get('seed')!r}"


@technique(name="half_fine_tuning", family="param_reset",
           paper="HFT: Half Fine-Tuning for Large Language Models", arxiv="2404.18466")
class HalfFineTuning(ParamPlanCallback):
    """Half Fine-Tuning (HFT): in every stage, train a random half of each transformer layer's matrices and keep
    the other half frozen; a new random half is drawn at every stage.

    Paper: Hui et al. 2024, *HFT: Half Fine-Tuning for Large Language Models* (arXiv 2404.18466, ACL 2025). No code
    was released; the split below follows the paper's summaries ("category-level" selection per layer, Fig. 2); the
    paper's text could not confirm it, so each open choice is an argument (``docs/techniques/half_fine_tuning.md``,
    "Limits and open points").

    Algorithm (``granularity="matrix"``, the default)::

        at the start of stage s (epoch s, or every `stage_steps` optimizer steps):
            g = Generator(seed mixed with s)                       # identical on every rank and after a resume
            for each transformer layer, for each category          # attention {q,k,v,o}, FFN {gate,up,down},
                choose round(ratio * n) of its n matrices           #   norms {input, post-attention}, ...
            train the chosen ones, freeze the rest (requires_grad) # frozen: no grad, no weight decay, no moments
            optionally reset the frozen ones to their pre-trained values θ0 (Half-Reset)

    ``ratio * n`` is rounded stochastically (FFN: 1 or 2 of 3 with probability ½ each), so on average exactly
    ``ratio`` of each category trains. Embeddings, lm_head and the final norm are outside the layers and stay
    frozen by default (``train_non_layer``), so about ``ratio`` of the in-layer parameters and less than ``ratio``
    of the whole model train (logged as ``lit_ft/half_fine_tuning/trainable_fraction``). Only tensors that are trainable when fitting starts take part (a PEFT model's adapters, not
    its frozen base). The selection is applied at ``on_fit_start`` (after the strategy wraps the model, so DDP still
    registers every candidate) and changed at ``on_train_batch_start``; the base class rebuilds the optimizer's
    param groups by name.

    Args:
        ratio: fraction of each category's matrices (``"matrix"``), of the layers (``"layer"``) or of the elements
            (``"parameter"``) that train in a stage, in (0, 1]. ``0.5`` = the paper. ``1.0`` trains everything
            (a control run).
        granularity: what is drawn. ``"matrix"``: per layer and category (attention, FFN, norms — one category per
            child module of the layer), as the paper's "category-level" selection. ``"layer"``: ``ratio`` of the
            layers train entirely, the others are frozen. ``"parameter"``: each element trains with probability
            ``ratio`` (element masks; nothing is frozen via ``requires_grad``, so no compute is saved, and the base
            class keeps a full copy of every masked tensor to re-project it after each step).
        reselect: when a new stage (a new random half) starts: ``"epoch"`` (every epoch, the paper's single-stage
            SFT), ``"steps"`` (every ``stage_steps`` optimizer steps) or ``"never"`` (one selection for the run).
        stage_steps: optimizer steps per stage; required with ``reselect="steps"`` and only allowed with it.
        reset_frozen: at every stage switch, copy the pre-trained values θ0 back into the tensors (or, with
            ``"parameter"``, the elements) frozen in the new stage, so the frozen half is always the pre-trained
            model. Costs a copy of every selectable tensor (about the size of the transformer layers), kept on
            ``theta0_device`` and saved in checkpoints.
        theta0_device: where θ0 lives: ``"cpu"`` (spares accelerator memory; each reset copies over PCIe) or
            ``"same"`` (the parameter's device).
        reset_moments_on_thaw: ``True``: a tensor that thaws starts with fresh optimizer state (its moments were
            deleted when it froze). ``False``: its moments are kept aside while it is frozen (not updated, not
            decayed) and put back when it thaws, ``step`` included; they are saved in checkpoints and cost the
            optimizer state of the frozen half. With ``"parameter"``: ``True`` zeroes the moments of the elements
            that thaw, ``False`` leaves them.
        train_non_layer: embeddings, lm_head, the final norm and any other trainable tensor outside the transformer
            layers stay frozen (``False``, the default: the paper's split — half of the parameters learn, the other
            half keeps the previous knowledge, and the category-level selection covers only the layers) or train in
            every stage (``True``, lit-ft's earlier default: about 85% of a small model trainable, since
            its embeddings are a large share).
        seed: selection seed. ``None`` = the ``seed_everything`` seed (``PL_GLOBAL_SEED``) if set, else 0. Stored in
            the checkpoint; a resumed run uses the stored one.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.

    Attributes (for benchmarks): ``stage``, ``resets`` (tensor resets done so far), ``selected_fraction``
    (trainable share of the selectable elements), ``trainable_fraction()`` (trainable share of all parameters),
    ``selection`` (names of the chosen units, or the element masks).

    Under DDP the frozen half receives no gradient: use ``strategy="ddp_find_unused_parameters_true"`` (or
    ``DDPStrategy(find_unused_parameters=True)``); plain ``"ddp"`` raises at ``on_fit_start``.
    """

    technique_name = "half_fine_tuning"
    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`)
    resume_decisions = {
        "ratio": _SELECTION_REASON, "granularity": _SELECTION_REASON, "reselect": _SELECTION_REASON,
        "stage_steps": _SELECTION_REASON, "train_non_layer": _SELECTION_REASON,
        "reset_frozen": _reset_frozen_decision, "seed": _seed_decision,
        "theta0_device": RESTORE, "reset_moments_on_thaw": RESTORE,
    }

    def __init__(
        self,
        ratio: float = 0.5,
        granularity: str = "matrix",
        reselect: str = "epoch",
        stage_steps: Optional[int] = None,
        reset_frozen: bool = False,
        theta0_device: str = "cpu",
        reset_moments_on_thaw: bool = True,
        train_non_layer: bool = False,
        seed: Optional[int] = None,
        picture_every_n_steps: int = 0,
    ) -> None:
        super().__init__(picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        check_number(owner, "ratio", ratio, low=0, high=1, low_open=True)  # 0.5 = the paper
        check_choice(owner, "granularity", granularity, GRANULARITIES)
        check_choice(owner, "reselect", reselect, RESELECTS)
        if stage_steps is not None:
            check_int(owner, "stage_steps", stage_steps, minimum=1)
            if reselect != "steps":
                raise ValueError(
                    f"HalfFineTuning: `stage_steps`={stage_steps} is only used with reselect='steps', got "
                    f"reselect={reselect!r}; set reselect='steps' or stage_steps=None."
                )
        elif reselect == "steps":
            raise ValueError("HalfFineTuning: reselect='steps' needs `stage_steps` (an int >= 1), got None.")
        check_choice(owner, "theta0_device", theta0_device, THETA0_DEVICES)
        for name, value in (("reset_frozen", reset_frozen), ("reset_moments_on_thaw", reset_moments_on_thaw),
                            ("train_non_layer", train_non_layer)):
            check_bool(owner, name, value)
        check_int(owner, "seed", seed, minimum=0, allow_none=True, null_means="the run's seed")
        self.ratio = float(ratio)
        self.granularity = granularity
        self.reselect = reselect
        self.stage_steps = stage_steps
        self.reset_frozen = reset_frozen
        self.theta0_device = theta0_device
        self.reset_moments_on_thaw = reset_moments_on_thaw
        self.train_non_layer = train_non_layer
        self.seed = seed
        self._seed_arg = seed  # what the user passed (`seed` is resolved at setup): compared on resume

        self.stage: int = -1  # no selection applied yet
        self.resets: int = 0
        self.selected_fraction: float = 1.0
        self.selection: Any = None  # list of unit names, or name -> bool mask ("parameter")
        self.units: list[_Unit] = []
        self.non_layer: list[str] = []
        self._candidates: list[str] = []  # selectable parameter names, model order
        self._numel: dict[str, int] = {}
        self._shapes: dict[str, torch.Size] = {}
        self._theta0: dict[str, torch.Tensor] = {}
        self._stash: dict[int, dict[str, dict[str, Any]]] = {}  # optimizer index -> name -> state (kept moments)
        self._restored: Optional[dict[str, Any]] = None

    def resume_args(self) -> dict[str, Any]:
        """Arguments resolved in place, as given (:mod:`lit_ft.core.resume`): ``seed`` before setup resolved it."""
        return {"seed": self._seed_arg}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(ratio=self.ratio, granularity=self.granularity, reselect=self.reselect)

    # -- discovery -------------------------------------------------------------------------------------------------
    def discover(self, pl_module: pl.LightningModule) -> list[_Unit]:
        """Find the selectable units (tensors trainable now, inside the transformer layers) and the trainable
        tensors outside the layers. Called at ``setup("fit")``; public so tests and benchmarks can inspect it."""
        names = param_names_by_id(pl_module)
        baseline = param_plans_for(pl_module).baseline  # the user's requires_grad, before any lit_ft plan
        trainable = {n for n, e in baseline.items() if e.trainable}
        layers = find_decoder_layers(find_hf_model(pl_module))
        seen: set[str] = set()

        def take(params) -> list[str]:  # noqa: ANN001
            out = []
            for p in params:
                n = names.get(id(p))
                if n is not None and n in trainable and n not in seen:
                    seen.add(n)
                    out.append(n)
            return out

        units: list[_Unit] = []
        for li, layer in enumerate(layers):
            layer_units: list[_Unit] = []
            for cname, child in layer.named_children():
                if _is_norm(cname, child):
                    ps = take(child.parameters())
                    if ps:
                        layer_units.append(_Unit(li, "norm", cname, ps, 0))
                    continue
                own = take(child.parameters(recurse=False))
                if own:
                    layer_units.append(_Unit(li, cname, cname, own, 0))
                for sname, sub in child.named_children():
                    ps = take(sub.parameters())
                    if ps:
                        layer_units.append(_Unit(li, cname, f"{cname}.{sname}", ps, 0))
            direct = take(layer.parameters(recurse=False))
            if direct:
                layer_units.append(_Unit(li, "other", "<layer>", direct, 0))
            units += layer_units
        shapes = {n: p.shape for n, p in pl_module.named_parameters()}
        for u in units:
            u.numel = sum(shapes[n].numel() for n in u.params)
        self.units = units
        self._candidates = [n for u in units for n in u.params]
        self._shapes = {n: shapes[n] for n in self._candidates}
        self._numel = {n: shapes[n].numel() for n in self._candidates}
        cand = set(self._candidates)
        self.non_layer = [n for n in shapes if n in trainable and n not in cand]
        if not units:
            raise ValueError(
                f"HalfFineTuning: no trainable tensor inside the transformer layers of {type(pl_module).__name__} "
                f"(found {len(layers)} layers; every tensor in them has requires_grad=False). HFT selects among the "
                "layers' trainable matrices; unfreeze them or drop the callback."
            )
        return units

    # -- selection -------------------------------------------------------------------------------------------------
    def _generator(self, stage: int) -> torch.Generator:
        digest = hashlib.sha256(f"lit_ft.HalfFineTuning:{self.seed}:{stage}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def select(self, stage: int) -> Any:
        """The selection of ``stage``: a function of ``(seed, stage)`` only (same on every rank, after a resume).

        Returns the chosen unit names ``"<layer>:<path>"`` (``"matrix"`` / ``"layer"``), or ``name -> bool mask``
        (``"parameter"``, ``True`` = trains)."""
        g = self._generator(stage)
        if self.granularity == "parameter":
            return {n: torch.rand(self._shapes[n], generator=g) < self.ratio for n in self._candidates}
        if self.granularity == "layer":
            layers = sorted({u.layer for u in self.units})
            k = _round_count(self.ratio * len(layers), g)
            chosen = {layers[i] for i in torch.randperm(len(layers), generator=g)[:k].tolist()}
            return [f"{u.layer}:{u.name}" for u in self.units if u.layer in chosen]
        chosen: set[str] = set()
        by_cat: dict[tuple[int, str], list[_Unit]] = {}
        for u in self.units:
            by_cat.setdefault((u.layer, u.category), []).append(u)
        for group in by_cat.values():  # insertion order = model order: deterministic
            k = _round_count(self.ratio * len(group), g)
            chosen |= {f"{group[i].layer}:{group[i].name}" for i in torch.randperm(len(group), generator=g)[:k].tolist()}
        return [f"{u.layer}:{u.name}" for u in self.units if f"{u.layer}:{u.name}" in chosen]

    def _plan(self, selection: Any) -> ParamPlan:
        entries: dict[str, Any] = {}
        if self.granularity == "parameter":
            entries.update(selection)
        else:
            chosen = set(selection)
            for u in self.units:
                state = "trainable" if f"{u.layer}:{u.name}" in chosen else FROZEN
                entries.update({n: state for n in u.params})
        for n in self.non_layer:
            entries[n] = "trainable" if self.train_non_layer else FROZEN
        return ParamPlan(entries, owner="HalfFineTuning")

    def _frozen_in(self, selection: Any) -> list[str]:
        """Selectable tensors with at least one frozen element under ``selection``."""
        if self.granularity == "parameter":
            return [n for n, m in selection.items() if not bool(m.all())]
        chosen = set(selection)
        return [n for u in self.units if f"{u.layer}:{u.name}" not in chosen for n in u.params]

    def _selected_fraction(self, selection: Any) -> float:
        total = sum(self._numel.values())
        if self.granularity == "parameter":
            kept = sum(int(m.sum()) for m in selection.values())
        else:
            chosen = set(selection)
            kept = sum(u.numel for u in self.units if f"{u.layer}:{u.name}" in chosen)
        return kept / total if total else 0.0

    def stage_for(self, trainer: pl.Trainer) -> int:
        """The stage the trainer is in: the epoch, ``global_step // stage_steps``, or 0."""
        if self.reselect == "epoch":
            return int(trainer.current_epoch)
        if self.reselect == "steps":
            return int(trainer.global_step) // int(self.stage_steps)  # type: ignore[arg-type]
        return 0

    # -- hooks -----------------------------------------------------------------------------------------------------
    def build_plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ParamPlan | None:
        self.registry(pl_module)  # the user's requires_grad is read now, before anything is frozen
        if self.seed is None:
            env = os.environ.get("PL_GLOBAL_SEED")
            self.seed = int(env) % 2**32 if env is not None and env.lstrip("-").isdigit() else 0
        try:
            self._prepare(pl_module)
        except ModelLayoutError:
            self.units = []  # the model is built later (configure_model): retried at on_fit_start
        # Nothing is frozen yet: the selection is applied at on_fit_start, after DDP registered every candidate.
        return None

    def _prepare(self, pl_module: pl.LightningModule) -> None:
        self.discover(pl_module)
        if self.reset_frozen and not self._theta0:
            params = dict(pl_module.named_parameters())
            with torch.no_grad():
                self._theta0 = {
                    n: params[n].detach().to("cpu" if self.theta0_device == "cpu" else params[n].device, copy=True)
                    for n in self._candidates
                }

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.units:
            self._prepare(pl_module)
        self._check_strategy(trainer)  # after discovery: whether tensors outside the layers get frozen is known
        if self.reset_frozen and self.theta0_device == "same":
            params = dict(pl_module.named_parameters())
            self._theta0 = {n: t.to(params[n].device) for n, t in self._theta0.items()}
        restored, self._restored = self._restored, None
        if restored is None:
            self._enter_stage(trainer, pl_module, self.stage_for(trainer), transition=False)
        else:
            self.resets = int(restored["resets"])
            self._stash = restored["stash"]
            self._enter_stage(trainer, pl_module, int(restored["stage"]), selection=restored["selection"],
                              transition=False)
        # the base arranges the optimizer's groups like the checkpointed ones (state is restored by position)
        super().on_fit_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        stage = self.stage_for(trainer)
        if stage != self.stage:
            self._enter_stage(trainer, pl_module, stage, transition=True)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        prefix = f"lit_ft/{self.technique_name}"
        pl_module.log(f"{prefix}/stage", float(self.stage), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(f"{prefix}/resets", float(self.resets), on_step=True, on_epoch=False, batch_size=1)
        pl_module.log(f"{prefix}/selected_fraction", self.selected_fraction, on_step=True, on_epoch=False, batch_size=1)

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        from lit_ft.core.strategy import require_unused_parameter_tolerance

        # the frozen tensors outside the layers were registered by DDP too (the plan is applied after the wrap)
        freezes = ((self.granularity != "parameter" and self.ratio < 1.0)
                   or (not self.train_non_layer and bool(self.non_layer)))
        if freezes:
            require_unused_parameter_tolerance(trainer, "HalfFineTuning", "freezes part of the model and changes "
                                               "which part at every stage")

    # -- stage switch ----------------------------------------------------------------------------------------------
    def _enter_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: int,
                     selection: Any = None, transition: bool = True) -> None:
        if selection is None:
            selection = self.select(stage)
        plan = self._plan(selection)
        params = dict(pl_module.named_parameters())
        optimizers = [getattr(o, "_optimizer", o) for o in trainer.optimizers]
        old = self.selection
        frozen_new = self._frozen_in(selection)

        if not self.reset_moments_on_thaw and self.granularity != "parameter":
            # keep the moments of tensors that freeze now; the base would delete them
            for oi, opt in enumerate(optimizers):
                for n in frozen_new:
                    st = opt.state.get(params[n])
                    if st:
                        self._stash.setdefault(oi, {})[n] = st

        if self.reset_frozen and transition:
            with torch.no_grad():
                for n in frozen_new:
                    p, ref = params[n], self._theta0[n].to(device=params[n].device, dtype=params[n].dtype)
                    if self.granularity == "parameter":
                        p.copy_(torch.where(selection[n].to(p.device), p, ref))
                    else:
                        p.copy_(ref)
                    self.resets += 1

        self.update_plan(trainer, pl_module, plan)  # recompose, requires_grad, optimizer groups by name

        if self.granularity == "parameter":
            if self.reset_moments_on_thaw and old is not None and transition:
                for opt in optimizers:
                    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
                    for n, m in selection.items():
                        p = params[n]
                        if id(p) in in_opt and n in old:
                            thawed = m & ~old[n]
                            if bool(thawed.any()):
                                masked_state_reset(opt, p, ~thawed.to(p.device))
        elif not self.reset_moments_on_thaw:
            for oi, opt in enumerate(optimizers):
                stash = self._stash.get(oi, {})
                in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
                for n in [n for n in stash if id(params[n]) in in_opt]:
                    st = stash.pop(n)
                    p = params[n]
                    opt.state[p] = {k: (v.to(p.device) if isinstance(v, torch.Tensor) and v.shape == p.shape else v)
                                    for k, v in st.items()}
        self.stage, self.selection = stage, selection
        self.selected_fraction = self._selected_fraction(selection)

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.granularity == "parameter" and self.selection is not None:
            selection: Any = {n: pack_mask(m) for n, m in self.selection.items()}
        else:
            selection = list(self.selection) if self.selection is not None else None
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "stage": self.stage,
            "resets": self.resets,
            "granularity": self.granularity,
            "selection": selection,
            "theta0": {n: t.detach().cpu() for n, t in self._theta0.items()},
            "stash": {oi: {n: dict(st) for n, st in d.items()} for oi, d in self._stash.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if state_dict.get("version") != _STATE_VERSION:
            raise ValueError(
                f"HalfFineTuning: checkpoint state version {state_dict.get('version')!r} is not supported "
                f"(this lit_ft reads version {_STATE_VERSION})."
            )
        if state_dict.get("granularity") != self.granularity:
            raise ValueError(
                f"HalfFineTuning: the checkpoint was made with granularity={state_dict.get('granularity')!r}, this "
                f"callback has granularity={self.granularity!r}."
            )
        self.seed = state_dict["seed"]
        selection = state_dict["selection"]
        if self.granularity == "parameter" and selection is not None:
            selection = {n: unpack_mask(d) for n, d in selection.items()}
        if state_dict.get("theta0"):
            self._theta0 = dict(state_dict["theta0"])  # moved to the parameters' device when used
        if int(state_dict["stage"]) < 0:
            return  # saved before training started: nothing to restore
        self._restored = {
            "stage": state_dict["stage"],
            "resets": state_dict["resets"],
            "selection": selection,
            "stash": {int(oi): {n: dict(st) for n, st in d.items()} for oi, d in state_dict.get("stash", {}).items()},
        }
