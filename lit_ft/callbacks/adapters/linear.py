"""LinearAdapters: LiST's linear, mergeable adapters after the attention-output and FFN-output dense layers."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lit_ft.callbacks._adapter import AdapterCallback, adapter_dims
from lit_ft.core.adapters import Adapter, AdapterError, AdapterSet, resolve_targets
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_choice, check_int, check_number, check_str_list

INITS = ("list", "identity")


class LinearAdapter(Adapter):
    """``y' = y + y W1 W2`` on a dense layer's output ``y`` (``W1``: ``[d, r]``, ``W2``: ``[r, d]``, no bias, no
    non-linearity). Mergeable: ``y (I + W1 W2)`` is the same dense layer with weight ``(I + W1 W2)ᵀ W`` and bias
    ``b (I + W1 W2)``."""

    mergeable = True

    def __init__(self, width: int, bottleneck: int = 128, init_std: float = 0.02, init: str = "list") -> None:
        super().__init__()
        self.width, self.bottleneck, self.init_std, self.init = int(width), int(bottleneck), float(init_std), init
        self.w1 = nn.Parameter(torch.zeros(self.width, self.bottleneck))
        self.w2 = nn.Parameter(torch.zeros(self.bottleneck, self.width))

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """LiST: both matrices ~ N(0, init_std²); ``"identity"``: ``W2 = 0`` (the model's outputs unchanged at the
        start, like LoRA's zero up-projection)."""
        self.w1.copy_(torch.randn(self.w1.shape, generator=generator) * self.init_std)
        if self.init == "list":
            self.w2.copy_(torch.randn(self.w2.shape, generator=generator) * self.init_std)
        else:
            self.w2.zero_()

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        delta = (y.to(self.w1.dtype) @ self.w1) @ self.w2
        return y + delta.to(y.dtype)

    @torch.no_grad()
    def merge_into(self, target: nn.Module) -> None:
        m = (self.w1.double() @ self.w2.double())  # [d, d]
        w = target.weight
        if isinstance(target, nn.Linear):  # y = x Wᵀ + b  ->  W' = (I + M)ᵀ W
            new_w = w.double() + m.T @ w.double()
        elif type(target).__name__ == "Conv1D":  # GPT-2: y = x W + b, W [in, out]  ->  W' = W (I + M)
            new_w = w.double() + w.double() @ m
        else:
            raise AdapterError(f"LinearAdapter: cannot merge into a {type(target).__name__} (nn.Linear or Conv1D only)")
        w.copy_(new_w.to(w.dtype))
        b = getattr(target, "bias", None)
        if b is not None:
            b.copy_((b.double() + b.double() @ m).to(b.dtype))

    def artifact_config(self) -> dict:
        return {"width": self.width, "bottleneck": self.bottleneck, "init_std": self.init_std, "init": self.init}


@technique(name="linear_adapters", family="adapters",
           paper="LiST: Lite Prompted Self-training Makes Parameter-efficient Few-shot Learners", arxiv="2110.06274")
class LinearAdapters(AdapterCallback):
    """LiST's linear adapters: ``y + y W1 W2`` after every layer's attention-output and FFN-output dense layers.

    Paper: Wang et al., *LiST: Lite Prompted Self-training Makes Parameter-efficient Few-shot Learners* (Findings of
    NAACL 2022); authors' code ``microsoft/LiST`` (``src/model_adaptation.py``). The adapters are linear, with no bias
    and no non-linearity, inserted after the dense layer and before dropout, residual and LayerNorm; the backbone is
    frozen and the adapters (plus a classification model's head) train. Because the adapter is a linear map of the
    dense layer's output, :meth:`merge` folds it into that layer exactly: zero inference cost. LiST's self-training
    loop (teacher, meta-reweighted pseudo-labels) is a separate technique; these are its adapters.

    Algorithm: for each target dense layer ``y = x Wᵀ + b``: ``y' = y + y W1 W2`` with ``W1`` ``[d, r]``, ``W2``
    ``[r, d]``, both ~ N(0, 0.02²) (the authors' init), r = 128.

    Args:
        bottleneck: the adapter width ``r`` (LiST: 128).
        targets: where, in every decoder layer: roles (``"attention_output"``, ``"mlp_output"``: resolved per
            architecture) or module paths inside the layer (``"mlp.down_proj"``). Default: LiST's two.
        init_std: std of the normal initialisation (LiST: 0.02).
        init: ``"list"`` (both matrices random, the authors' code: the model's outputs move at step 0) or
            ``"identity"`` (``W2 = 0``: outputs unchanged at the start, like LoRA).
        seed: seed of the initialisation.
        freeze_backbone: freeze every model tensor except the adapters (and the task head, see
            ``train_task_head``).
        learning_rate: the adapters' lr (own param group); ``None`` = the optimizer's (LiST's scripts train the
            adapters at the run's lr).
        weight_decay: the adapters' weight decay; ``None`` = the optimizer's.
        save_dir: write ``adapters.safetensors`` + ``adapter_config.json`` here when fit ends (relative = under
            ``trainer.default_root_dir``); :func:`lit_ft.core.adapters.load_adapters` attaches them to a model.
        train_task_head: a sequence-classification model's head trains with the adapters (LiST trains adapters
            and head).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "linear_adapters"

    def __init__(self, bottleneck: int = 128, targets: list[str] | None = None, init_std: float = 0.02,
                 init: str = "list", seed: int = 0, freeze_backbone: bool = True,
                 learning_rate: float | None = None, weight_decay: float | None = None, save_dir: str | None = None,
                 train_task_head: bool = True, picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, train_task_head, picture_every_n_steps)
        owner = type(self).__name__
        self.bottleneck = check_int(owner, "bottleneck", bottleneck, 1)
        self.targets = check_str_list(owner, "targets", targets, allow_none=True) or ["attention_output", "mlp_output"]
        self.init_std = check_number(owner, "init_std", init_std, low=0)
        self.init = check_choice(owner, "init", init, INITS)
        self.seed = check_int(owner, "seed", seed, 0)

    def build_adapters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module) -> AdapterSet:
        owner = type(self).__name__
        g = torch.Generator().manual_seed(self.seed)
        adapters = {}
        for target, module in resolve_targets(hf_model, self.targets, owner).items():
            width = adapter_dims(module, owner)[1]
            a = LinearAdapter(width, self.bottleneck, self.init_std, self.init)
            a.reset(g)
            adapters[target] = a
        return AdapterSet(adapters)
