"""BottleneckAdapters: Houlsby / Pfeiffer bottleneck adapters ``h + f(h W_down + b_down) W_up + b_up`` on a sublayer's
output, for few-shot pattern-exploiting training with the verbalizer module."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn

from lit_ft.callbacks._adapter import AdapterCallback, hidden_size_of, module_width
from lit_ft.core.adapters import Adapter, AdapterError, AdapterSet, resolve_targets
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_choice, check_int, check_str_list

__all__ = ["BottleneckAdapter", "BottleneckAdapters", "CONFIGS"]

#: where each configuration puts its adapters inside a decoder layer (roles of lit_ft.core.adapters)
CONFIGS: dict[str, tuple[str, ...]] = {
    "houlsby": ("attention_output", "mlp_output"),  # after the attention and the feed-forward sublayers
    "pfeiffer": ("mlp_output",),  # after the feed-forward sublayer only
}
NON_LINEARITIES = ("relu", "gelu", "swish", "tanh")
INITS = ("bert", "houlsby", "identity")
_ACT = {"relu": F.relu, "gelu": F.gelu, "swish": F.silu, "tanh": torch.tanh}


class BottleneckAdapter(Adapter):
    """``y' = y + f(y W_down + b_down) W_up + b_up`` on a sublayer's output ``y`` (``W_down`` ``[d, m]``, ``W_up``
    ``[m, d]``, ``m << d``); without ``residual``: ``y' = f(y W_down + b_down) W_up + b_up``. Not mergeable: the
    non-linearity ``f`` between the projections makes it no linear map of ``y``."""

    mergeable = False

    def __init__(self, width: int, bottleneck: int, non_linearity: str = "relu", residual: bool = True,
                 init: str = "bert") -> None:
        super().__init__()
        self.width, self.bottleneck = int(width), int(bottleneck)
        self.non_linearity, self.residual, self.init = non_linearity, bool(residual), init
        self.down = nn.Parameter(torch.zeros(self.width, self.bottleneck))
        self.down_bias = nn.Parameter(torch.zeros(self.bottleneck))
        self.up = nn.Parameter(torch.zeros(self.bottleneck, self.width))
        self.up_bias = nn.Parameter(torch.zeros(self.width))

    @torch.no_grad()
    def reset(self, generator: torch.Generator) -> None:
        """``"bert"`` (AdapterHub's default): both matrices ~ N(0, 0.02²); ``"houlsby"`` (the paper): both ~ N(0,
        0.01²) truncated at two standard deviations; ``"identity"``: ``W_down`` as ``"bert"``, ``W_up = 0`` (with
        ``residual`` the model's outputs are unchanged at the start). Biases start at 0."""
        if self.init == "houlsby":
            for p in (self.down, self.up):
                # truncated normal by resampling (seeded, no global RNG): |x| <= 2 std
                x = torch.randn(p.shape, generator=generator)
                while (bad := x.abs() > 2).any():
                    x[bad] = torch.randn(int(bad.sum()), generator=generator)
                p.copy_(x * 1e-2)
        else:
            self.down.copy_(torch.randn(self.down.shape, generator=generator) * 0.02)
            if self.init == "bert":
                self.up.copy_(torch.randn(self.up.shape, generator=generator) * 0.02)
            else:
                self.up.zero_()
        self.down_bias.zero_()
        self.up_bias.zero_()

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        h = y.to(self.down.dtype)
        out = _ACT[self.non_linearity](h @ self.down + self.down_bias) @ self.up + self.up_bias
        return y + out.to(y.dtype) if self.residual else out.to(y.dtype)

    def artifact_config(self) -> dict:
        return {"width": self.width, "bottleneck": self.bottleneck, "non_linearity": self.non_linearity,
                "residual": self.residual, "init": self.init}


@technique(name="bottleneck_adapters", family="adapters",
           paper="Parameter-Efficient Transfer Learning for NLP", arxiv="1902.00751")
class BottleneckAdapters(AdapterCallback):
    """Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020's AdapterFusion placement), for few-shot
    pattern-exploiting training with :class:`~lit_ft.modules.VerbalizerClassificationModule`.

    Papers: Houlsby et al., *Parameter-Efficient Transfer Learning for NLP* (ICML 2019): a bottleneck adapter after
    the attention sublayer and after the feed-forward sublayer of every layer, before the residual addition;
    Pfeiffer et al., *AdapterFusion: Non-Destructive Task Composition for Transfer Learning* (EACL 2021): one adapter
    after the feed-forward sublayer only, on par at half the adapters. Conventions follow AdapterHub's ``adapters``
    library (``SeqBnConfig`` = Pfeiffer, ``DoubleSeqBnConfig`` = Houlsby): bottleneck size ``hidden /
    reduction_factor`` with ``reduction_factor`` 16. The backbone is frozen; the adapters (plus a classification
    model's head) train.

    Algorithm: for each target sublayer output ``h`` (``[..., d]``): ``h' = h + f(h W_down + b_down) W_up + b_up``,
    ``W_down`` ``[d, d/r]``, ``W_up`` ``[d/r, d]``, ``f`` a non-linearity (ReLU). Near-identity init: the adapter's
    branch starts small (or exactly zero with ``init="identity"``), so training starts from the base model.
    Not mergeable (``f`` is non-linear): :meth:`merge` refuses.

    Args:
        config: ``"pfeiffer"`` (default: one adapter per layer after the feed-forward sublayer, AdapterFusion's
            choice; half the adapters of Houlsby's at the same quality there) or ``"houlsby"`` (after the attention
            and the feed-forward sublayers).
        reduction_factor: bottleneck size = hidden size // reduction_factor (AdapterHub's convention; 16 for both
            configurations). Ignored when ``bottleneck`` is set.
        bottleneck: the bottleneck size ``m`` itself; ``None`` = from ``reduction_factor``.
        non_linearity: ``"relu"`` (default; AdapterHub's Pfeiffer), ``"gelu"``, ``"swish"`` (AdapterHub's
            Houlsby) or ``"tanh"``.
        residual: add the adapter's branch to the sublayer output (``h + ...``, the papers'); false replaces the
            output with the branch (identity init is then impossible).
        init: ``"bert"`` (AdapterHub's default: both projections ~ N(0, 0.02²)), ``"houlsby"`` (the paper: ~ N(0,
            0.01²) truncated at two standard deviations) or ``"identity"`` (up-projection 0: outputs unchanged at
            the start). Biases start at 0.
        targets: override the configuration's placement: roles (``"attention_output"``, ``"mlp_output"``, ...) or
            module paths inside a decoder layer (``"mlp.down_proj"``). ``None`` = the configuration's.
        seed: seed of the initialisation.
        freeze_backbone: freeze every model tensor except the adapters (and the task head, see
            ``train_task_head``).
        learning_rate: the adapters' lr (own param group); ``None`` = the optimizer's (adapters usually want a
            larger lr than full fine-tuning, e.g. 1e-4 to 1e-3).
        weight_decay: the adapters' weight decay; ``None`` = the optimizer's.
        save_dir: write ``adapters.safetensors`` + ``adapter_config.json`` here when fit ends (relative = under
            ``trainer.default_root_dir``); :func:`lit_ft.core.adapters.load_adapters` attaches them to a model.
        train_task_head: a sequence-classification model's head trains with the adapters (the verbalizer module
            has no head: its label words are the output embedding's rows).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "bottleneck_adapters"

    def __init__(self, config: str = "pfeiffer", reduction_factor: int = 16, bottleneck: int | None = None,
                 non_linearity: str = "relu", residual: bool = True, init: str = "bert",
                 targets: list[str] | None = None, seed: int = 0, freeze_backbone: bool = True,
                 learning_rate: float | None = None, weight_decay: float | None = None, save_dir: str | None = None,
                 train_task_head: bool = True, picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, train_task_head, picture_every_n_steps)
        owner = type(self).__name__
        self.config = check_choice(owner, "config", config, CONFIGS)
        self.reduction_factor = check_int(owner, "reduction_factor", reduction_factor, 1)
        self.bottleneck = check_int(owner, "bottleneck", bottleneck, 1, allow_none=True,
                                    null_means="hidden size // reduction_factor")
        self.non_linearity = check_choice(owner, "non_linearity", non_linearity, NON_LINEARITIES)
        self.residual = check_bool(owner, "residual", residual)
        self.init = check_choice(owner, "init", init, INITS)
        if self.init == "identity" and not self.residual:
            raise ValueError(f"{owner}: `init='identity'` needs `residual=true` (without the residual the adapter "
                             "replaces the sublayer output, so a zero up-projection would zero it)")
        self.targets = check_str_list(owner, "targets", targets, allow_none=True) or list(CONFIGS[self.config])
        self.seed = check_int(owner, "seed", seed, 0)

    def bottleneck_size(self, width: int) -> int:
        """``m`` for a target of output width ``width``: ``bottleneck`` or ``max(1, width // reduction_factor)``."""
        return self.bottleneck if self.bottleneck is not None else max(1, width // self.reduction_factor)

    def build_adapters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module) -> AdapterSet:
        owner = type(self).__name__
        g = torch.Generator().manual_seed(self.seed)
        hidden = hidden_size_of(hf_model)
        adapters = {}
        for target, module in resolve_targets(hf_model, self.targets, owner).items():
            width = module_width(module, hidden)
            a = BottleneckAdapter(width, self.bottleneck_size(width), self.non_linearity, self.residual, self.init)
            a.reset(g)
            adapters[target] = a
        return AdapterSet(adapters)

    def merge(self) -> None:
        """Refused: ``f(h W_down) W_up`` is not linear in ``h``, so no weight change of the target reproduces it."""
        raise AdapterError(f"{type(self).__name__}: bottleneck adapters cannot be merged into the base weights (the "
                           f"{self.non_linearity} between the projections makes them non-linear); keep them attached, "
                           "or use LinearAdapters for a mergeable adapter")
