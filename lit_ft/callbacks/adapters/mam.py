"""MAM: He et al.'s "mix-and-match" adapter, prefix tuning at attention plus a scaled parallel adapter at the FFN."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_ft.callbacks._adapter import AdapterCallback
from lit_ft.callbacks.adapters._parallel import ARXIV, PAPER, build_parallel_adapters
from lit_ft.core.adapters import AdapterError, AdapterSet, load_adapters, save_adapters
from lit_ft.core.introspect import find_hf_model
from lit_ft.core.parallel_adapter import PA_INITS
from lit_ft.core.prefix import PrefixEncoder
from lit_ft.core.prompts import (
    HOST_ATTR as PROMPT_HOST_ATTR,
    attach_prompt,
    claim_injector,
    install_source,
    model_geometry,
    PromptInjector,
    save_prompt,
    uninstall_source,
)
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_choice, check_int, check_number, check_str_list


def attach_mam(model: nn.Module, directory: str | Path, host: nn.Module | None = None) -> PromptInjector:
    """Install a saved MAM artifact (``adapters.*`` + ``prompt.*`` in ``directory``) on ``model`` (a HF model or a
    module holding one): the parallel adapters are hooked and the prefix is activated. Returns the prompt injector
    (``injector.remove()`` and ``AdapterSet.detach()`` undo it)."""
    load_adapters(model, directory)
    return attach_prompt(model, directory, host=host, name="mam")


@technique(name="mam", family="adapters", paper=PAPER, arxiv=ARXIV)
class MAM(AdapterCallback):
    """MAM adapter: prefix tuning at every attention layer plus a scaled parallel adapter at every FFN block.

    Paper: He, Zhou, Ma, Berg-Kirkpatrick & Neubig, *Towards a Unified View of Parameter-Efficient Transfer
    Learning* (ICLR 2022); authors' code ``jxhe/unify-parameter-efficient-tuning`` (``exps/run_xsum.sh``, "MAM
    adapter"; ``petl/petl_factory.py``: ``Prefix``, ``Adapter_Layer``). The paper's combination of its findings: a
    small prefix modifies attention (``l = 30``, MLP re-parameterisation with ``mid_dim = 800``) and a scaled parallel
    adapter modifies the FFN (``r = 512``, ``s = 4``); backbone frozen, both parts train.

    Algorithm: the prefix is a ``[l, kv]`` table through Linear(kv, mid_dim) -> tanh -> Linear(mid_dim, 2 L kv),
    written into every layer's attention cache before the input (the prompt injector, as PrefixTuning); each FFN
    block ``y = FFN(x)`` becomes ``y + s·(ReLU(x W_down + b_down) W_up + b_up)`` (LoRA-style init: unchanged outputs
    from the FFN part at the start). Not mergeable (the ReLU; a prefix is not a weight): :meth:`merge` refuses. Not
    with gradient checkpointing (the prefix lives in the cache the checkpointed layers drop; the injector refuses).

    Args:
        num_virtual_tokens: prefix length ``l`` (paper: 30).
        mid_dim: hidden size of the prefix's re-parameterisation MLP (paper: 800).
        prefix_init_std: std of the normal initialisation of the prefix's input table (1.0: PyTorch's default for
            an embedding, which the authors' ``Prefix`` keeps); the MLP keeps PyTorch's default initialisation.
        bottleneck: the FFN adapter width ``r`` (paper: 512).
        scale: the FFN adapter's scale ``s`` (paper: 4).
        targets: where the parallel adapters go, in every decoder layer (default ``["mlp"]``: the whole FFN
            block; roles or module paths as in ParallelAdapters).
        init: the parallel adapters' init, ``"lora"`` (the paper's) or ``"bert"``.
        fused: run each FFN block with its adapter as two GEMMs over concatenated weights (same result).
        seed: seed of the initialisation (prefix and adapters).
        freeze_backbone: freeze every model tensor except the prefix and the adapters (and the task head).
        learning_rate: lr of the prefix and the adapters (own param group); ``None`` = the optimizer's (the
            paper's runs: 5e-5 on XSum, 1e-4 on GLUE).
        weight_decay: their weight decay; ``None`` = the optimizer's.
        save_dir: write both parts here when fit ends: ``adapters.safetensors`` + ``adapter_config.json`` and
            ``prompt.safetensors`` + ``prompt_config.json``; :func:`attach_mam` installs them on a model.
        train_task_head: a sequence-classification model's head trains with them.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "mam"
    owned_what = "the prefix and the adapters"

    def __init__(self, num_virtual_tokens: int = 30, mid_dim: int = 800, prefix_init_std: float = 1.0,
                 bottleneck: int = 512, scale: float = 4.0, targets: list[str] | None = None, init: str = "lora",
                 fused: bool = False, seed: int = 0, freeze_backbone: bool = True, learning_rate: float | None = None,
                 weight_decay: float | None = None, save_dir: str | None = None, train_task_head: bool = True,
                 picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, train_task_head, picture_every_n_steps)
        owner = type(self).__name__
        self.num_virtual_tokens = check_int(owner, "num_virtual_tokens", num_virtual_tokens, 1)
        self.mid_dim = check_int(owner, "mid_dim", mid_dim, 1)
        self.prefix_init_std = check_number(owner, "prefix_init_std", prefix_init_std, low=0, low_open=True)
        self.bottleneck = check_int(owner, "bottleneck", bottleneck, 1)
        self.scale = check_number(owner, "scale", scale, low=0, low_open=True)
        self.targets = check_str_list(owner, "targets", targets, allow_none=True) or ["mlp"]
        self.init = check_choice(owner, "init", init, PA_INITS)
        self.fused = check_bool(owner, "fused", fused)
        self.seed = check_int(owner, "seed", seed, 0)
        self.prefix: PrefixEncoder | None = None
        self.injector: PromptInjector | None = None

    # -- the FFN part (the adapter base installs it) ---------------------------------------------------------------
    def build_adapters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module) -> AdapterSet:
        return build_parallel_adapters(hf_model, self.targets, self.bottleneck, self.scale, self.init, self.seed,
                                       self.fused, type(self).__name__)

    # -- the attention part (the prompt injector runs it) ----------------------------------------------------------
    def build_prefix(self, hf_model: nn.Module) -> PrefixEncoder:
        src = PrefixEncoder(model_geometry(hf_model), self.num_virtual_tokens, self.mid_dim)
        # its own stream (seed + 1), so the adapters' draws do not depend on the prefix's size
        g = torch.Generator().manual_seed(self.seed + 1)
        with torch.no_grad():
            src.embedding.weight.copy_(torch.randn(src.embedding.weight.shape, generator=g) * self.prefix_init_std)
        return src

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        owner = type(self).__name__
        hf = find_hf_model(pl_module)
        inj = claim_injector(hf, owner, self.prefix, "MAM brings its own prefix: use one prompt per model")
        super().install(trainer, pl_module)  # the parallel adapters (refuses a second MAM on the model)
        prefix = self.build_prefix(hf)
        install_source(pl_module, self.technique_name, prefix, inj, hf)
        self.prefix, self.injector = prefix, inj
        n = sum(p.numel() for p in prefix.parameters())
        rank_zero_info(f"{owner}: prefix of {self.num_virtual_tokens} virtual tokens at every attention layer "
                       f"({n:,} parameters, MLP re-parameterisation {self.mid_dim} wide)")

    def remove(self) -> None:
        """Take the prefix and the adapters out of the model."""
        uninstall_source(self._host, self.technique_name, self.injector)
        self.prefix = self.injector = None
        super().remove()

    def owned_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        prefix = f"{PROMPT_HOST_ATTR}.{self.technique_name}."
        return super().owned_param_names(pl_module) + [n for n, _ in pl_module.named_parameters()
                                                        if n.startswith(prefix)]

    def merge(self) -> None:
        """Refused: neither part folds into the base weights (the adapter's ReLU; the prefix is extra keys/values)."""
        raise AdapterError("MAM.merge: MAM cannot be merged into the base weights (the parallel adapter's ReLU is not "
                           "linear, and the prefix adds attention keys/values); save it with save_dir and install it "
                           "with lit_ft.callbacks.adapters.mam.attach_mam")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.save_dir and self.adapters is not None and self.prefix is not None and trainer.is_global_zero:
            out = self.resolved_save_dir(trainer)
            meta = self.artifact_metadata(pl_module)
            save_adapters(self.adapters, out, metadata=meta)
            # peft=False: a PEFT prefix adapter alone would not reproduce MAM (and its adapter_config.json would
            # overwrite the adapters' config of the same name)
            save_prompt(self.prefix, out, metadata=meta, peft=False)
            rank_zero_info(f"{type(self).__name__}: prefix and adapters saved to {out}")
