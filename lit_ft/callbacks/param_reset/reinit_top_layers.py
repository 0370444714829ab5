"""ReinitTopLayers: re-initialise the top transformer layers once before fine-tuning (Tinn et al., BLURB)."""

from __future__ import annotations

import copy
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from lit_ft.callbacks._param_plan import param_plans_for
from lit_ft.core.registry import technique
from lit_ft.core.resume import adopt_saved_state, record_resume_args
from lit_ft.core.validate import check_bool, check_int, check_layer_count, check_number
from lit_ft.core.introspect import find_decoder_layers, find_hf_model, param_names_by_id


def _is_norm(m: nn.Module) -> bool:
    return "norm" in type(m).__name__.lower() and isinstance(getattr(m, "weight", None), torch.Tensor)


def norm_unit_value(hf_model: nn.Module, norm: nn.Module) -> float:
    """The value a norm weight is initialised to by the model's own ``_init_weights``: 1 for ``x * w`` norms
    (LayerNorm, Llama RMSNorm), 0 for ``x * (1 + w)`` norms (Gemma). Falls back to 1."""
    init = getattr(hf_model, "_init_weights", None)
    if init is None:
        return 1.0
    try:
        probe = copy.deepcopy(norm)
        with torch.no_grad():
            probe.weight.fill_(0.5)
            init(probe)
        w = probe.weight.detach().float()
        v = float(w.flatten()[0])
        if v != 0.5 and bool((w == v).all()):
            return v
    except Exception:  # noqa: BLE001 - any model-specific failure: the card's LayerNorm (1, 0)
        pass
    return 1.0


def _reinit_decision(saved: Any, new: Any, state: Any) -> Optional[str]:
    """Resuming with another re-init argument: refused once the re-init is in the checkpoint's weights."""
    if state.get("done"):
        return "the re-initialisation was already applied with the saved value (the checkpoint's weights hold it)"
    return None


@technique(name="reinit_top_layers", family="param_reset",
           paper="Fine-Tuning Large Neural Language Models for Biomedical Natural Language Processing",
           arxiv="2112.07869")
class ReinitTopLayers(Callback):
    """Re-initialise the top ``num_layers`` transformer layers once, before training starts.

    Paper: Tinn et al., *Fine-Tuning Large Neural Language Models for Biomedical Natural Language Processing*
    (Patterns 2023, BLURB) — re-initialising the top layers helped low-resource tasks (BIOSSES sentence similarity).

    Algorithm: at ``setup("fit")``, before the optimizer exists, inside each of the top ``num_layers``
    decoder/encoder layers (found with :mod:`lit_ft.core.introspect`; under PEFT those of the wrapped model):
    ``nn.Linear`` / ``nn.Embedding`` weights ~ N(0, std) (an Embedding's ``padding_idx`` row 0), biases 0, norm
    weights set to their identity value (1 for LayerNorm / RMSNorm; 0 for Gemma-style ``x * (1 + w)`` norms, as the
    model's own ``_init_weights`` does) and norm biases 0. The draws come from a private ``torch.Generator`` seeded with
    ``seed`` (CPU, float32, then cast), so every DDP rank re-initialises identically and no global RNG stream moves.
    Only trainable tensors are touched (``include_frozen=True`` also re-initialises frozen ones): under PEFT that is
    the adapter tensors of the top layers; the frozen base weights stay. The re-init happens once: the ``done`` flag is
    saved in the checkpoint, and a resumed run takes the (re-initialised, trained) weights from the checkpoint.

    Put it **before** other parameter callbacks that mask elements, or anywhere: element-mask snapshots of those
    callbacks are refreshed after the re-init.

    Args:
        num_layers: number of top layers to re-initialise (>= 1, at most the model's layer count).
        std: standard deviation of the normal init; ``None`` = the model config's ``initializer_range`` (0.02 if
            absent).
        seed: seed of the re-init's private generator (any int >= 0); the same on every rank.
        include_frozen: also re-initialise tensors that are frozen (``requires_grad=False``) when training starts.
    """

    technique_name = "reinit_top_layers"
    #: resuming with a changed argument (see :mod:`lit_ft.core.resume`)
    resume_decisions = {a: _reinit_decision for a in ("num_layers", "std", "seed", "include_frozen")}

    def __init__(self, num_layers: int = 1, std: Optional[float] = None, seed: int = 0, include_frozen: bool = False) -> None:
        owner = type(self).__name__
        self.num_layers = check_int(owner, "num_layers", num_layers, minimum=1)  # top layers to re-initialise
        self.std = check_number(owner, "std", std, low=0, low_open=True, allow_none=True,
                                null_means="the config's initializer_range")
        self.seed = check_int(owner, "seed", seed, minimum=0)
        self.include_frozen = check_bool(owner, "include_frozen", include_frozen)
        #: True once the re-init has been applied (in this run or, per the checkpoint, in the run resumed from)
        self.done = False
        #: number of re-inits this callback object applied whose result the run kept (0 or 1)
        self.reinit_count = 0
        #: filled by the re-init: std used, canonical names re-initialised, their element count, the model's
        self.std_used: Optional[float] = None
        self.reinitialized_names: list[str] = []
        self.reinitialized_numel = 0
        self.total_numel = 0
        self._restored = False  # load_state_dict saw this callback's state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(num_layers=self.num_layers, seed=self.seed)

    def state_dict(self) -> dict[str, Any]:
        return {"done": self.done, "num_layers": self.num_layers, "seed": self.seed, "std": self.std_used,
                "names": list(self.reinitialized_names)}

    # -- resume with changed arguments: restore or refuse, never a silent reset (lit_ft.core.resume) -------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        record_resume_args(self, checkpoint)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        adopt_saved_state(self, trainer, checkpoint)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after setup() and after the module weights: if this run re-initialised at
        # setup, the checkpoint's weights (re-initialised once in the original run, then trained) replaced that
        if state_dict.get("done"):
            self.done = True
            self._restored = True
            self.reinit_count = 0
            self.std_used = state_dict.get("std", self.std_used)
            self.reinitialized_names = list(state_dict.get("names", self.reinitialized_names))

    # -- the re-init --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def reinitialize(self, pl_module: nn.Module) -> list[str]:
        """Re-initialise the top layers of ``pl_module``'s model now; returns the canonical names touched."""
        hf = find_hf_model(pl_module)
        layers = find_decoder_layers(hf)
        check_layer_count("ReinitTopLayers", "num_layers", self.num_layers, len(layers), minimum=1)
        cfg = getattr(hf, "config", None)
        std = self.std if self.std is not None else float(getattr(cfg, "initializer_range", None) or 0.02)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        names = param_names_by_id(pl_module)
        touched: dict[str, None] = {}
        skipped_frozen: list[str] = []
        units: dict[type, float] = {}

        def ok(p: Optional[torch.Tensor]) -> bool:
            if p is None:
                return False
            if p.requires_grad or self.include_frozen:
                return True
            skipped_frozen.append(names.get(id(p), "?"))
            return False

        def set_(p: torch.Tensor, value: torch.Tensor) -> None:
            p.copy_(value.to(device=p.device, dtype=p.dtype))
            touched[names.get(id(p), f"<{tuple(p.shape)}>")] = None

        covered: set[int] = set()
        for layer in layers[len(layers) - self.num_layers :]:
            for m in layer.modules():
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    noise = torch.empty(w.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                    if isinstance(m, nn.Embedding) and m.padding_idx is not None:
                        noise[m.padding_idx] = 0
                    if ok(w):
                        set_(w, noise)
                    if isinstance(b, torch.Tensor) and ok(b):
                        set_(b, torch.zeros(b.shape))
                elif _is_norm(m):
                    unit = units.setdefault(type(m), norm_unit_value(hf, m))
                    if ok(w):
                        set_(w, torch.full(w.shape, unit))
                    if isinstance(b, torch.Tensor) and ok(b):
                        set_(b, torch.zeros(b.shape))
                else:
                    continue
                covered.update(id(p) for p in m.parameters(recurse=False))
            other = [names.get(id(p), "?") for p in layer.parameters() if id(p) not in covered and p.requires_grad]
            if other:
                rank_zero_warn(f"ReinitTopLayers: left {len(other)} trainable tensor(s) of unknown module types as "
                               f"they were: {other[:4]}")
        if skipped_frozen:
            rank_zero_info(f"ReinitTopLayers: {len(skipped_frozen)} frozen tensor(s) in the top layers kept their "
                           f"values (include_frozen=False), e.g. {skipped_frozen[:3]}")
        if not touched:
            raise ValueError(
                f"ReinitTopLayers(num_layers={self.num_layers}): no trainable tensor in the top layers to re-initialise "
                f"(all frozen); set include_frozen=True or train those layers."
            )
        numel = {n: p.numel() for n, p in pl_module.named_parameters()}
        self.std_used = std
        self.reinitialized_names = [n for n in numel if n in touched]
        self.reinitialized_numel = sum(numel[n] for n in self.reinitialized_names)
        self.total_numel = sum(numel.values())
        # other parameter callbacks may have snapshotted masked-out values before this ran: refresh them
        reg = param_plans_for(pl_module, create=False)
        if reg is not None and reg.composed is not None:
            reg.set(f"{self.state_key}/refresh", None, pl_module)
        return self.reinitialized_names

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.done:
            return
        self.reinitialize(pl_module)
        self.done = True
        self.reinit_count += 1
        rank_zero_info(
            f"ReinitTopLayers: re-initialised the top {self.num_layers} layer(s) (std={self.std_used:g}, "
            f"seed={self.seed}): {len(self.reinitialized_names)} tensor(s), {self.reinitialized_numel:,} elements"
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.ckpt_path and not self._restored and self.reinit_count:
            rank_zero_warn(
                "ReinitTopLayers: resumed from a checkpoint without ReinitTopLayers state: the re-initialisation done "
                "at setup was replaced by the checkpoint's weights."
            )
            self.reinit_count = 0
        frac = self.reinitialized_numel / self.total_numel if self.total_numel else 0.0
        pl_module.log(f"lit_ft/{self.technique_name}/reinitialized_fraction", frac, batch_size=1)
        pl_module.log(f"lit_ft/{self.technique_name}/resets", float(self.done), batch_size=1)
