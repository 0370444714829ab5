"""Token Relation Distillation (VideoREPA's TRD) for language models: the student's token-to-token cosine similarities
at one decoder layer, through a trainable projector, are pulled toward a frozen teacher encoder's, pair by pair, with
a margin; the term is added to the task loss."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from typing_extensions import override

from lit_ft.callbacks._objective import ObjectiveCallback
from lit_ft.callbacks.objectives._word_alignment import AlignmentCache, RowAlignment, align_row
from lit_ft.core.batch import IGNORE_INDEX, refuse_packed
from lit_ft.core.host_modules import register_child
from lit_ft.core.introspect import find_decoder_layers, find_hf_model
from lit_ft.core.layer_hooks import ORDER_READ, LayerHookHandle, register_layer_hook
from lit_ft.core.loss import ObjectiveInputs
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_choice, check_int, check_number, check_optional_lr, check_str

#: where the projector lives on the LightningModule (``pl_module.lit_ft_objectives[<objective name>]``): moved,
#: checkpointed, DDP-synchronised and in ``parameters()`` (the optimizer) with the module
HOST_ATTR = "lit_ft_objectives"
TOKEN_CHOICES = ("all", "response")
#: VideoREPA aligns after block 18 of CogVideoX-5B's 42 (``--align_layer 18``): the default layer sits at this depth
PAPER_DEPTH = 18 / 42
DEFAULT_TEACHER = "minilm-l6-v2"


def default_layer(num_layers: int) -> int:
    """The 0-based index of the decoder layer whose output is aligned by default: the block ending at
    ``round(18/42 · L)`` (VideoREPA's block 18 of 42), at least the first. SmolLM2-135M (30 layers): index 12."""
    return max(1, round(PAPER_DEPTH * num_layers)) - 1


def build_projector(student_dim: int, projector_dim: int, teacher_dim: int) -> nn.Sequential:
    """VideoREPA's projector (REPA's ``build_mlp``): Linear-SiLU-Linear-SiLU-Linear, student width → ``projector_dim``
    → ``projector_dim`` → teacher width."""
    return nn.Sequential(nn.Linear(student_dim, projector_dim), nn.SiLU(), nn.Linear(projector_dim, projector_dim),
                         nn.SiLU(), nn.Linear(projector_dim, teacher_dim))


def mean_pool(features: torch.Tensor, rows: torch.Tensor, words: torch.Tensor, batch: int,
              width: int) -> torch.Tensor:
    """``[batch, width, D]``: the mean of ``features`` (``[E, D]``) per (row, word) slot; slots nothing lands in are
    zero (and carry no pair in the Gram hinge)."""
    slot = rows * width + words
    out = features.new_zeros(batch * width, features.shape[-1]).index_add(0, slot, features)
    count = torch.zeros(batch * width, dtype=features.dtype, device=features.device)
    count = count.index_add(0, slot, torch.ones_like(slot, dtype=features.dtype))
    return (out / count.clamp_min(1.0)[:, None]).view(batch, width, -1)


def _row_key(ids: np.ndarray, selected: np.ndarray) -> tuple[bytes, bytes]:
    return hashlib.blake2b(ids.tobytes(), digest_size=16).digest(), np.packbits(selected).tobytes()


@technique(name="token_relation_distillation", family="objectives",
           paper="VideoREPA: Learning Physics for Video Generation through Relational Alignment with Foundation Models",
           arxiv="2505.23656")
class TokenRelationDistillation(ObjectiveCallback):
    """Token Relation Distillation (TRD): align the student's token-relation structure with a frozen teacher's.

    Paper: Zhang et al., *VideoREPA: Learning Physics for Video Generation through Relational Alignment with
    Foundation Models* (arXiv 2505.23656; code github.com/aHapBean/VideoREPA). There: a video diffusion transformer's
    block-18 tokens, a trainable MLP to the width of a frozen video encoder (VideoMAEv2), both token sets
    L2-normalised, cosine Gram matrices ``S_s`` and ``S_t`` over all token pairs of a clip, and
    ``L_TRD = mean(ReLU(|S_s − S_t| − m))`` with ``m = 0.1``, added to the diffusion loss with coefficient 0.5.

    Here, for language models: the output of decoder layer ``layer`` (a forward hook) goes through the projector
    (Linear-SiLU-Linear-SiLU-Linear, ``projector_dim`` wide, as in the authors' code) to the teacher's width; the
    teacher is a frozen HF encoder (default the ``minilm-l6-v2`` asset) run on the same text. The tokenizers differ,
    so both sides are pooled per **word**: each student row is decoded with the student's tokenizer, character spans
    map student and teacher tokens to the words they overlap, and each word's feature is the mean of its tokens'.
    One row is one sequence: ``S`` is the ``W × W`` Gram over its words (all pairs, the diagonal included, as the
    paper's mean over the full matrix). The sum of the hinge over all pairs is divided by the pairs of the whole
    accumulation window on all ranks (an objective count), so gradient accumulation and DDP train exactly like one
    large batch; the term's weight is ``weight`` (the paper's ``proj_coeff``). The Gram hinge runs through the tiled
    op :func:`lit_ft.kernels.gram_hinge.gram_hinge`, which never holds the ``[W, W]`` matrices.

    Details the paper does not settle for text, and the argument that chooses each: the layer (``layer``; default the
    same relative depth as block 18 of CogVideoX-5B's 42: CogVideoX-2B has 30 blocks, so the authors' 2B run aligns
    deeper, at 0.6), which tokens take part (``tokens``: ``"all"`` by default, because the relation structure needs
    many tokens and an SFT completion can be a single word, whose 1 × 1 Gram carries no signal; the paper aligns
    every token of a clip), the teacher's layer (``teacher_layer``) and the projector's learning rate
    (``projector_lr``; the paper trains it with the model, whose lr in the 2B run is 2e-6).

    The student tokenizer comes from ``tokenizer`` or the DataModule's ``tokenizer`` attribute (SFTDataModule has
    one). Text past the teacher's maximum length is not aligned (its words have no teacher token). The projector is
    registered on the LightningModule at setup (``pl_module.lit_ft_objectives["token_relation_distillation"]``):
    checkpointed and resumed with it, and in its ``parameters()``; one the optimizer does not hold is added to it at
    fit start (with ``projector_lr``). Works at level 3 (``TokenLossMixin`` modules) and level 2 (a plain
    ``self.model(**batch).loss``: the HF loss hook); only training forwards add the term (validation loss stays the
    task loss). Logs ``lit_ft/token_relation_distillation/loss`` (the weighted term) and ``.../words`` (aligned words
    per row).

    Args:
        teacher: the frozen teacher: a local HF folder or a ``lit_ft.assets`` name, with a fast tokenizer (offsets).
        teacher_layer: the teacher's hidden state to align to: ``-1`` = its last hidden state, ``k`` = the output of
            its layer ``k`` (``hidden_states[k]``, 0 = the embeddings).
        layer: the student's decoder layer whose output is aligned (0-based; negative counts from the end), or
            ``None`` = the layer at VideoREPA's relative depth (:func:`default_layer`).
        projector_dim: hidden width of the projector MLP (int >= 1; the authors' 2048).
        margin: the hinge margin ``m`` (>= 0; the paper's 0.1): similarity differences within it cost nothing.
        weight: the term's coefficient (>= 0; the paper's ``proj_coeff`` 0.5).
        tokens: ``"all"`` (every real token of the row, default) or ``"response"`` (only the supervised tokens,
            ``labels != -100``; the teacher still reads the whole text).
        tokenizer: the student's tokenizer (folder or asset name), or ``None`` = the DataModule's ``tokenizer``.
        projector_lr: the projector's learning rate (its own param group), or ``None`` = the optimizer's.
        tile_size: rows per block of the tiled Gram hinge (int >= 1).
        integration: ``"auto"`` (level 3 for ``TokenLossMixin`` modules, else level 2), ``"mixin"`` or ``"hook"``.
    """

    technique_name = "token_relation_distillation"
    objective_name = "token_relation_distillation"
    required_batch_keys = ("input_ids", "labels")

    def __init__(self, teacher: str = DEFAULT_TEACHER, teacher_layer: int = -1, layer: int | None = None,
                 projector_dim: int = 2048, margin: float = 0.1, weight: float = 0.5, tokens: str = "all",
                 tokenizer: str | None = None, projector_lr: float | None = None, tile_size: int = 512,
                 integration: str = "auto") -> None:
        super().__init__(integration)
        owner = type(self).__name__
        self.teacher = check_str(owner, "teacher", teacher)
        if not self.teacher:
            raise ValueError(f"{owner}: `teacher` must be a folder or a lit_ft asset name, got ''")
        self.teacher_layer = check_int(owner, "teacher_layer", teacher_layer)
        self.layer = check_int(owner, "layer", layer, allow_none=True, null_means="VideoREPA's relative depth")
        self.projector_dim = check_int(owner, "projector_dim", projector_dim, minimum=1)
        self.margin = check_number(owner, "margin", margin, low=0.0)
        self.weight = check_number(owner, "weight", weight, low=0.0)
        self.tokens = check_choice(owner, "tokens", tokens, TOKEN_CHOICES)
        self.tokenizer = check_str(owner, "tokenizer", tokenizer, allow_none=True,
                                   null_means="the DataModule's tokenizer")
        self.projector_lr = check_optional_lr(projector_lr, "projector_lr", owner)
        self.tile_size = check_int(owner, "tile_size", tile_size, minimum=1)
        #: the resolved 0-based layer index (set at setup)
        self.layer_index: int | None = None
        self.teacher_model: nn.Module | None = None
        self.teacher_tokenizer: Any = None
        self.student_tokenizer: Any = None
        self.projector: nn.Module | None = None
        self._hook: LayerHookHandle | None = None
        self._captured: torch.Tensor | None = None
        self._armed = False
        self._pending: dict[str, Any] | None = None
        self._cache = AlignmentCache()
        self._teacher_max_length = 512
        self.last_words: float | None = None

    # -- setup -----------------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from lit_ft.core.strategy import refuse_sharded_strategies

        # the compatibility matrix measured it: under FSDP2 the step differed from one process by 0.3 of the update
        refuse_sharded_strategies(trainer, "TokenRelationDistillation", "its projector sits outside the sharded "
                                  "model, so its gradients would not be averaged across ranks")
        others = [cb for cb in trainer.callbacks if isinstance(cb, TokenRelationDistillation) and cb is not self]
        if others:
            raise ValueError(f"{type(self).__name__}: one relation term per model (its projector has one slot, "
                             f"{HOST_ATTR}[{self.objective_name!r}]); a second instance is already in the Trainer")
        super().setup(trainer, pl_module, stage)
        hf = find_hf_model(pl_module)
        n_layers = len(find_decoder_layers(hf))
        index = default_layer(n_layers) if self.layer is None else self.layer
        if not -n_layers <= index < n_layers:
            raise ValueError(f"{type(self).__name__}: `layer` must be an int in [-{n_layers}, {n_layers - 1}] (the "
                             f"model has {n_layers} decoder layers) or null, got {self.layer!r}")
        self.layer_index = index % n_layers
        self._load_teacher()
        self._load_student_tokenizer(trainer)
        self._install_projector(pl_module, hf)
        if self._hook is None:
            self._hook = register_layer_hook(hf, self._capture, order=ORDER_READ, layers=[self.layer_index])

    def _load_teacher(self) -> None:
        if self.teacher_model is not None:
            return
        from transformers import AutoModel, AutoTokenizer

        from lit_ft.assets import resolve
        from lit_ft.core.frozen import freeze

        path = resolve(self.teacher)
        tok = AutoTokenizer.from_pretrained(path)
        if not getattr(tok, "is_fast", False):
            raise ValueError(f"{type(self).__name__}: `teacher` {self.teacher!r} has no fast tokenizer; the word "
                             "alignment needs its offset mapping (a tokenizer.json)")
        model = freeze(AutoModel.from_pretrained(path))
        n_teacher = int(getattr(model.config, "num_hidden_layers", 0))
        if not -(n_teacher + 1) <= self.teacher_layer <= n_teacher:
            raise ValueError(f"{type(self).__name__}: `teacher_layer` must be -1 or an int in [0, {n_teacher}] for "
                             f"{self.teacher!r} ({n_teacher} layers), got {self.teacher_layer!r}")
        limits = [int(v) for v in (getattr(tok, "model_max_length", 0), getattr(model.config,
                  "max_position_embeddings", 0)) if v and 0 < v < 1_000_000]
        self._teacher_max_length = min(limits) if limits else 512
        self.teacher_model, self.teacher_tokenizer = model, tok

    def _load_student_tokenizer(self, trainer: pl.Trainer) -> None:
        if self.student_tokenizer is not None:
            return
        if self.tokenizer is not None:
            from lit_ft.data._common import load_tokenizer

            self.student_tokenizer = load_tokenizer(self.tokenizer, "tokenizer")
            return
        dm = getattr(trainer, "datamodule", None)
        tok = getattr(dm, "tokenizer", None) if dm is not None else None
        if tok is None or not hasattr(tok, "batch_decode"):
            raise ValueError(f"{type(self).__name__}: needs the student's tokenizer to find the words of each row: "
                             "pass `tokenizer` (a folder or lit_ft asset name) or use a DataModule with a `tokenizer` "
                             "attribute (lit_ft.data.SFTDataModule has one)")
        self.student_tokenizer = tok

    def _install_projector(self, pl_module: pl.LightningModule, hf: nn.Module) -> None:
        assert self.teacher_model is not None
        student_dim = int(hf.config.hidden_size)
        teacher_dim = int(self.teacher_model.config.hidden_size)
        store = getattr(pl_module, HOST_ATTR, None)
        existing = store[self.objective_name] if store is not None and self.objective_name in store else None
        if existing is not None:
            first, last = existing[0], existing[-1]
            if (first.in_features, first.out_features, last.out_features) != (student_dim, self.projector_dim,
                                                                               teacher_dim):
                raise ValueError(f"{type(self).__name__}: the module already holds a projector {student_dim}->"
                                 f"{first.out_features}->{last.out_features}, not {student_dim}->{self.projector_dim}->"
                                 f"{teacher_dim} (`projector_dim` or the teacher changed)")
            self.projector = existing
            return
        projector = build_projector(student_dim, self.projector_dim, teacher_dim)
        p = next(hf.parameters())
        projector.to(device=p.device)  # fp32 always: a small module whose features feed a cosine
        register_child(pl_module, HOST_ATTR, self.objective_name, projector, ValueError, "a projector")
        self.projector = projector

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # the projector stays on the module (part of its state now); hooks and the teacher pass go
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._captured, self._pending, self._armed = None, None, False
        super().teardown(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Put the projector in the optimizer when ``configure_optimizers`` left it out, and give it
        ``projector_lr``. Runs before a checkpoint's optimizer state is restored, so a resumed run has the same
        groups."""
        from lit_ft.core.optim import assign_group_hparams, sync_schedulers

        if self.projector is None:
            return
        prefix = f"{HOST_ATTR}.{self.objective_name}."
        hp = {} if self.projector_lr is None else {"lr": self.projector_lr}
        names = {n: dict(hp) for n, p in pl_module.named_parameters() if n.startswith(prefix) and p.requires_grad}
        for opt in trainer.optimizers:
            r = assign_group_hparams(opt, pl_module, names)
            if r.changed and trainer.lr_scheduler_configs:  # a new group needs its scheduler entry (warm-up)
                sync_schedulers(trainer, opt, origin=r.origin, scale=r.scale, owner=type(self).__name__)
            if r.added:
                rank_zero_info(f"{type(self).__name__}: added the projector ({len(r.added)} tensors) to the optimizer")

    @override
    def _check(self, batch: Any) -> None:
        first = not self._checked_batch
        super()._check(batch)
        if first and self.student_tokenizer is not None:
            # the rows are decoded with this tokenizer: ids it does not know mean it is not the data's tokenizer
            size, top = len(self.student_tokenizer), int(batch["input_ids"].max())
            if top >= size:
                raise ValueError(f"{type(self).__name__}: input_ids hold token id {top}, but the student tokenizer has "
                                 f"{size} tokens; `tokenizer` (or the DataModule's) must be the one that made the batch")

    # -- the alignment ---------------------------------------------------------------------------------------------
    def _rows(self, batch: Mapping[str, Any]) -> list[RowAlignment]:
        ids = batch["input_ids"].detach().cpu().numpy()
        mask = batch.get("attention_mask")
        real = np.ones(ids.shape, dtype=bool) if mask is None else mask.detach().cpu().numpy().astype(bool)
        if self.tokens == "response":
            chosen = batch["labels"].detach().cpu().numpy() != IGNORE_INDEX
        else:
            chosen = real
        out = []
        for b in range(ids.shape[0]):
            positions = np.nonzero(real[b])[0]
            row_ids, selected = ids[b, positions], chosen[b, positions]
            key = _row_key(row_ids, selected)
            row = self._cache.get(key)
            if row is None:  # cached by content: student positions index the row's real tokens
                row = align_row(self.student_tokenizer, self.teacher_tokenizer, row_ids.tolist(),
                                np.arange(len(row_ids), dtype=np.int64), selected, self._teacher_max_length)
                self._cache.put(key, row)
            out.append(dataclasses.replace(row, student_pos=positions[row.student_pos]))
        return out

    @override
    def objective_counts(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Word pairs of one micro-batch: ``Σ_rows W²`` (the paper's mean runs over the full Gram matrix)."""
        if self.student_tokenizer is None or self.teacher_tokenizer is None:  # pragma: no cover - before setup
            return {"pairs": torch.zeros(())}
        return {"pairs": torch.tensor(float(sum(r.num_words ** 2 for r in self._rows(batch))))}

    @override
    def objective_normaliser(self, totals: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return totals["pairs"].clamp_min(1.0)

    @override
    def objective_weight(self) -> float:
        return self.weight

    # -- per batch -------------------------------------------------------------------------------------------------
    def _capture(self, index: int, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._armed and torch.is_grad_enabled():
            self._captured = output[0] if isinstance(output, (tuple, list)) else output
        return None

    @torch.no_grad()
    def teacher_features(self, rows: list[RowAlignment], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's word features ``[B, W_max, D_t]`` (zero past each row's words) and the words per row."""
        assert self.teacher_model is not None
        B, width = len(rows), max([r.num_words for r in rows] + [1])
        tmax = max([len(r.teacher_ids) for r in rows] + [1])
        pad = self.teacher_tokenizer.pad_token_id or 0
        ids = torch.full((B, tmax), pad, dtype=torch.long)
        att = torch.zeros((B, tmax), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, :len(r.teacher_ids)] = torch.tensor(r.teacher_ids, dtype=torch.long)
            att[b, :len(r.teacher_ids)] = 1
        model = self.teacher_model
        if next(model.parameters()).device != device:
            model.to(device)
        want_layer = self.teacher_layer != -1
        out = model(input_ids=ids.to(device), attention_mask=att.to(device), output_hidden_states=want_layer)
        hidden = (out.hidden_states[self.teacher_layer] if want_layer else out.last_hidden_state).float()
        rows_t, pos_t, words_t = self._pairs(rows, "teacher", device)
        feats = mean_pool(hidden[rows_t, pos_t], rows_t, words_t, B, width)
        counts = torch.tensor([r.num_words for r in rows], dtype=torch.long, device=device)
        return feats, counts

    @staticmethod
    def _pairs(rows: list[RowAlignment], side: str, device: torch.device) -> tuple[torch.Tensor, ...]:
        pos = [getattr(r, f"{side}_pos") for r in rows]
        words = [getattr(r, f"{side}_word") for r in rows]
        which = np.concatenate([np.full(len(p), b, dtype=np.int64) for b, p in enumerate(pos)] + [np.zeros(0, np.int64)])
        return (torch.from_numpy(which).to(device), torch.from_numpy(np.concatenate(pos + [np.zeros(0, np.int64)])).to(device),
                torch.from_numpy(np.concatenate(words + [np.zeros(0, np.int64)])).to(device))

    @override
    def prepare_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Mapping[str, Any]) -> None:
        refuse_packed(batch, type(self).__name__, "the word Gram of a row would mix the examples packed in it")
        self._captured = None
        rows = self._rows(batch)
        device = batch["input_ids"].device
        feats, counts = self.teacher_features(rows, device)
        self._pending = {"rows": rows, "teacher": feats, "counts": counts}
        self._armed = True

    @override
    def objective_loss(self, inputs: ObjectiveInputs) -> torch.Tensor | None:
        """The hinge **sum** over all word pairs of every row (the engine divides by the window's pairs)."""
        if not inputs.training or self._pending is None:
            return None
        pending, hidden = self._pending, self._captured
        self._pending, self._captured, self._armed = None, None, False
        if hidden is None:
            raise RuntimeError(f"{type(self).__name__}: decoder layer {self.layer_index} did not run in the training "
                               "forward (no hidden states captured); was the batch run through the model?")
        from lit_ft.kernels.gram_hinge import gram_hinge

        assert self.projector is not None
        rows, teacher, counts = pending["rows"], pending["teacher"], pending["counts"]
        device = hidden.device
        B, width = len(rows), teacher.shape[1]
        r_s, p_s, w_s = self._pairs(rows, "student", device)
        weight_dtype = next(self.projector.parameters()).dtype
        if r_s.numel() == 0:  # no word anywhere: a graph-connected zero (every rank runs the projector: DDP)
            return self.projector(hidden[:, :1].to(weight_dtype)).sum() * 0.0
        projected = self.projector(hidden[r_s, p_s].to(weight_dtype)).float()
        student = mean_pool(projected, r_s, w_s, B, width)
        mask = torch.arange(width, device=device)[None, :] < counts.to(device)[:, None]
        self.last_words = float(counts.float().mean())
        return gram_hinge(student, teacher.to(device), self.margin, mask, tile=self.tile_size).sum()

    @override
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._captured, self._pending, self._armed = None, None, False
        if self.last_words is not None:
            pl_module.log(f"lit_ft/{self.objective_name}/words", self.last_words, on_step=True, on_epoch=False,
                          batch_size=1)
            self.last_words = None

    # -- state -----------------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        # the projector's weights are in the module's state dict; these say what they were trained against
        return {"teacher": self.teacher, "layer": self.layer_index, "projector_dim": self.projector_dim}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("layer")
        if saved is not None and self.layer_index is not None and saved != self.layer_index:
            raise ValueError(f"{type(self).__name__}: the checkpoint's projector was trained on decoder layer {saved}, "
                             f"this run aligns layer {self.layer_index} (`layer`); resume with layer={saved}")
