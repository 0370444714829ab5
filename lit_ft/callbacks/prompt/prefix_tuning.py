"""PrefixTuning: trainable per-layer key/value prefixes (Li & Liang, 2021; P-tuning v2)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lit_ft.callbacks._prompt import PromptCallback
from lit_ft.core.registry import technique
# PrefixEncoder lived here until MAM (adapters family) shared it; re-exported so existing imports keep working
from lit_ft.core.prefix import PrefixEncoder  # noqa: F401
from lit_ft.core.prompts import ModelGeometry
from lit_ft.core.validate import check_int, check_number

#: the prefix's lr: P-tuning v2's recipe for a directly trained prefix (run_rte_roberta.sh, lr 5e-3)
DEFAULT_LEARNING_RATE = 5e-3


@technique(name="prefix_tuning", family="prompt",
           paper="Prefix-Tuning: Optimizing Continuous Prompts for Generation",
           arxiv="2101.00190")
class PrefixTuning(PromptCallback):
    """Prefix tuning: every attention layer attends to ``n`` trainable key/value vectors before the input.

    Paper: Li & Liang, *Prefix-Tuning: Optimizing Continuous Prompts for Generation* (ACL 2021); the same deep
    prompts as P-tuning v2 (Liu et al., 2022). Behaviour and tensor layout match HF PEFT's ``PREFIX_TUNING``
    (tested: same outputs from the same tensors).

    Algorithm: the prefix keys/values are written into the attention cache before the input is processed
    (``attention_mask`` gets ``n`` leading ones, the tokens' positions start at ``n``); decoding continues from that
    cache, so ``generate()`` pays for the prefix once. The optional MLP re-parameterisation (Li & Liang's trick for
    stable training) computes the prefix from a smaller ``[n, kv]`` table (``kv`` = key/value width).

    Args:
        num_virtual_tokens: prefix length ``n`` (>= 1).
        projection_hidden_size: hidden size ``h`` of the re-parameterisation MLP; 0 (default) = train the
            ``[n, 2 L kv]`` table directly.
        init_std: std of the normal initialisation of the table (and of the MLP's input table).
        seed: seed of the initialisation.
        learning_rate: the prefix's lr (own param group). Default 5e-3, P-tuning v2's (``THUDM/P-tuning-v2``,
            ``run_script/run_rte_roberta.sh``: AdamW, a directly trained prefix as with ``projection_hidden_size=0``).
            Li & Liang's own 5e-5 goes with their MLP re-parameterisation and GPT-2 / BART; with a projection, pass
            a smaller rate. ``None`` = the optimizer's.
        freeze_backbone: as in :class:`PromptTuning`.
        weight_decay: as in :class:`PromptTuning`.
        save_dir: as in :class:`PromptTuning`.
        tokenizer: as in :class:`PromptTuning`.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "prefix_tuning"
    exports_peft = True

    def __init__(self, num_virtual_tokens: int = 20, projection_hidden_size: int = 0, init_std: float = 0.02,
                 seed: int = 0, freeze_backbone: bool = True, learning_rate: float | None = DEFAULT_LEARNING_RATE,
                 weight_decay: float | None = None, save_dir: str | None = None, tokenizer: str | None = None,
                 picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, tokenizer,
                         picture_every_n_steps=picture_every_n_steps)
        self.num_virtual_tokens = check_int("PrefixTuning", "num_virtual_tokens", num_virtual_tokens, minimum=1)
        self.projection_hidden_size = check_int("PrefixTuning", "projection_hidden_size", projection_hidden_size,
                                                minimum=0)
        self.init_std = check_number("PrefixTuning", "init_std", init_std, low=0, low_open=True)
        self.seed = check_int("PrefixTuning", "seed", seed)

    def build_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module,
                     geometry: ModelGeometry) -> PrefixEncoder:
        src = PrefixEncoder(geometry, self.num_virtual_tokens, self.projection_hidden_size)
        g = torch.Generator().manual_seed(self.seed)
        with torch.no_grad():
            src.embedding.weight.copy_(torch.randn(src.embedding.weight.shape, generator=g) * self.init_std)
        return src
