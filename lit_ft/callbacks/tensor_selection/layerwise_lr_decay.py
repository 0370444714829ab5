"""LayerwiseLRDecay: layer-wise learning-rate decay (Tinn et al., BLURB): the top layer trains at the base lr, each
layer below at ``decay`` times the one above it, the embeddings lowest."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_ft.callbacks._param_plan import ParamPlanCallback
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_choice, check_number
from lit_ft.core.introspect import (
    ModelLayoutError,
    find_base_model,
    find_decoder_layers,
    find_hf_model,
    find_input_embeddings,
    find_lm_head,
    module_param_names,
    param_names_by_id,
)
from lit_ft.core.optim import param_group_id, sync_schedulers, unwrap_optimizer

TIED_HEAD = ("embeddings", "head")
#: group keys holding a learning rate, scaled with the multiplier (OneCycleLR keeps max_lr / min_lr in the groups)
_LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")
_MULT = "llrd_multiplier"  # this group's layer multiplier (absent = 1: a group LayerwiseLRDecay did not make)
_BASE = "llrd_base_lr"  # the un-decayed initial lr of this group's class
_NOT_CLASS = {"params", "param_names", "group_id", _MULT, _BASE, *_LR_KEYS}


@technique(name="layerwise_lr_decay", family="tensor_selection",
           paper="Fine-Tuning Large Neural Language Models for Biomedical Natural Language Processing",
           arxiv="2112.07869")
class LayerwiseLRDecay(Callback):
    """Layer-wise learning-rate decay: ``lr_l = lr * decay ** (L - l)`` for layer ``l`` of ``L``.

    Paper: Tinn et al., *Fine-Tuning Large Neural Language Models for Biomedical Natural Language Processing*
    (Patterns 2023, BLURB) — layer-wise decay stabilised fine-tuning of BERT-large and ELECTRA.

    Algorithm: layers are numbered ``l = 1..L`` bottom to top (found with :mod:`lit_ft.core.introspect`; under PEFT
    those of the wrapped model). The top layer gets the optimizer's lr, layer ``l`` gets ``lr * decay ** (L - l)``,
    the input embeddings ``lr * decay ** L``, the lm_head, the final norm and every other tensor the lr. At
    ``on_fit_start`` (the optimizer exists, no step has run) every param group of the module's optimizer(s) is split
    by multiplier: each new group keeps all hyperparameters of its group (weight decay splits, betas, a custom
    per-group lr) with its lrs scaled, and the optimizer state (keyed by tensor) is kept. The LR schedulers of the
    optimizer are re-mapped to the new groups (``base_lrs``, per-group lambdas); unsupported scheduler types raise.
    The regrouping is canonical (a function of the tensors, their un-decayed hyperparameters and the multipliers),
    so a resumed run rebuilds exactly the groups whose state the checkpoint holds, and tensors another callback adds
    to the optimizer later (an unfreeze) are moved to their layer's group before the next step.

    Place it **after** every other parameter callback (FreezeLayers, TrainOnly, ...) in ``callbacks``: they may change
    the param groups in their own ``on_fit_start`` on resume, and the regrouping must come last (checked).

    With tied input/output embeddings (e.g. SmolLM2) the one matrix is both the embeddings and the lm_head;
    ``tied_head`` decides its lr.

    Args:
        decay: the per-layer factor ``xi`` in (0, 1]; ``1`` = no decay (a control run).
        tied_head: for a tied embedding/lm_head matrix: ``"embeddings"`` (``lr * decay ** L``) or ``"head"`` (``lr``).
    """

    technique_name = "layerwise_lr_decay"

    def __init__(self, decay: float = 0.9, tied_head: str = "embeddings") -> None:
        owner = type(self).__name__
        check_number(owner, "decay", decay, low=0, high=1, low_open=True)  # per-layer lr factor
        check_choice(owner, "tied_head", tied_head, TIED_HEAD)
        self.decay = float(decay)
        self.tied_head = tied_head
        #: filled at on_fit_start: canonical name -> lr multiplier (names not listed: 1), and the layer count L
        self.multipliers: dict[str, float] = {}
        self.num_layers = 0
        self.tied_embeddings: Optional[bool] = None
        self._probe: dict[str, list[str]] = {}  # "top"/"bottom"/"embeddings" -> names to read the lr from
        self._signature: dict[int, tuple] = {}  # id(optimizer) -> layout after the last regrouping

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, tied_head=self.tied_head)

    # -- multipliers --------------------------------------------------------------------------------------------
    def compute_multipliers(self, pl_module: pl.LightningModule) -> dict[str, float]:
        """Canonical parameter name -> lr multiplier for every parameter that gets one other than 1."""
        hf = find_hf_model(pl_module)
        layers = find_decoder_layers(hf)
        L = len(layers)
        emb = find_input_embeddings(hf)
        emb_modules = [emb]
        # BERT-style: word / position / token-type embeddings and their LayerNorm live in one container
        base = find_base_model(hf)
        for _, child in base.named_children():
            if child is not emb and any(m is emb for m in child.modules()) and not any(m is layers for m in child.modules()):
                emb_modules = [child]
                break
        try:
            head = find_lm_head(hf)
            self.tied_embeddings = head.weight is emb.weight
        except ModelLayoutError:
            head, self.tied_embeddings = None, None
        mult: dict[str, float] = {}
        for n in module_param_names(pl_module, emb_modules, owner="LayerwiseLRDecay"):
            mult[n] = self.decay ** L
        if self.tied_embeddings and self.tied_head == "head":
            for n in module_param_names(pl_module, [head], owner="LayerwiseLRDecay"):
                mult.pop(n, None)
        for i, layer in enumerate(layers):
            for n in module_param_names(pl_module, [layer], owner="LayerwiseLRDecay"):
                mult[n] = self.decay ** (L - 1 - i)
        self.num_layers = L
        self._probe = {
            "top": module_param_names(pl_module, [layers[L - 1]], owner="LayerwiseLRDecay"),
            "bottom": module_param_names(pl_module, [layers[0]], owner="LayerwiseLRDecay"),
            "embeddings": module_param_names(pl_module, emb_modules, owner="LayerwiseLRDecay"),
        }
        return {n: m for n, m in mult.items() if m != 1.0}

    # -- regrouping ---------------------------------------------------------------------------------------------
    def regroup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> bool:
        """Split ``optimizer``'s param groups by layer multiplier (state kept) and re-map its LR schedulers.
        Returns whether the groups changed."""
        opt = unwrap_optimizer(optimizer)
        names = param_names_by_id(pl_module)
        order = {id(p): i for i, p in enumerate(pl_module.parameters())}
        mult = {id(p): self.multipliers.get(n, 1.0) for n, p in pl_module.named_parameters()}
        named = any("param_names" in g for g in opt.param_groups)
        classes: dict[Any, int] = {}  # class key -> first position (model order) of a member
        buckets: dict[tuple[float, Any], dict[str, Any]] = {}
        for gi, g in enumerate(opt.param_groups):
            m_g = float(g.get(_MULT, 1.0))
            base = float(g[_BASE]) if _BASE in g else float(g.get("initial_lr", g["lr"])) / m_g
            ckey = (repr(base), tuple(sorted((k, repr(v)) for k, v in g.items() if k not in _NOT_CLASS)))
            gnames = g.get("param_names")
            for i, p in enumerate(g["params"]):
                pos = order.get(id(p), len(order) + i)
                classes[ckey] = min(classes.get(ckey, pos), pos)
                m_p = mult.get(id(p), m_g)
                b = buckets.setdefault((m_p, ckey), {"src": gi, "m_src": m_g, "base": base, "items": []})
                b["items"].append((pos, p, names.get(id(p)) or (gnames[i] if gnames else None)))
        keys = sorted(buckets, key=lambda k: (-k[0], classes[k[1]]))
        new_groups, origin, scale = [], [], []
        for m_p, ckey in keys:
            b = buckets[(m_p, ckey)]
            src = opt.param_groups[b["src"]]
            s = m_p / b["m_src"]
            g = {k: v for k, v in src.items() if k not in ("params", "param_names")}
            for k in _LR_KEYS:
                if k in g and isinstance(g[k], (int, float)):
                    g[k] = g[k] if s == 1.0 else g[k] * s
            if "initial_lr" in g:
                g["initial_lr"] = b["base"] * m_p
            g[_MULT], g[_BASE] = m_p, b["base"]
            if "group_id" in src:
                g["group_id"] = param_group_id(b["base"] * m_p, float(src.get("weight_decay", 0.0)))
            items = sorted(b["items"], key=lambda t: t[0])
            g["params"] = [p for _, p, _ in items]
            if named:
                g["param_names"] = [n for _, _, n in items]
            new_groups.append(g)
            origin.append(b["src"])
            scale.append(s)
        sig = self._layout(new_groups)
        changed = sig != self._layout(opt.param_groups) or any(
            g.get(_MULT) != ng[_MULT] for g, ng in zip(opt.param_groups, new_groups)
        )
        if changed:
            opt.param_groups[:] = new_groups  # in place: LightningOptimizer shares this list
            sync_schedulers(trainer, opt, origin, scale)
        self._signature[id(opt)] = self._layout(opt.param_groups)
        return changed

    @staticmethod
    def _layout(groups: Sequence[dict]) -> tuple:
        return tuple(tuple(id(p) for p in g["params"]) for g in groups)

    def _check_order(self, trainer: pl.Trainer) -> None:
        cbs = trainer.callbacks
        me = next(i for i, c in enumerate(cbs) if c is self)
        later = [type(c).__name__ for c in cbs[me + 1 :] if isinstance(c, ParamPlanCallback)]
        if later:
            raise ValueError(
                f"LayerwiseLRDecay must come after every parameter callback in `callbacks`, but {later} come(s) "
                f"after it: they can change the param groups in on_fit_start (on resume) and the layer-wise "
                f"regrouping must come last. Move LayerwiseLRDecay to the end of the parameter callbacks."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "deepspeed" in type(trainer.strategy).__name__.lower():
            raise RuntimeError("LayerwiseLRDecay does not support DeepSpeed (it owns the optimizer's param groups); "
                               "build layer-wise groups in configure_optimizers instead.")
        self._check_order(trainer)
        self.multipliers = self.compute_multipliers(pl_module)
        if self.tied_embeddings:
            rank_zero_warn(
                f"LayerwiseLRDecay: the input embeddings and the lm_head are one tied tensor; it trains at the "
                f"{'embeddings lr (lr * decay ** L)' if self.tied_head == 'embeddings' else 'head lr'} "
                f"(tied_head={self.tied_head!r})."
            )
        for opt in trainer.optimizers:
            self.regroup(trainer, pl_module, opt)
        rank_zero_info(
            f"LayerwiseLRDecay(decay={self.decay}): {self.num_layers} layers, lr multipliers from "
            f"{self.decay ** self.num_layers:.4g} (embeddings) to 1 (top layer, head); "
            f"{len(trainer.optimizers[0].param_groups) if trainer.optimizers else 0} param groups"
        )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        for opt in trainer.optimizers:
            inner = unwrap_optimizer(opt)
            if self._layout(inner.param_groups) != self._signature.get(id(inner)):
                self.regroup(trainer, pl_module, inner)  # another callback added / moved tensors
        if trainer.optimizers:
            for key, value in self.layer_lrs(trainer.optimizers[0], pl_module).items():
                pl_module.log(f"lit_ft/{self.technique_name}/lr_{key}", value, on_step=True, on_epoch=False, batch_size=1)

    def layer_lrs(self, optimizer: Any, pl_module: pl.LightningModule) -> dict[str, float]:
        """Current lr of the top layer, the bottom layer and the embeddings (those with a tensor in the optimizer)."""
        opt = unwrap_optimizer(optimizer)
        params = dict(pl_module.named_parameters())
        where = {id(p): g for g in opt.param_groups for p in g["params"]}
        out = {}
        for key, names in self._probe.items():
            g = next((where[id(params[n])] for n in names if id(params[n]) in where), None)
            if g is not None:
                out[key] = float(g["lr"])
        return out
