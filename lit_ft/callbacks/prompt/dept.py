"""DePT: decomposed prompt tuning (Shi & Lipani, ICLR 2024) — a short soft prompt plus a position-indexed low-rank
update of the frozen input embeddings, trained with two learning rates."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_ft.callbacks._prompt import PromptCallback, check_optional_lr
from lit_ft.core.registry import technique
from lit_ft.callbacks.prompt.prompt_tuning import INITS, PromptEmbedding, build_prompt_embedding
from lit_ft.core.prompts import ModelGeometry, PromptError
from lit_ft.core.validate import check_choice, check_int, check_number, check_str
from lit_ft.kernels.prompt_embed import prompt_embed

RANK_SCALINGS = ("sqrt", "linear")
#: DePT's padded input length (``max_length`` of the authors' ``PromptTuningLoRAConfig`` and ``train.py``)
DEFAULT_MAX_LENGTH = 256
#: the authors' README grid: prompt lr in {3e-1, 4e-1}, low-rank lr (``--lora_embedding_lr``) in {5e-3, 3e-1, 5e-4},
#: ``--weight_decay 1e-5``; the defaults are the first value of each grid
DEFAULT_LEARNING_RATE = 3e-1
DEFAULT_LOWRANK_LEARNING_RATE = 5e-3
DEFAULT_WEIGHT_DECAY = 1e-5


def lowrank_scale(lora_alpha: float, rank: int, rank_scaling: str) -> float:
    """``alpha / sqrt(r)`` (``"sqrt"``, DePT's code) or ``alpha / r`` (``"linear"``, LoRA's convention)."""
    return float(lora_alpha) / (math.sqrt(rank) if rank_scaling == "sqrt" else rank)


def positional_lowrank_delta(position_ids: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """``[B, T, D]``: ``scale * lora_a[pos] @ lora_b`` for ``0 <= pos < S`` (``S = lora_a.shape[0]``), zero elsewhere."""
    S = lora_a.shape[0]
    valid = (position_ids >= 0) & (position_ids < S)
    rows = lora_a[position_ids.clamp(0, S - 1)] * valid.unsqueeze(-1).to(lora_a.dtype)
    return (rows @ lora_b) * scale


def _plain_embedding(embedding: nn.Module) -> bool:
    """A bare ``nn.Embedding`` lookup (no subclass forward such as Gemma's scaled embeddings, no PEFT wrapper,
    no ``max_norm`` renormalisation) whose table is frozen here: its output is exactly ``weight[ids]`` and the fused
    op (which never computes a gradient for the table) applies."""
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        return False
    return not (embedding.weight.requires_grad and torch.is_grad_enabled())


class DePTEmbedding(PromptEmbedding):
    """DePT's trainable tensors: the short prompt ``embedding.weight`` ``[m, D]`` (prepended, as in
    :class:`PromptEmbedding`) and the low-rank pair ``lora_embedding_A`` ``[S, r]`` / ``lora_embedding_B`` ``[r, D]``
    (named as in the authors' code) whose product updates the frozen embedding of the token at position ``p``:
    ``x'_p = E[x_p] + s * A[p] B`` for ``p < S`` (``S = max_length``, ``s`` = :func:`lowrank_scale`).

    ``A`` starts kaiming-uniform(a=sqrt(5)) and ``B`` at zero (so the update starts at zero), drawn from
    ``init_seed``; a checkpoint or artifact overwrites them.
    """

    kind = "embeddings"

    def __init__(self, geometry: ModelGeometry, num_virtual_tokens: int = 40, max_length: int = DEFAULT_MAX_LENGTH,
                 rank: int = 8, lora_alpha: float = 8.0, rank_scaling: str = "sqrt", init_seed: int = 0) -> None:
        super().__init__(geometry, num_virtual_tokens)
        owner = type(self).__name__
        for name, v in (("max_length", max_length), ("rank", rank)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise PromptError(f"{owner}: {name} must be an int >= 1, got {v!r}")
        if rank_scaling not in RANK_SCALINGS:
            raise PromptError(f"{owner}: rank_scaling must be one of {RANK_SCALINGS}, got {rank_scaling!r}")
        self.max_length, self.rank, self.lora_alpha, self.rank_scaling = max_length, rank, float(lora_alpha), rank_scaling
        self.scale = lowrank_scale(lora_alpha, rank, rank_scaling)
        self.lora_embedding_A = nn.Parameter(torch.zeros(max_length, rank))
        self.lora_embedding_B = nn.Parameter(torch.zeros(rank, geometry.hidden_size))
        self.reset_lowrank(torch.Generator().manual_seed(init_seed))

    @torch.no_grad()
    def reset_lowrank(self, generator: torch.Generator | None = None) -> None:
        """``A`` ~ kaiming-uniform(a=sqrt(5)) (bound ``1/sqrt(r)``), ``B = 0`` (DePT's ``init_lora_weights``)."""
        nn.init.kaiming_uniform_(self.lora_embedding_A, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_embedding_B)

    def lowrank_delta(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``[B, T, D]`` update of the tokens at ``position_ids`` (zero at positions ``>= max_length``)."""
        return positional_lowrank_delta(position_ids, self.lora_embedding_A, self.lora_embedding_B, self.scale)

    def lowrank_table(self) -> torch.Tensor:
        """``s * A B`` ``[S, D]``: the update of every position (EPT's prompt fusion attends over it)."""
        return (self.lora_embedding_A @ self.lora_embedding_B) * self.scale

    def transform_input_embeddings(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                                   position_ids: torch.Tensor, embedding: nn.Module) -> torch.Tensor:
        T = position_ids.shape[-1]
        if embedding.training and T > self.max_length:  # the model's mode (the source may be attached later)
            raise PromptError(
                f"{type(self).__name__}: a training sequence of {T} tokens is longer than max_length="
                f"{self.max_length} (the rows of the position-indexed low-rank update); raise max_length or "
                "truncate the data to it."
            )
        if inputs_embeds is None and _plain_embedding(embedding):
            # fused gather + low-rank add: no [B, T, D] delta, backward reduced per position
            return prompt_embed(input_ids, embedding.weight, position_ids, self.lora_embedding_A,
                                self.lora_embedding_B, self.scale)
        # the caller's inputs_embeds (or a non-plain embedding layer): add the update to them, summed in fp32 as
        # the op does
        x = inputs_embeds if inputs_embeds is not None else embedding(input_ids)
        delta = self.lowrank_delta(position_ids)
        cd = torch.promote_types(x.dtype, delta.dtype)
        return (x.to(cd) + delta.to(cd)).to(x.dtype)

    def artifact_config(self) -> dict[str, Any]:
        return {"num_virtual_tokens": self.num_virtual_tokens, "max_length": self.max_length, "rank": self.rank,
                "lora_alpha": self.lora_alpha, "rank_scaling": self.rank_scaling}


def rank_for_budget(match_prompt_tokens: int, num_virtual_tokens: int, max_length: int, hidden_size: int,
                    owner: str = "DePT") -> int:
    """Largest ``r`` with ``m*D + r*(S + D) <= match_prompt_tokens * D`` (DePT's equal-budget rule)."""
    r = (match_prompt_tokens - num_virtual_tokens) * hidden_size // (max_length + hidden_size)
    if r < 1:
        raise PromptError(
            f"{owner}: match_prompt_tokens={match_prompt_tokens} leaves no room for a rank >= 1 next to "
            f"num_virtual_tokens={num_virtual_tokens} (max_length={max_length}, hidden size {hidden_size}); raise "
            "match_prompt_tokens, shorten the prompt, or give `rank` directly."
        )
    return r


@technique(name="dept", family="prompt",
           paper="DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning", arxiv="2309.05173")
class DePT(PromptCallback):
    """Decomposed prompt tuning: a short soft prompt plus a low-rank, position-indexed update of the input embeddings.

    Paper: Shi & Lipani, *DePT: Decomposed Prompt Tuning for Parameter-Efficient Fine-tuning* (ICLR 2024); code
    ``ZhengxiangShi/DePT`` (``peft/tuners/prompt_tuning_lora.py``, ``peft/peft_model.py``, ``train.py``).

    Algorithm: the trunk receives ``[P; E[x] + s * A[pos] B]`` where ``P`` ``[m, D]`` is the prompt, ``E`` the frozen
    embedding table, ``A`` ``[max_length, r]``, ``B`` ``[r, D]``, ``s = lora_alpha / sqrt(r)``. ``P`` and ``(A, B)``
    train with two learning rates. With ``match_prompt_tokens = N`` the rank is chosen so that
    ``m*D + r*(max_length + D) <= N*D``: the parameter count of a vanilla ``N``-token prompt, with a shorter (cheaper)
    input sequence.

    Deviation from the authors' code: the update is indexed by each token's *position id* (its position among the
    real tokens), not by its padded column. DePT pads every input to ``max_length`` (decoders on the left), so its
    row ``t`` means "column ``t`` of a padded sequence"; here right-padded training and left-padded generation give a
    token the same row. The authors add nothing to generated tokens; here a generated token at position ``p <
    max_length`` gets row ``p`` like any other token. Tokens at positions ``>= max_length`` get no update (outside
    training: evaluation and generation past ``max_length`` work, with the plain embeddings there); a *training*
    batch longer than ``max_length`` is an error.

    Args:
        num_virtual_tokens: prompt length ``m`` (>= 1); the paper uses 40 or 60 (vs 100 for vanilla PT).
        rank: rank ``r`` of ``A B``; ``None`` (default) = derive it from ``match_prompt_tokens``. A given rank wins
            over ``match_prompt_tokens``.
        match_prompt_tokens: parameter budget in prompt tokens (the paper: 100); used when ``rank`` is ``None``.
            The chosen rank is logged and kept in ``self.chosen_rank`` after setup.
        max_length: rows of ``A`` = the longest position that gets an update; ``None`` (default) = the DataModule's
            ``max_length``, else 256 (the paper's).
        lora_alpha: ``alpha`` of the scale (the code's default 8).
        rank_scaling: ``"sqrt"`` (``s = alpha/sqrt(r)``, the authors' code) or ``"linear"`` (``s = alpha/r``, LoRA's).
        init: prompt initialisation as in :class:`PromptTuning` (``"vocab"`` default, ``"text"``, ``"random"``); the
            authors initialise from a task text (their default ``"Classify this text is postive or not:"``).
        init_text: the text for ``init="text"``.
        seed: seed of the prompt and of ``A``'s initialisation.
        freeze_backbone: freeze every model tensor except DePT's (default true).
        learning_rate: the prompt's lr (own param group). Default 3e-1, the first of the authors' grid {3e-1, 4e-1}
            (``ZhengxiangShi/DePT`` README). ``None`` = the optimizer's.
        lowrank_learning_rate: lr of ``A`` and ``B`` (own param group). Default 5e-3, the first of the authors' grid
            {5e-3, 3e-1, 5e-4} (``--lora_embedding_lr``; they search it per task). ``None`` = the optimizer's.
        weight_decay: weight decay of all DePT tensors. Default 1e-5 (the authors' ``--weight_decay``); ``None`` =
            the optimizer's.
        save_dir: write ``prompt.safetensors`` + ``prompt_config.json`` here when fit ends.
        tokenizer: tokenizer for ``init="text"`` when the DataModule has none.
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "dept"
    #: the source class this callback builds (EPT swaps in its own)
    source_class: type[DePTEmbedding] = DePTEmbedding

    def __init__(self, num_virtual_tokens: int = 40, rank: int | None = None, match_prompt_tokens: int | None = 100,
                 max_length: int | None = None, lora_alpha: float = 8.0, rank_scaling: str = "sqrt",
                 init: str = "vocab", init_text: str | None = None, seed: int = 0, freeze_backbone: bool = True,
                 learning_rate: float | None = DEFAULT_LEARNING_RATE,
                 lowrank_learning_rate: float | None = DEFAULT_LOWRANK_LEARNING_RATE,
                 weight_decay: float | None = DEFAULT_WEIGHT_DECAY, save_dir: str | None = None,
                 tokenizer: str | None = None, picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, tokenizer,
                         picture_every_n_steps=picture_every_n_steps)
        owner = type(self).__name__
        self.num_virtual_tokens = check_int(owner, "num_virtual_tokens", num_virtual_tokens, minimum=1)
        self.rank = check_int(owner, "rank", rank, minimum=1, allow_none=True)
        self.match_prompt_tokens = check_int(owner, "match_prompt_tokens", match_prompt_tokens, minimum=2,
                                             allow_none=True)
        if self.rank is None and self.match_prompt_tokens is None:
            raise ValueError(f"{owner}: give `rank` or `match_prompt_tokens` (both are null)")
        if self.rank is None and self.match_prompt_tokens <= self.num_virtual_tokens:
            raise ValueError(f"{owner}: `match_prompt_tokens` ({match_prompt_tokens}) must exceed "
                             f"`num_virtual_tokens` ({num_virtual_tokens}): the low-rank pair takes the difference")
        self.max_length = check_int(owner, "max_length", max_length, minimum=1, allow_none=True)
        self.lora_alpha = check_number(owner, "lora_alpha", lora_alpha, low=0, low_open=True)
        self.rank_scaling = check_choice(owner, "rank_scaling", rank_scaling, RANK_SCALINGS)
        check_choice(owner, "init", init, INITS)
        check_str(owner, "init_text", init_text, allow_none=True)
        if init == "text" and not init_text:
            raise ValueError(f"{owner}: init='text' needs `init_text` (the words whose embeddings start the prompt)")
        self.init, self.init_text, self.seed = init, init_text, check_int(owner, "seed", seed)
        self.lowrank_learning_rate = check_optional_lr(lowrank_learning_rate, "lowrank_learning_rate", owner)
        self.chosen_rank: int | None = None  # the rank in use, set when the source is built

    # -- building ----------------------------------------------------------------------------------------------
    def resolved_max_length(self, trainer: pl.Trainer | None) -> int:
        if self.max_length is not None:
            return self.max_length
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        ml = getattr(dm, "max_length", None)
        return ml if isinstance(ml, int) and not isinstance(ml, bool) and ml >= 1 else DEFAULT_MAX_LENGTH

    def source_kwargs(self, geometry: ModelGeometry, max_length: int, rank: int) -> dict[str, Any]:
        """Constructor arguments of :attr:`source_class` (EPT adds its own)."""
        return {"num_virtual_tokens": self.num_virtual_tokens, "max_length": max_length, "rank": rank,
                "lora_alpha": self.lora_alpha, "rank_scaling": self.rank_scaling, "init_seed": self.seed}

    def build_source(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module,
                     geometry: ModelGeometry) -> DePTEmbedding:
        owner = type(self).__name__
        S = self.resolved_max_length(trainer)
        limit = getattr(getattr(hf_model, "config", None), "max_position_embeddings", None)
        if limit is not None and self.num_virtual_tokens >= limit:
            raise PromptError(f"{owner}: num_virtual_tokens={self.num_virtual_tokens} leaves no room for input in the "
                              f"model's context (max_position_embeddings={limit})")
        rank = self.rank if self.rank is not None else rank_for_budget(
            self.match_prompt_tokens, self.num_virtual_tokens, S, geometry.hidden_size, owner)
        source = self.source_class(geometry, **self.source_kwargs(geometry, S, rank))
        prompt = build_prompt_embedding(self, trainer, hf_model, geometry)  # PromptTuning's init (vocab/text/random)
        source.embedding.load_state_dict(prompt.embedding.state_dict())
        self.chosen_rank = rank
        budget = source.embedding.weight.numel() + source.lora_embedding_A.numel() + source.lora_embedding_B.numel()
        rank_zero_info(f"{owner}: m={self.num_virtual_tokens} prompt tokens, rank r={rank}, max_length={S}, "
                       f"s={source.scale:.4g}; prompt + low-rank parameters {budget:,} "
                       f"(= {budget / geometry.hidden_size:.1f} prompt tokens)")
        return source

    # -- optimisation --------------------------------------------------------------------------------------------
    def lowrank_param_names(self, pl_module: pl.LightningModule) -> list[str]:
        return [n for n in self.source_param_names(pl_module) if n.rsplit(".", 1)[-1].startswith("lora_embedding_")]

    def group_lrs(self, pl_module: pl.LightningModule) -> dict[str, float | None]:
        """Parameter name -> lr (``None`` = the optimizer's) of every DePT tensor."""
        low = set(self.lowrank_param_names(pl_module))
        return {n: (self.lowrank_learning_rate if n in low else self.learning_rate)
                for n in self.source_param_names(pl_module)}

    def group_hparams(self, pl_module: pl.LightningModule) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for n, lr in self.group_lrs(pl_module).items():
            hp: dict[str, float] = {}
            if lr is not None:
                hp["lr"] = lr
            if self.weight_decay is not None:
                hp["weight_decay"] = self.weight_decay
            if hp:
                out[n] = hp
        return out
