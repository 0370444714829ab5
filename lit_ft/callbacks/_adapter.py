"""Shared plumbing for adapter techniques (``docs/architecture.md``, "Adapters").

:class:`AdapterCallback` builds a technique's :class:`~lit_ft.core.adapters.AdapterSet` at ``setup`` (any stage,
before the optimizer exists and before a checkpoint is restored), registers it on the LightningModule
(``pl_module.lit_ft_adapters[<name>]``: moved, checkpointed and DDP-synchronised with the module), hooks it into the
HF model's target modules, freezes the backbone through the parameter-plan registry (never unfreezing what the user
froze), gives the adapters their own learning rate, and writes the adapter artifact when training ends
(:class:`~lit_ft.callbacks._owned_tensors.OwnedTensorsCallback`). :meth:`AdapterCallback.merge` folds mergeable
adapters into the base weights.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.callbacks._owned_tensors import OwnedTensorsCallback
from lit_ft.core.adapters import (
    HOST_ATTR,
    AdapterError,
    AdapterSet,
    register_adapters,
    save_adapters,
    unregister_adapters,
)
from lit_ft.core.introspect import find_hf_model

#: top-level modules of a HF task model that are its task head (sequence classification, QA): trained with the
#: adapters when ``train_task_head`` (a causal LM's lm_head is not one: it is tied to the embeddings)
TASK_HEADS = ("score", "classifier", "qa_outputs")


def task_head_param_names(pl_module: pl.LightningModule) -> list[str]:
    """The LightningModule's names of the HF model's task-head tensors (empty for a causal LM)."""
    hf = find_hf_model(pl_module)
    heads = [m for name in TASK_HEADS if isinstance(m := getattr(hf, name, None), torch.nn.Module)]
    ids = {id(p) for m in heads for p in m.parameters()}
    return [n for n, p in pl_module.named_parameters() if id(p) in ids]


class AdapterCallback(OwnedTensorsCallback):
    """Base class of adapter techniques: subclasses implement :meth:`build_adapters`.

    Common arguments (subclasses expose them): ``freeze_backbone``, ``learning_rate``, ``weight_decay``,
    ``save_dir`` and ``picture_every_n_steps`` as in :class:`~lit_ft.callbacks._owned_tensors.OwnedTensorsCallback`
    (the artifact is ``adapters.safetensors`` + ``adapter_config.json``, loadable with
    :func:`lit_ft.core.adapters.load_adapters`), and ``train_task_head``: a sequence-classification model's head
    (``score`` / ``classifier``) trains with the adapters.
    """

    technique_name = "adapters"
    owned_what = "the adapters"
    #: an adapter adds work to the step (a frozen backbone still runs its full backward to reach early adapters)
    flops_every_n_steps = 0

    def __init__(self, freeze_backbone: bool = True, learning_rate: float | None = None,
                 weight_decay: float | None = None, save_dir: str | None = None, train_task_head: bool = True,
                 picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, picture_every_n_steps)
        if not isinstance(train_task_head, bool):
            raise ValueError(f"{type(self).__name__}: `train_task_head` must be true or false, got {train_task_head!r}")
        self.train_task_head = train_task_head
        self.adapters: AdapterSet | None = None
        self._host: pl.LightningModule | None = None

    # -- to implement ----------------------------------------------------------------------------------------------
    def build_adapters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: torch.nn.Module) -> AdapterSet:
        raise NotImplementedError

    # -- names -----------------------------------------------------------------------------------------------------
    @property
    def adapters_name(self) -> str:
        return self.technique_name

    def owned_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        prefix = f"{HOST_ATTR}.{self.adapters_name}."
        return [n for n, _ in pl_module.named_parameters() if n.startswith(prefix)]

    def extra_trainable(self, pl_module: pl.LightningModule) -> list[str]:
        return task_head_param_names(pl_module) if self.train_task_head else []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(adapters=self.adapters_name)

    # -- life cycle --------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lit_ft.core.strategy import refuse_sharded_strategies

        refuse_sharded_strategies(trainer, type(self).__name__, "the adapters sit outside the sharded model, so their "
                                  "gradients would not be averaged across ranks (each rank would train its own)")
        if self.adapters is None or self._host is not pl_module:
            self.install(trainer, pl_module)
        super().setup(trainer, pl_module, stage)  # parameter plan (fit only)

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        store = getattr(pl_module, HOST_ATTR, None)
        if store is not None and self.adapters_name in store:
            raise AdapterError(f"{owner}: the model already has {self.adapters_name} adapters (another {owner} "
                               "instance); use one per model")
        hf = find_hf_model(pl_module)
        adapters = self.build_adapters(trainer, pl_module, hf)
        adapters.to(device=next(hf.parameters()).device)
        register_adapters(pl_module, self.adapters_name, adapters)
        adapters.attach(hf)
        self.adapters, self._host = adapters, pl_module
        n = sum(p.numel() for p in adapters.parameters())
        base = sum(p.numel() for p in hf.parameters())
        rank_zero_info(f"{owner}: {len(adapters.targets)} adapters installed ({n:,} parameters, "
                       f"{100 * n / max(base, 1):.2f}% of the model's)")

    def remove(self) -> None:
        """Take the adapters out of the model (their tensors leave the LightningModule)."""
        if self.adapters is not None:
            self.adapters.detach()
        if self._host is not None:
            unregister_adapters(self._host, self.adapters_name)
        self.adapters = self._host = None

    def merge(self) -> None:
        """Fold the adapters into the base weights (exact for mergeable adapters; raises :class:`AdapterError`
        otherwise) and take them out: the model keeps its outputs with no adapter cost."""
        if self.adapters is None:
            raise AdapterError(f"{type(self).__name__}.merge: no adapters are installed")
        self.adapters.merge()
        self.remove()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir and self.adapters is not None and trainer.is_global_zero:
            out = self.resolved_save_dir(trainer)
            save_adapters(self.adapters, out, metadata=self.artifact_metadata(pl_module))
            rank_zero_info(f"{type(self).__name__}: adapters saved to {out}")


def adapter_dims(target: torch.nn.Module, owner: str) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like target (``nn.Linear``; GPT-2's ``Conv1D`` stores its weight
    transposed). Raises :class:`AdapterError` naming the module type otherwise."""
    if isinstance(target, torch.nn.Linear):
        return target.in_features, target.out_features
    w = getattr(target, "weight", None)
    if type(target).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2:
        return int(w.shape[0]), int(w.shape[1])
    raise AdapterError(f"{owner}: the target is a {type(target).__name__}, not a linear layer; adapters on it need "
                       "its input and output widths")


def hidden_size_of(hf_model: torch.nn.Module) -> int:
    """The model's hidden size (``config.hidden_size`` / ``n_embd`` / ``d_model``)."""
    cfg = getattr(hf_model, "config", None)
    for key in ("hidden_size", "n_embd", "d_model"):
        v = getattr(cfg, key, None)
        if isinstance(v, int):
            return v
    raise AdapterError(f"cannot read the hidden size of {type(hf_model).__name__} from its config")


def module_width(module: torch.nn.Module, default: int) -> Any:
    """The output width of a linear-like module, else ``default`` (a whole sublayer keeps the hidden size)."""
    try:
        return adapter_dims(module, "")[1]
    except AdapterError:
        return default
