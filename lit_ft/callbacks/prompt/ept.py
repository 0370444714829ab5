"""EPT: efficient prompt tuning by multi-space projection and prompt fusion (Lan et al., 2024) — DePT's decomposition
plus a small generator that turns the short prompt into the injected one."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lit_ft.callbacks._prompt import check_optional_lr
from lit_ft.core.registry import technique
from lit_ft.callbacks.prompt.dept import (
    DEFAULT_LEARNING_RATE,
    DEFAULT_LOWRANK_LEARNING_RATE,
    DEFAULT_MAX_LENGTH,
    DEFAULT_WEIGHT_DECAY,
    DePT,
    DePTEmbedding,
)
from lit_ft.core.prompts import ModelGeometry, PromptError, PromptInputs
from lit_ft.core.validate import check_choice, check_int

FUSIONS = ("lowrank", "joint", "none")


class EPTEmbedding(DePTEmbedding):
    """DePT's tensors (``embedding.weight`` = ``P``, ``lora_embedding_A/B``) plus the prompt generator.

    The injected prompt is computed once per forward as ``[m, D]`` (input-independent; the injector broadcasts it):

    1. *prompt fusion* (``fusion != "none"``): ``P_f = P + softmax(Q K^T / sqrt(d)) V W_o`` with ``Q = P W_q`` and
       keys/values ``M W_k``, ``M W_v`` over the memory ``M`` = the low-rank table ``s A B`` ``[S, D]``
       (``"lowrank"``) or ``[P; s A B]`` (``"joint"``); one head of width ``d = fusion_dim``.
    2. *multi-space projection*: ``P_hat = sum_i g_i * P_f W_i`` with ``g = softmax(P_f W_g + b_g)`` per prompt
       token over ``K = num_subspaces`` spaces and ``W_i = I + U_i V_i`` (``U_i`` ``[D, q]``, ``V_i`` ``[q, D]``,
       ``q = projection_rank``). Because ``sum_i g_i = 1``: ``P_hat = P_f + ((P_f [U_1..U_K]) * g) [V_1; ..; V_K]``,
       two GEMMs for all ``K`` spaces.

    Initialisation makes step 0 identical to DePT: ``V_i = 0`` (every ``W_i = I``) and ``W_o = 0`` (fusion adds
    zero; with ``B = 0`` the low-rank memory is zero as well), so ``P_hat = P`` exactly.
    """

    def __init__(self, geometry: ModelGeometry, num_virtual_tokens: int = 40, max_length: int = DEFAULT_MAX_LENGTH,
                 rank: int = 8, lora_alpha: float = 8.0, rank_scaling: str = "sqrt", num_subspaces: int = 4,
                 projection_rank: int = 8, fusion: str = "lowrank", fusion_dim: int = 32, init_seed: int = 0) -> None:
        super().__init__(geometry, num_virtual_tokens, max_length, rank, lora_alpha, rank_scaling, init_seed)
        owner = type(self).__name__
        D = geometry.hidden_size
        for name, v, hi in (("num_subspaces", num_subspaces, None), ("projection_rank", projection_rank, D),
                            ("fusion_dim", fusion_dim, None)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1 or (hi is not None and v > hi):
                raise PromptError(f"{owner}: {name} must be an int in [1, {hi or 'inf'}], got {v!r}")
        if fusion not in FUSIONS:
            raise PromptError(f"{owner}: fusion must be one of {FUSIONS}, got {fusion!r}")
        self.num_subspaces, self.projection_rank, self.fusion, self.fusion_dim = \
            num_subspaces, projection_rank, fusion, fusion_dim
        K, q = num_subspaces, projection_rank
        self.gate = nn.Linear(D, K)
        self.proj_down = nn.Parameter(torch.zeros(K, D, q))  # U_i
        self.proj_up = nn.Parameter(torch.zeros(K, q, D))  # V_i
        if fusion != "none":
            self.fusion_q = nn.Linear(D, fusion_dim, bias=False)
            self.fusion_k = nn.Linear(D, fusion_dim, bias=False)
            self.fusion_v = nn.Linear(D, fusion_dim, bias=False)
            self.fusion_out = nn.Linear(fusion_dim, D, bias=False)
        self.reset_generator(torch.Generator().manual_seed(init_seed + 1))

    @torch.no_grad()
    def reset_generator(self, generator: torch.Generator | None = None) -> None:
        """Input-side weights ~ U(+-1/sqrt(D)) (``nn.Linear``'s default bound), ``V_i = 0``, ``W_o = 0``, gate bias 0."""
        bound = 1.0 / math.sqrt(self.geometry.hidden_size)
        for t in (self.gate.weight, self.proj_down):
            t.uniform_(-bound, bound, generator=generator)
        self.gate.bias.zero_()
        self.proj_up.zero_()
        if self.fusion != "none":
            for lin in (self.fusion_q, self.fusion_k, self.fusion_v):
                lin.weight.uniform_(-bound, bound, generator=generator)
            self.fusion_out.weight.zero_()

    def fused_prompt(self, prompt: torch.Tensor) -> torch.Tensor:
        """Step 1: ``P + Attn(P W_q, M W_k, M W_v) W_o`` (``prompt`` returned as is for ``fusion="none"``)."""
        if self.fusion == "none":
            return prompt
        table = self.lowrank_table()
        memory = table if self.fusion == "lowrank" else torch.cat([prompt, table], dim=0)
        q, k, v = self.fusion_q(prompt), self.fusion_k(memory), self.fusion_v(memory)
        att = torch.softmax((q @ k.T) / math.sqrt(self.fusion_dim), dim=-1)
        return prompt + self.fusion_out(att @ v)

    def gates(self, prompt: torch.Tensor) -> torch.Tensor:
        """``[m, K]`` per-token softmax over the subspaces."""
        return torch.softmax(self.gate(prompt), dim=-1)

    def project(self, prompt: torch.Tensor) -> torch.Tensor:
        """Step 2: ``sum_i g_i P W_i`` with ``W_i = I + U_i V_i``, batched over the ``K`` spaces."""
        m, D = prompt.shape
        K, q = self.num_subspaces, self.projection_rank
        down = prompt @ self.proj_down.permute(1, 0, 2).reshape(D, K * q)  # [m, K*q]: P U_i for every i
        down = (down.view(m, K, q) * self.gates(prompt).unsqueeze(-1)).reshape(m, K * q)
        return prompt + down @ self.proj_up.reshape(K * q, D)

    def generated_prompt(self) -> torch.Tensor:
        """``P_hat`` ``[m, D]``."""
        return self.project(self.fused_prompt(self.embedding.weight))

    def prompt_embeddings(self, inputs: PromptInputs) -> torch.Tensor:
        return self.generated_prompt()

    def artifact_config(self) -> dict[str, Any]:
        return {**super().artifact_config(), "num_subspaces": self.num_subspaces,
                "projection_rank": self.projection_rank, "fusion": self.fusion, "fusion_dim": self.fusion_dim}


@technique(name="ept", family="prompt",
           paper="Efficient Prompt Tuning by Multi-Space Projection and Prompt Fusion", arxiv="2405.11464")
class EPT(DePT):
    """EPT: DePT's short prompt + position-indexed low-rank embedding update, with the prompt passed through prompt
    fusion and a gated multi-space projection before it is prepended.

    Paper: Lan et al., *Efficient Prompt Tuning by Multi-Space Projection and Prompt Fusion* (2024; no public code).
    Algorithm (see :class:`EPTEmbedding` for the exact formulas): the low-rank update ``s A[pos] B`` of the input
    embeddings is DePT's; the prompt ``P`` first absorbs the low-rank knowledge by one attention step
    (``P + Attn(P, sAB, sAB)``), then ``K`` projections ``W_i = I + U_i V_i`` of it are mixed per token by a softmax
    gate. The prompt is input-independent: it is computed once per forward and broadcast over the batch.

    What the paper's abstract and summaries leave open (each is an argument here, with lit-ft's reading as the
    default): the Q/K/V assignment of the fusion (``fusion``), its width (``fusion_dim``), the number of subspaces
    (``num_subspaces``) and the form of each projection (a full ``D x D`` matrix is ``projection_rank = D``; the
    default is a rank-8 correction of the identity). At initialisation EPT equals DePT with the same ``seed``
    (``V_i = 0``, ``W_o = 0``).

    The arguments ``num_virtual_tokens``, ``rank``, ``match_prompt_tokens``, ``max_length``, ``lora_alpha``,
    ``rank_scaling``, ``init``, ``init_text``, ``seed``, ``freeze_backbone``, ``learning_rate``,
    ``lowrank_learning_rate``, ``weight_decay``, ``save_dir`` and ``tokenizer`` are as in :class:`DePT`
    (``match_prompt_tokens`` budgets ``P``, ``A`` and ``B`` only, not the generator). EPT has no released code and its
    learning rates could not be read, so the defaults are DePT's (EPT builds on DePT's decomposition): prompt 3e-1,
    ``A, B`` 5e-3, weight decay 1e-5.

    Args:
        num_subspaces: ``K`` projections mixed by the gate (>= 1).
        projection_rank: rank ``q`` of each ``W_i - I`` (1..hidden size).
        fusion: ``"lowrank"`` (default: the prompt attends over the rows of ``s A B``), ``"joint"`` (over ``[P; s A
            B]``) or ``"none"`` (no fusion step).
        fusion_dim: width of the fusion attention's queries/keys/values.
        generator_learning_rate: lr of the generator (gate, ``U``, ``V``, fusion projections); ``None`` = that of
            ``A, B`` (``lowrank_learning_rate``).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "ept"
    source_class = EPTEmbedding

    def __init__(self, num_virtual_tokens: int = 40, rank: int | None = None, match_prompt_tokens: int | None = 100,
                 max_length: int | None = None, lora_alpha: float = 8.0, rank_scaling: str = "sqrt",
                 num_subspaces: int = 4, projection_rank: int = 8, fusion: str = "lowrank", fusion_dim: int = 32,
                 init: str = "vocab", init_text: str | None = None, seed: int = 0, freeze_backbone: bool = True,
                 learning_rate: float | None = DEFAULT_LEARNING_RATE,
                 lowrank_learning_rate: float | None = DEFAULT_LOWRANK_LEARNING_RATE,
                 generator_learning_rate: float | None = None, weight_decay: float | None = DEFAULT_WEIGHT_DECAY,
                 save_dir: str | None = None, tokenizer: str | None = None, picture_every_n_steps: int = 0) -> None:
        super().__init__(num_virtual_tokens, rank, match_prompt_tokens, max_length, lora_alpha, rank_scaling, init,
                         init_text, seed, freeze_backbone, learning_rate, lowrank_learning_rate, weight_decay, save_dir,
                         tokenizer, picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        self.num_subspaces = check_int(owner, "num_subspaces", num_subspaces, minimum=1)
        self.projection_rank = check_int(owner, "projection_rank", projection_rank, minimum=1)
        self.fusion_dim = check_int(owner, "fusion_dim", fusion_dim, minimum=1)
        self.fusion = check_choice(owner, "fusion", fusion, FUSIONS)
        self.generator_learning_rate = check_optional_lr(generator_learning_rate, "generator_learning_rate", owner)

    def source_kwargs(self, geometry: ModelGeometry, max_length: int, rank: int) -> dict[str, Any]:
        if self.projection_rank > geometry.hidden_size:
            raise PromptError(f"EPT: `projection_rank` ({self.projection_rank}) must be <= the hidden size "
                              f"({geometry.hidden_size})")
        return {**super().source_kwargs(geometry, max_length, rank), "num_subspaces": self.num_subspaces,
                "projection_rank": self.projection_rank, "fusion": self.fusion, "fusion_dim": self.fusion_dim}

    def generator_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        low = set(self.lowrank_param_names(pl_module))
        return [n for n in self.source_param_names(pl_module) if n not in low and not n.endswith(".embedding.weight")]

    def group_lrs(self, pl_module: pl.LightningModule) -> dict[str, float | None]:
        lrs = super().group_lrs(pl_module)
        gen_lr = self.generator_learning_rate if self.generator_learning_rate is not None else self.lowrank_learning_rate
        for n in self.generator_param_names(pl_module):
            lrs[n] = gen_lr
        return lrs
