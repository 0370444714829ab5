"""ParallelAdapters: He et al.'s (scaled) parallel adapter, computed from a sublayer's input and added to its output."""

from __future__ import annotations

import lightning.pytorch as pl
from torch import nn

from lit_ft.callbacks._adapter import AdapterCallback
from lit_ft.callbacks.adapters._parallel import ARXIV, ATTENTION_ROLES, PAPER, build_parallel_adapters
from lit_ft.core.adapters import AdapterError, AdapterSet
from lit_ft.core.parallel_adapter import PA_INITS
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_str_list

@technique(name="parallel_adapters", family="adapters", paper=PAPER, arxiv=ARXIV)
class ParallelAdapters(AdapterCallback):
    """He et al.'s scaled parallel adapter: ``Δh = s·(ReLU(x W_down + b_down) W_up + b_up)`` from the sublayer's input.

    Paper: He, Zhou, Ma, Berg-Kirkpatrick & Neubig, *Towards a Unified View of Parameter-Efficient Transfer
    Learning* (ICLR 2022); authors' code ``jxhe/unify-parameter-efficient-tuning`` (``petl/petl_factory.py``,
    ``Adapter_Layer``; ``exps/run_xsum.sh``). The paper frames adapters, prefix tuning and LoRA as a modification
    ``Δh`` of a sublayer's output and finds the parallel adapter at the FFN, scaled by ``s``, the best way to spend
    parameters there. The backbone is frozen; the adapters (and a classification model's head) train.

    Algorithm: for each target sublayer ``y = f(x)``: ``y' = y + s·(ReLU(x W_down + b_down) W_up + b_up)``, with
    ``W_down`` ``[d, r]``, ``W_up`` ``[r, d]``; LoRA-style init (``W_down`` Kaiming-uniform, ``W_up`` and biases 0),
    so the model's outputs are unchanged at the start. Not mergeable (the ReLU): :meth:`merge` refuses.

    Defaults are the paper's recommended FFN setting (the scaled PA of its XSum / translation experiments and of
    MAM): ``r = 512``, ``s = 4`` at the FFN block. Its GLUE recipe (RoBERTa-base) uses ``r = 16``, ``s = 2``.

    Args:
        bottleneck: the adapter width ``r`` (paper: 512 at the FFN; 16 in the GLUE recipe).
        scale: the scale ``s`` applied to the adapter's output (paper: 4; 2 in the GLUE recipe).
        targets: the sublayers, in every decoder layer: roles (``"mlp"``: the whole FFN block, the default;
            ``"attention"``: the whole attention block) or module paths inside the layer (``"mlp.down_proj"``: a
            linear layer's input and output widths are used).
        init: ``"lora"`` (the paper's: outputs unchanged at the start) or ``"bert"`` (both weights N(0, 0.02²), the
            authors' option for sequential adapters: outputs move at step 0).
        fused: run each FFN block and its adapter as two GEMMs over concatenated weights (a replacement forward of
            the block, same result) instead of a forward hook. FFN targets only (role ``"mlp"``).
        seed: seed of the initialisation.
        freeze_backbone: freeze every model tensor except the adapters (and the task head, see
            ``train_task_head``).
        learning_rate: the adapters' lr (own param group); ``None`` = the optimizer's (the paper's runs train the
            adapters at the run's lr: 5e-5 on XSum, 1e-4 on GLUE).
        weight_decay: the adapters' weight decay; ``None`` = the optimizer's.
        save_dir: write ``adapters.safetensors`` + ``adapter_config.json`` here when fit ends (relative = under
            ``trainer.default_root_dir``); :func:`lit_ft.core.adapters.load_adapters` attaches them to a model.
        train_task_head: a sequence-classification model's head trains with the adapters.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "parallel_adapters"

    def __init__(self, bottleneck: int = 512, scale: float = 4.0, targets: list[str] | None = None,
                 init: str = "lora", fused: bool = False, seed: int = 0, freeze_backbone: bool = True,
                 learning_rate: float | None = None, weight_decay: float | None = None, save_dir: str | None = None,
                 train_task_head: bool = True, picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, train_task_head, picture_every_n_steps)
        owner = type(self).__name__
        self.bottleneck = check_int(owner, "bottleneck", bottleneck, 1)
        self.scale = check_number(owner, "scale", scale, low=0, low_open=True)
        self.targets = check_str_list(owner, "targets", targets, allow_none=True) or ["mlp"]
        self.init = check_choice(owner, "init", init, PA_INITS)
        self.fused = check_bool(owner, "fused", fused)
        attention = [t for t in self.targets if t in ATTENTION_ROLES]
        if self.fused and attention:
            raise ValueError(f"{owner}: `fused` applies to FFN blocks only (role 'mlp'), but `targets` has "
                             f"{attention}; use fused=false for attention targets")
        self.seed = check_int(owner, "seed", seed, 0)

    def build_adapters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module) -> AdapterSet:
        return build_parallel_adapters(hf_model, self.targets, self.bottleneck, self.scale, self.init, self.seed,
                                       self.fused, type(self).__name__)

    def merge(self) -> None:
        """Refused: the parallel adapter is not a linear map (ReLU), so it cannot be folded into the base weights."""
        raise AdapterError(f"{type(self).__name__}.merge: parallel adapters cannot be merged into the base weights "
                           "(s·ReLU(x W_down + b) W_up is not linear in x); keep them attached, or save them with "
                           "save_dir and attach them with lit_ft.core.adapters.load_adapters")
