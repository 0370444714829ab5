"""DSEE: a LoRA branch plus a fixed sparse branch on the query and value projections, the sparse mask found by a
GreBsmo-style low-rank + sparse decomposition of the pretrained weight; optional magnitude pruning (stage 2); the
sparse part exported as a lit_ft sparse diff."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from lit_ft.callbacks._adapter import AdapterCallback
from lit_ft.core.adapters import Adapter, AdapterError, AdapterSet, AdapterTarget, resolve_targets
from lit_ft.core.introspect import find_decoder_layers, find_hf_model
from lit_ft.core.registry import technique
from lit_ft.core.sparse_diff import SparseDiff, SparseDiffEntry, save_sparse_diff
from lit_ft.core.validate import check_choice, check_int, check_number, check_str_list

INITS = ("dsee", "zero")
PRUNE_SCORES = ("wabs", "abs", "w")
#: attribute of the LightningModule holding the stage-2 pruning masks (buffers: checkpointed, moved with the module)
PRUNE_ATTR = "lit_ft_dsee_prune"
SPARSE_DIFF_FILE = "sparse_diff.safetensors"


# ------------------------------------------------------------------------------------------------------------------
# The sparse mask: GreBsmo-style decomposition of the pretrained weight
# ------------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def grebsmo_decompose(weight: torch.Tensor, outer_iters: int = 100, inner_iters: int = 2, rank_step: int = 5,
                      threshold: float = 0.01, generator: torch.Generator | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``W ≈ U V + S`` as DSEE's authors compute it (``run_glue.py``, ``sparse_method="grebsmo"``), in float32 on
    ``weight``'s device. Returns ``(U, V, S_raw)`` with ``S_raw = W − U V`` of the last inner step *before* the
    threshold (its large entries are the sparse part; ranking by it equals ranking the thresholded ``S`` whenever at
    least as many entries as asked pass the threshold, and stays well defined when fewer do).

    Per outer loop: ``S = 0``; ``inner_iters`` times: ``U = QR((W − S) Vᵀ).Q``, ``V = Uᵀ (W − S)``,
    ``S = W − U V`` with ``|S| < threshold`` zeroed; then ``V`` gains the first ``rank_step`` rows of
    ``QR(W − U V − S).R`` (the rank grows by ``rank_step``). ``U``, ``V`` start as random rank-1 factors. The rank
    stops growing one step before it would reach ``min(W.shape)`` (at full rank ``W − U V`` is identically zero and
    the mask would be arbitrary); with the authors' 100 loops this never binds on matrices wider than 500.
    """
    w = weight.detach().float()
    m, n = w.shape
    g = generator or torch.Generator().manual_seed(0)
    u = torch.randn((m, 1), generator=g).to(w.device)
    v = torch.randn((1, n), generator=g).to(w.device)
    raw = torch.zeros_like(w)
    for outer in range(outer_iters):
        s = torch.zeros_like(w)
        for _ in range(inner_iters):
            u = torch.linalg.qr((w - s) @ v.T).Q
            v = u.T @ (w - s)
            raw = w - u @ v
            s = torch.where(raw.abs() < threshold, torch.zeros_like(raw), raw)
        if outer + 1 < outer_iters and v.shape[0] + rank_step < min(m, n):
            e = w - u @ v - s
            v = torch.cat([v, torch.linalg.qr(e).R[:rank_step]], 0)
    return u, v, raw


@torch.no_grad()
def sparse_mask_indices(weight: torch.Tensor, num_sparse: int, **decompose_kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows, cols)`` (int64, on CPU, sorted row-major) of the ``num_sparse`` largest entries of the sparse part of
    ``weight`` (:func:`grebsmo_decompose`; keyword arguments go to it). Exactly ``num_sparse`` entries (the authors'
    ``kthvalue`` threshold keeps every tie, so possibly more)."""
    m, n = weight.shape
    if not 1 <= num_sparse <= m * n:
        raise AdapterError(f"DSEE: num_sparse={num_sparse} must be in [1, {m * n}] for a {m}x{n} weight")
    _, _, raw = grebsmo_decompose(weight, **decompose_kwargs)
    flat = raw.abs().reshape(-1).topk(num_sparse).indices.sort().values.cpu()
    return flat // n, flat % n


# ------------------------------------------------------------------------------------------------------------------
# The adapter
# ------------------------------------------------------------------------------------------------------------------
def linear_of(module: nn.Module, owner: str = "DSEE") -> nn.Linear:
    """The ``nn.Linear`` holding the target's weight (a PEFT LoRA wrapper's ``base_layer``)."""
    base = getattr(module, "base_layer", None)
    if isinstance(base, nn.Linear):
        return base
    if isinstance(module, nn.Linear):
        return module
    raise AdapterError(f"{owner}: the target is a {type(module).__name__}, not an nn.Linear (DSEE adds a LoRA and a "
                       "sparse update to a linear projection's weight: q_proj / v_proj and the like)")


class DSEEAdapter(Adapter):
    """``y' = y + (α/r)·(B (A x) + (S⊙M) x)`` on a linear projection ``y = W x + b`` (``x``: its input).

    ``A`` ``[r, in]``, ``B`` ``[out, r]``; the sparse part is stored compactly: ``sparse_values`` (trained, one per
    mask entry) at fixed ``(sparse_rows, sparse_cols)`` (buffers), computed as ``y[:, row] += value·x[:, col]``
    (``index_add``), so its gradient only exists for the masked entries. Mergeable:
    ``W' = W + (α/r)(B A + S⊙M)``. ``prune_mask`` (a buffer, present once pruning is configured) is the stage-2 mask
    of the target's own weight."""

    mergeable = True

    def __init__(self, in_features: int, out_features: int, rank: int = 16, alpha: float = 32.0,
                 num_sparse: int = 16, init_std: float = 0.02, init: str = "dsee") -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.rank, self.alpha, self.num_sparse = int(rank), float(alpha), int(num_sparse)
        self.init_std, self.init = float(init_std), init
        self.scale = self.alpha / self.rank
        self.lora_a = nn.Parameter(torch.zeros(self.rank, self.in_features))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, self.rank))
        self.sparse_values = nn.Parameter(torch.zeros(self.num_sparse))
        self.register_buffer("sparse_rows", torch.zeros(self.num_sparse, dtype=torch.long))
        self.register_buffer("sparse_cols", torch.zeros(self.num_sparse, dtype=torch.long))

    @torch.no_grad()
    def reset(self, generator: torch.Generator, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """``A`` ~ N(0, init_std²) (``init="zero"``: 0), ``B = 0``, ``S = 0``; the mask at ``(rows, cols)``."""
        if self.init == "dsee":
            self.lora_a.copy_(torch.randn(self.lora_a.shape, generator=generator) * self.init_std)
        else:
            self.lora_a.zero_()
        self.lora_b.zero_()
        self.sparse_values.zero_()
        self.sparse_rows.copy_(rows)
        self.sparse_cols.copy_(cols)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``(α/r)·(B (A x) + (S⊙M) x)`` in the adapter's dtype."""
        xs = x.to(self.lora_a.dtype)
        low_rank = (xs @ self.lora_a.T) @ self.lora_b.T
        picked = xs.index_select(-1, self.sparse_cols) * self.sparse_values  # [..., k]: value · x[col]
        # in picked's dtype: under bf16 autocast the matmuls above come out bf16 while the product stays float32
        sparse = torch.zeros_like(low_rank, dtype=picked.dtype).index_add(-1, self.sparse_rows, picked)
        return self.scale * (low_rank + sparse)

    def forward(self, x: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        if x is None:
            raise AdapterError("DSEEAdapter: the target was called without a tensor input")
        return y + self.delta(x).to(y.dtype)

    @torch.no_grad()
    def weight_delta(self) -> torch.Tensor:
        """``(α/r)(B A + S⊙M)`` as a dense ``[out, in]`` float64 matrix."""
        d = self.lora_b.double() @ self.lora_a.double()
        d.index_put_((self.sparse_rows, self.sparse_cols), self.sparse_values.double(), accumulate=True)
        return d * self.scale

    @torch.no_grad()
    def sparse_delta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(flat row-major indices, (α/r)·values)`` of the sparse part alone (float64 values)."""
        return self.sparse_rows * self.in_features + self.sparse_cols, self.sparse_values.double() * self.scale

    @torch.no_grad()
    def merge_into(self, target: nn.Module) -> None:
        w = linear_of(target).weight
        w.copy_((w.double() + self.weight_delta().to(w.device)).to(w.dtype))

    def artifact_config(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": self.rank,
                "alpha": self.alpha, "num_sparse": self.num_sparse, "init_std": self.init_std, "init": self.init}


# ------------------------------------------------------------------------------------------------------------------
# Stage 2: unstructured magnitude pruning, masks as buffers
# ------------------------------------------------------------------------------------------------------------------
class PruneMasks(nn.Module):
    """Boolean keep-masks (``True`` = kept) of pruned linear weights, one buffer per target key, and ``done``."""

    def __init__(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.keys = list(shapes)
        for k, shape in shapes.items():
            self.register_buffer(k, torch.ones(shape, dtype=torch.bool))
        self.register_buffer("done", torch.zeros((), dtype=torch.bool))

    def mask(self, key: str) -> torch.Tensor:
        return getattr(self, key)


def _global_keep_masks(scores: dict[str, torch.Tensor], ratio: float) -> dict[str, torch.Tensor]:
    """Global L1 unstructured pruning as ``torch.nn.utils.prune.L1Unstructured`` over all ``scores`` together: the
    ``round(ratio · N)`` smallest scores are pruned (``False``)."""
    flat = torch.cat([s.reshape(-1).float() for s in scores.values()])
    k = int(round(ratio * flat.numel()))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if k:
        keep[flat.topk(k, largest=False).indices] = False
    out, i = {}, 0
    for name, s in scores.items():
        out[name] = keep[i:i + s.numel()].view(s.shape)
        i += s.numel()
    return out


def _prefix_of(host: nn.Module, hf: nn.Module) -> str:
    if host is hf:
        return ""
    return next((f"{n}." for n, m in host.named_modules() if m is hf), "")


# ------------------------------------------------------------------------------------------------------------------
# The technique
# ------------------------------------------------------------------------------------------------------------------
@technique(name="dsee", family="adapters",
           paper="DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models", arxiv="2111.00160")
class DSEE(AdapterCallback):
    """DSEE: LoRA plus a fixed sparse update on every layer's query and value projections.

    Paper: Chen et al., *DSEE: Dually Sparsity-embedded Efficient Tuning of Pre-trained Language Models* (ACL 2023);
    authors' code ``VITA-Group/DSEE`` (``run_glue.py``, ``modeling_bert.py``). The backbone is frozen; the
    projections ``q = W_q x`` and ``v = W_v x`` get ``+ (α/r)·B(Ax) + (α/r)·(S⊙M)x``. ``M`` has ``num_sparse``
    entries per matrix, chosen once at setup from the *pretrained* weight by a GreBsmo-style low-rank + sparse
    decomposition (:func:`grebsmo_decompose`: the largest entries of the sparse part). ``S`` is trained on those
    entries only (stored as row, column, value). Merge is exact: ``W' = W + (α/r)(BA + S⊙M)``.

    Stage 2 (optional, :meth:`prune`, or automatically at ``prune_at_step``): global unstructured magnitude pruning of
    the query/value weights (scored on the merged weights by default) and of the other linear layers of the decoder
    layers, each at its own ratio; the keep-masks are buffers (checkpointed), the pruned weights are zeroed and kept
    at zero after every training batch, and the LoRA and sparse branches keep training on top (as the authors'
    stage-2 scripts do). The structured (attention-head) pruning variant is not implemented.

    Args:
        rank: LoRA rank ``r`` (the authors' scripts: 16).
        alpha: LoRA ``α``; both branches are scaled by ``α / r`` (authors: 32).
        num_sparse: non-zeros of the sparse mask per matrix (the authors' scripts: 16; their code's default: 128).
        targets: where, in every decoder layer: roles (``"query"``, ``"value"``) or module paths inside the layer;
            each must be an ``nn.Linear`` (or a PEFT LoRA wrapper of one).
        init_std: std of ``A``'s normal initialisation (authors: 0.02); ``B`` and ``S`` start at zero.
        init: ``"dsee"`` (``A`` random, ``B = 0``: outputs unchanged at step 0) or ``"zero"`` (``A = 0`` too; the
            low-rank branch then gets no gradient, the sparse one still does).
        outer_iters: outer loops of the decomposition (authors: 100; each grows the rank by ``rank_step``).
        inner_iters: alternating updates per outer loop (authors: 2).
        rank_step: rank added per outer loop (authors: 5).
        sparse_threshold: entries of the sparse part below this magnitude are zeroed in each step (authors: 0.01).
        prune_ratio: stage 2: fraction of the query/value weight entries pruned, globally over all targets (authors'
            ``ad_pruning_ratio``, 0.2 in their scripts); 0 = no pruning of these.
        prune_other_ratio: stage 2: fraction pruned, globally, over every other ``nn.Linear`` inside the decoder
            layers, scored by ``|W|`` (authors' ``pruning_ratio`` on key/dense layers, 0.2); 0 = none.
        prune_score: what ranks the query/value entries: ``"wabs"`` (the merged weight
            ``|W + (α/r)(BA + S⊙M)|``), ``"abs"`` (the update alone, ``|(α/r)(BA + S⊙M)|``: the authors' RTE
            script) or ``"w"`` (``|W|``).
        prune_at_step: prune automatically once this many optimizer steps are done (0 = only when :meth:`prune`
            is called).
        seed: seed of ``A``'s initialisation and of the decomposition's random start.
        freeze_backbone: freeze every model tensor except the adapters (and the task head, see
            ``train_task_head``).
        learning_rate: the adapters' lr (own param group); ``None`` = the optimizer's (authors: 5e-4 for all).
        weight_decay: the adapters' weight decay; ``None`` = the optimizer's.
        save_dir: write ``adapters.safetensors`` + ``adapter_config.json`` and the sparse part as
            ``sparse_diff.safetensors`` here when fit ends (relative = under ``trainer.default_root_dir``).
        train_task_head: a sequence-classification model's head trains with the adapters (the authors train it).
        picture_every_n_steps: draw the family's picture every N optimizer steps (0 = off, default); see
            docs/techniques/index.md, Pictures.
    """

    technique_name = "dsee"

    def __init__(self, rank: int = 16, alpha: float = 32.0, num_sparse: int = 16, targets: list[str] | None = None,
                 init_std: float = 0.02, init: str = "dsee", outer_iters: int = 100, inner_iters: int = 2,
                 rank_step: int = 5, sparse_threshold: float = 0.01, prune_ratio: float = 0.0,
                 prune_other_ratio: float = 0.0, prune_score: str = "wabs", prune_at_step: int = 0, seed: int = 0,
                 freeze_backbone: bool = True, learning_rate: float | None = None,
                 weight_decay: float | None = None, save_dir: str | None = None, train_task_head: bool = True,
                 picture_every_n_steps: int = 0) -> None:
        super().__init__(freeze_backbone, learning_rate, weight_decay, save_dir, train_task_head, picture_every_n_steps)
        owner = type(self).__name__
        self.rank = check_int(owner, "rank", rank, 1)
        self.alpha = check_number(owner, "alpha", alpha, low=0, low_open=True)
        self.num_sparse = check_int(owner, "num_sparse", num_sparse, 1)
        self.targets = check_str_list(owner, "targets", targets, allow_none=True) or ["query", "value"]
        self.init_std = check_number(owner, "init_std", init_std, low=0)
        self.init = check_choice(owner, "init", init, INITS)
        self.outer_iters = check_int(owner, "outer_iters", outer_iters, 1)
        self.inner_iters = check_int(owner, "inner_iters", inner_iters, 1)
        self.rank_step = check_int(owner, "rank_step", rank_step, 1)
        self.sparse_threshold = check_number(owner, "sparse_threshold", sparse_threshold, low=0)
        self.prune_ratio = check_number(owner, "prune_ratio", prune_ratio, low=0, high=1, high_open=True)
        self.prune_other_ratio = check_number(owner, "prune_other_ratio", prune_other_ratio, low=0, high=1,
                                              high_open=True)
        self.prune_score = check_choice(owner, "prune_score", prune_score, PRUNE_SCORES)
        self.prune_at_step = check_int(owner, "prune_at_step", prune_at_step, 0)
        if self.prune_at_step and not (self.prune_ratio or self.prune_other_ratio):
            raise ValueError(f"{owner}: `prune_at_step` is {prune_at_step} but `prune_ratio` and `prune_other_ratio` "
                             "are both 0: set a ratio in (0, 1) or prune_at_step: 0")
        self.seed = check_int(owner, "seed", seed, 0)

    @property
    def decompose_kwargs(self) -> dict[str, Any]:
        return {"outer_iters": self.outer_iters, "inner_iters": self.inner_iters, "rank_step": self.rank_step,
                "threshold": self.sparse_threshold}

    # -- building ------------------------------------------------------------------------------------------------
    def build_adapters(self, trainer: pl.Trainer, pl_module: pl.LightningModule, hf_model: nn.Module) -> AdapterSet:
        owner = type(self).__name__
        g = torch.Generator().manual_seed(self.seed)
        adapters = {}
        for target, module in resolve_targets(hf_model, self.targets, owner).items():
            lin = linear_of(module, owner)
            if self.num_sparse > lin.weight.numel():
                raise AdapterError(f"{owner}: `num_sparse` is {self.num_sparse} but {target.path} in layer "
                                   f"{target.layer} has only {lin.weight.numel()} weights")
            rows, cols = sparse_mask_indices(lin.weight, self.num_sparse, generator=g, **self.decompose_kwargs)
            if trainer is not None and trainer.world_size > 1:
                # every rank computes the same mask from the same weights and seed; rank 0's is taken, as the
                # authors broadcast it, so floating-point differences between devices cannot split the ranks
                rows, cols = trainer.strategy.broadcast((rows, cols), src=0)
            a = DSEEAdapter(lin.in_features, lin.out_features, self.rank, self.alpha, self.num_sparse,
                            self.init_std, self.init)
            a.reset(g, rows, cols)
            adapters[target] = a
        return AdapterSet(adapters)

    def install(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().install(trainer, pl_module)
        if self.prune_ratio or self.prune_other_ratio:
            # the masks exist (all True) from setup on, so a checkpoint taken after pruning restores into them
            shapes = {k: tuple(linear_of(m).weight.shape) for k, m in self._prunable(pl_module).items()}
            masks = PruneMasks(shapes).to(next(find_hf_model(pl_module).parameters()).device)
            setattr(pl_module, PRUNE_ATTR, masks)

    def remove(self) -> None:
        if self._host is not None and hasattr(self._host, PRUNE_ATTR):
            delattr(self._host, PRUNE_ATTR)
        super().remove()

    def _prunable(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        """key -> module: the DSEE targets (when ``prune_ratio``) and every other linear layer inside the decoder
        layers (when ``prune_other_ratio``)."""
        assert self.adapters is not None
        blocks = find_decoder_layers(find_hf_model(pl_module))
        qv = {t.key: blocks[t.layer].get_submodule(t.path) for t in self.adapters.targets}
        out = dict(qv) if self.prune_ratio else {}
        if self.prune_other_ratio:
            taken = {id(linear_of(m)) for m in qv.values()}
            for i, block in enumerate(blocks):
                for path, m in block.named_modules():
                    if isinstance(m, nn.Linear) and id(m) not in taken and "lora_" not in path:
                        out[AdapterTarget(i, path).key] = m
        return out

    # -- stage 2 -----------------------------------------------------------------------------------------------------
    @property
    def pruned(self) -> bool:
        masks = getattr(self._host, PRUNE_ATTR, None) if self._host is not None else None
        return bool(masks is not None and masks.done)

    @torch.no_grad()
    def prune(self) -> dict[str, float]:
        """Stage 2: prune now (once). Returns the fraction of entries pruned per group (``"query_value"``,
        ``"other"``)."""
        owner = type(self).__name__
        masks: PruneMasks | None = getattr(self._host, PRUNE_ATTR, None) if self._host is not None else None
        if self.adapters is None or masks is None:
            raise AdapterError(f"{owner}.prune: nothing to prune: install the adapters (fit) with prune_ratio or "
                               "prune_other_ratio > 0")
        if masks.done:
            raise AdapterError(f"{owner}.prune: already pruned")
        modules = self._prunable(self._host)
        qv_keys = {t.key for t in self.adapters.targets} if self.prune_ratio else set()
        result = {}
        if qv_keys:
            scores = {}
            for t in self.adapters.targets:
                w = linear_of(modules[t.key]).weight.double()
                d = self.adapters.adapter(t).weight_delta().to(w.device)
                scores[t.key] = {"wabs": w + d, "abs": d, "w": w}[self.prune_score].abs()
            for k, keep in _global_keep_masks(scores, self.prune_ratio).items():
                masks.mask(k).copy_(keep)
            result["query_value"] = self.prune_ratio
        other = {k: linear_of(m).weight.abs() for k, m in modules.items() if k not in qv_keys}
        if other:
            for k, keep in _global_keep_masks(other, self.prune_other_ratio).items():
                masks.mask(k).copy_(keep)
            result["other"] = self.prune_other_ratio
        masks.done.fill_(True)
        self.apply_prune_masks()
        rank_zero_info(f"{owner}: pruned {result}")
        return result

    @torch.no_grad()
    def apply_prune_masks(self) -> None:
        """Zero the pruned entries of the weights (no-op before :meth:`prune`)."""
        if not self.pruned:
            return
        masks: PruneMasks = getattr(self._host, PRUNE_ATTR)
        for k, m in self._prunable(self._host).items():
            w = linear_of(m).weight
            w.mul_(masks.mask(k).to(w.device))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.prune_at_step and not self.pruned and trainer.global_step >= self.prune_at_step:
            self.prune()
        self.apply_prune_masks()  # an unfrozen backbone must not regrow pruned weights

    # -- sparse diff export -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def sparse_diff(self, include_lora: bool = False, diff_dtype: str = "float64") -> SparseDiff:
        """The DSEE update as a lit_ft sparse diff of the target weights (names as the LightningModule's
        ``named_parameters()``; ``module_prefix`` = the HF model's path in it), applied to a base with
        :func:`lit_ft.core.sparse_diff.compose_sparse_diffs`. ``include_lora=False``: ``(α/r)·S⊙M`` only, stored
        sparsely (``num_sparse`` entries per matrix); ``True``: the whole ``(α/r)(BA + S⊙M)``, stored densely (the
        same weights as :meth:`merge`)."""
        if self.adapters is None or self._host is None:
            raise AdapterError(f"{type(self).__name__}.sparse_diff: no adapters are installed")
        if diff_dtype not in ("float64", "float32"):
            raise ValueError(f"{type(self).__name__}: `diff_dtype` must be 'float64' or 'float32', got {diff_dtype!r}")
        dt = getattr(torch, diff_dtype)
        hf = find_hf_model(self._host)
        names: dict[int, str] = {}
        for n, p in self._host.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), n)  # the first name: the model's own (not an alias through another module)
        blocks = find_decoder_layers(hf)
        entries = {}
        for t in self.adapters.targets:
            a: DSEEAdapter = self.adapters.adapter(t)  # type: ignore[assignment]
            w = linear_of(blocks[t.layer].get_submodule(t.path)).weight
            name = names[id(w)]
            ptype = str(w.dtype).replace("torch.", "")
            if include_lora:
                entries[name] = SparseDiffEntry(name, tuple(w.shape), "dense", a.weight_delta().to(dt).cpu(), None,
                                                ptype)
            else:
                idx, vals = a.sparse_delta()
                order = idx.argsort()
                entries[name] = SparseDiffEntry(name, tuple(w.shape), "sparse", vals[order].to(dt).cpu(),
                                                idx[order].to(torch.int32 if w.numel() < 2**31 else torch.int64).cpu(),
                                                ptype)
        meta = {"technique": "dsee", "include_lora": include_lora, "rank": self.rank, "alpha": self.alpha,
                "num_sparse": self.num_sparse}
        return SparseDiff(entries, _prefix_of(self._host, hf), diff_dtype, meta)

    def export_sparse_diff(self, path: str, include_lora: bool = False, diff_dtype: str = "float64") -> SparseDiff:
        """Write :meth:`sparse_diff` to ``path`` (safetensors); returns it."""
        diff = self.sparse_diff(include_lora, diff_dtype)
        save_sparse_diff(diff, path)
        diff.source = str(path)
        return diff

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if self.save_dir and self.adapters is not None and trainer.is_global_zero:
            out = self.resolved_save_dir(trainer)
            self.export_sparse_diff(f"{out}/{SPARSE_DIFF_FILE}")

