"""PrefixTuning: trainable per-layer key/value prefixes (Li & Liang, 2021; P-tuning v2)."""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import nn

from lit_ft.callbacks._prompt import PromptCallback
from lit_ft.core.registry import technique
from lit_ft.core.prompts import ModelGeometry, PromptError, PromptInputs, PromptSource
from lit_ft.core.validate import check_int, check_number

#: the prefix's lr: P-tuning v2's recipe for a directly trained prefix (run_rte_roberta.sh, lr 5e-3)
DEFAULT_LEARNING_RATE = 5e-3


class PrefixEncoder(PromptSource):
    """Per-layer key/value prefixes, laid out like PEFT's ``PrefixEncoder`` (so its tensors load one to one).

    Without projection: ``embedding.weight`` ``[n, 2 L kv]``. With projection (``projection_hidden_size > 0``):
    ``embedding`` ``[n, kv]`` -> ``transform`` = Linear(kv, h) -> tanh -> Linear(h, 2 L kv). The ``[n, 2L, H_kv, d_h]``
    result is split so layer ``l`` gets keys ``[:, 2l]`` and values ``[:, 2l + 1]`` (PEFT's permute/split order).
    """

    kind = "prefix"

    def __init__(self, geometry: ModelGeometry, num_virtual_tokens: int = 20, projection_hidden_size: int = 0) -> None:
        super().__init__(geometry, num_virtual_tokens)
        if isinstance(projection_hidden_size, bool) or not isinstance(projection_hidden_size, int) or projection_hidden_size < 0:
            raise PromptError(f"PrefixEncoder: projection_hidden_size must be an int >= 0, got {projection_hidden_size!r}")
        self.projection_hidden_size = projection_hidden_size
        out = 2 * geometry.num_layers * geometry.kv_dim
        if projection_hidden_size:
            # PEFT's token_dim is the key/value width (num_kv_heads * head_dim), not the hidden size
            self.embedding = nn.Embedding(num_virtual_tokens, geometry.kv_dim)
            self.transform = nn.Sequential(
                nn.Linear(geometry.kv_dim, projection_hidden_size), nn.Tanh(), nn.Linear(projection_hidden_size, out)
            )
        else:
            self.embedding = nn.Embedding(num_virtual_tokens, out)

    def flat_key_values(self) -> torch.Tensor:
        """``[n, 2 L kv]``"""
        x = self.embedding.weight
        return self.transform(x) if self.projection_hidden_size else x

    def prefix_key_values(self, inputs: PromptInputs) -> list[tuple[torch.Tensor, torch.Tensor]]:
        g = self.geometry
        n = self.num_virtual_tokens
        kv = self.flat_key_values().view(n, 2 * g.num_layers, g.num_kv_heads, g.head_dim).permute(1, 2, 0, 3)
        return [(kv[2 * i].unsqueeze(0), kv[2 * i + 1].unsqueeze(0)) for i in range(g.num_layers)]

    def artifact_config(self) -> dict:
        return {"num_virtual_tokens": self.num_virtual_tokens, "projection_hidden_size": self.projection_hidden_size}

    def peft_export(self) -> tuple[str, dict[str, torch.Tensor], dict]:
        """PEFT ``PREFIX_TUNING``: the ``[n, 2 L kv]`` table (computed through the MLP when there is one, as PEFT's
        ``save_pretrained`` does), loadable with ``prefix_projection`` off."""
        with torch.no_grad():
            table = self.flat_key_values()
        return "PREFIX_TUNING", {"prompt_embeddings": table}, {"prefix_projection": False}


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
