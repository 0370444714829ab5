"""The parameter-plan picture: a layer × module-kind map of what may train.

Rows are ``embeddings`` (tensors of the HF model before its first decoder layer), ``layer 0`` .. ``layer L-1``,
``head`` (after the last layer: final norm, lm_head) and ``extra`` (tensors of the LightningModule outside the HF
model: a prompt, a classification head); columns are the module kinds in the order the model has them (``q_proj``,
``k_proj``, ..., ``input_layernorm``, ``embed_tokens``, ``lm_head``; digits dropped, so the experts of a MoE share a
column; the layers' kinds come first). Each cell holds the share of its elements that may change (trainable tensors count fully, element-masked
ones by their mask), and whether a mask is involved. :func:`param_map_table` builds the table (the data), and
:func:`param_map_figure` draws it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from lit_ft.core.introspect import find_decoder_layers, find_hf_model

__all__ = ["ParamCell", "ParamMapTable", "param_kind", "param_map_table", "param_map_figure"]

EMBEDDINGS, HEAD, EXTRA = "embeddings", "head", "extra"
#: path parts that name a wrapper, not a kind (PEFT's LoRA layers keep the wrapped module's name before them)
_WRAPPERS = frozenset({"default", "base_layer", "modules_to_save", "original_module"})


@dataclass
class ParamCell:
    """Elements of one (row, kind) cell: ``numel`` in all, ``trainable`` that may change (mask ``True`` counted),
    ``masked`` in element-masked tensors, and the parameter ``names`` it holds."""

    numel: int = 0
    trainable: int = 0
    masked: int = 0
    names: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        """Fraction of the cell's elements that may change."""
        return self.trainable / self.numel if self.numel else 0.0


@dataclass
class ParamMapTable:
    """``rows`` × ``kinds``; ``cells[(row, kind)]`` for the cells that hold tensors; ``trainable``: names of the
    tensors of which at least one element may change."""

    rows: list[str]
    kinds: list[str]
    cells: dict[tuple[str, str], ParamCell]
    trainable: set[str] = field(default_factory=set)

    def share(self, row: str, kind: str) -> float | None:
        """Trainable share of a cell, ``None`` where the model has no such tensor."""
        c = self.cells.get((row, kind))
        return None if c is None else c.share


def param_kind(name: str) -> str:
    """Column of a parameter (its path inside a layer or the model): the last module name, digits and wrapper names
    dropped (``self_attn.q_proj.weight`` -> ``q_proj``; ``mlp.experts.3.up_proj.weight`` -> ``up_proj``; LoRA's
    ``q_proj.lora_A.default.weight`` -> ``q_proj.lora_A``). A tensor directly on the root keeps its own name."""
    parts = [p for p in name.split(".") if not p.isdigit() and p not in _WRAPPERS]
    path = parts[:-1] or parts
    if len(path) >= 2 and path[-1].startswith("lora_"):
        return f"{path[-2]}.{path[-1]}"
    return path[-1]


def _layer_of(pl_module: nn.Module) -> tuple[dict[int, tuple[int, str]], set[int], list[int]]:
    """id(param) -> (layer index, path inside the layer); ids of the HF model's params; their order."""
    hf = find_hf_model(pl_module)
    try:
        layers = find_decoder_layers(hf)
    except Exception:  # a model whose layer list is not found: every tensor goes to embeddings/head/extra
        layers = []
    where: dict[int, tuple[int, str]] = {}
    for i, layer in enumerate(layers):
        for n, p in layer.named_parameters():
            where.setdefault(id(p), (i, n))
    order = [id(p) for p in hf.parameters()]
    return where, set(order), order


def param_map_table(pl_module: nn.Module, summary: Any) -> ParamMapTable:
    """The map of ``pl_module`` under ``summary`` (a :class:`~lit_ft.core.params.PlanSummary`, e.g. the composed
    plan's: its ``by_tensor`` gives each tensor's trainable element count and state)."""
    where, in_hf, hf_order = _layer_of(pl_module)
    first_layer_pos = min((k for k, pid in enumerate(hf_order) if pid in where), default=len(hf_order))
    pos = {pid: k for k, pid in enumerate(hf_order)}
    n_layers = 1 + max((i for i, _ in where.values()), default=-1)
    rows = [EMBEDDINGS] + [f"layer {i}" for i in range(n_layers)] + [HEAD, EXTRA]
    layer_kinds: list[str] = []  # columns: the layers' kinds first, then those of embeddings / head / extra
    other_kinds: list[str] = []
    cells: dict[tuple[str, str], ParamCell] = {}
    trainable: set[str] = set()
    for name, p in pl_module.named_parameters():  # tied tensors once, as the summary counts them
        info = summary.by_tensor.get(name)
        count = info.trainable if info is not None else (p.numel() if p.requires_grad else 0)
        state = info.state if info is not None else "unlisted"
        if id(p) in where:
            i, inner = where[id(p)]
            row, kind = f"layer {i}", param_kind(inner)
        elif id(p) in in_hf:
            row = EMBEDDINGS if pos[id(p)] < first_layer_pos else HEAD
            kind = param_kind(name)
        else:
            row, kind = EXTRA, param_kind(name)
        seen = layer_kinds if row.startswith("layer ") else other_kinds
        if kind not in seen:
            seen.append(kind)
        cell = cells.setdefault((row, kind), ParamCell())
        cell.numel += p.numel()
        cell.trainable += int(count)
        cell.masked += p.numel() if state == "mask" else 0
        cell.names.append(name)
        if count:
            trainable.add(name)
    used = {r for r, _ in cells}
    kinds = layer_kinds + [k for k in other_kinds if k not in layer_kinds]
    return ParamMapTable(rows=[r for r in rows if r in used], kinds=kinds, cells=cells, trainable=trainable)


def param_map_figure(table: ParamMapTable, title: str = "") -> Any:
    """The table as a heat-map (colour = trainable share; blank = no such tensor; ``M`` marks element-masked
    cells, with their share); a matplotlib ``Figure`` from :func:`lit_ft.core.pictures.new_figure`."""
    import numpy as np

    from lit_ft.core.pictures import new_figure

    R, K = len(table.rows), len(table.kinds)
    data = np.full((R, K), np.nan)
    for (row, kind), c in table.cells.items():
        data[table.rows.index(row), table.kinds.index(kind)] = c.share
    fig = new_figure(max(5.0, 0.55 * K + 2.5), max(2.5, 0.26 * R + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    cmap = _cmap()
    im = ax.imshow(np.ma.masked_invalid(data), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xticks(range(K), labels=table.kinds, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(R), labels=table.rows, fontsize=7)
    for (row, kind), c in table.cells.items():
        if c.masked:
            ax.text(table.kinds.index(kind), table.rows.index(row), f"M{c.share:.0%}", ha="center", va="center",
                    fontsize=5)
    fig.colorbar(im, ax=ax, fraction=0.04, label="trainable share (0 = frozen)")
    if title:
        ax.set_title(title, fontsize=9)
    return fig


def _cmap() -> Any:
    from matplotlib import colormaps

    cmap = colormaps["viridis"].copy()
    cmap.set_bad("#ffffff")  # cells without a tensor
    return cmap
