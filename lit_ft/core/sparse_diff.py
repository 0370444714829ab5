"""Sparse parameter differences (composable sparse fine-tunings, Ansell et al., ACL 2022): export, load, compose.

A *sparse diff* ``φ = θ − θ₀`` stores, per parameter tensor, only the entries a sparse fine-tuning changed
(``kind="sparse"``: flat row-major indices + values) or, for tensors that were trained in full such as a task head,
the whole difference (``kind="dense"``). Diffs trained separately on one base compose by addition:
``θ = θ₀ + φ_a + φ_b`` (:func:`compose_sparse_diffs`).

File format (safetensors): tensors ``indices/<i>`` (int32, or int64 for tensors with 2**31 elements or more) and
``values/<i>`` for the ``i``-th tensor of the header; metadata key ``"lit_ft"`` holds a JSON header::

    {"format": "lit_ft.sparse_diff", "version": 1, "module_prefix": "model.", "diff_dtype": "float64",
     "tensors": [{"name": ..., "shape": [...], "kind": "sparse" | "dense", "param_dtype": "float32", "nnz": ...}],
     "metadata": {...}}

Names are the parameter names of the module the diff was exported from; ``module_prefix`` is the path of the
Hugging Face model inside it (``"model."`` for lit_ft's ``CausalLMModule``), so a diff exported from a
LightningModule also applies to the bare HF model (see ``names_prefix`` of :func:`compose_sparse_diffs`).

Exactness: values are computed in float64 and, with ``diff_dtype="float64"`` (default), stored exactly, so
applying one diff to its base reproduces the fine-tuned parameters bit for bit (whenever ``θ − θ₀`` is exact in
float64, i.e. unless an entry shrinks by a factor above ~2**28). ``diff_dtype="float32"`` halves the value storage;
an entry is then off by at most one unit in the last place where it moved by about its own magnitude.
"""

from __future__ import annotations

import difflib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

__all__ = [
    "SparseDiff",
    "SparseDiffEntry",
    "SparseDiffError",
    "sparse_diff_from_params",
    "export_sparse_diff",
    "save_sparse_diff",
    "load_sparse_diff",
    "compose_sparse_diffs",
]

FORMAT = "lit_ft.sparse_diff"
VERSION = 1
_DIFF_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class SparseDiffError(ValueError):
    """A sparse diff file is malformed, or does not fit the model it is applied to."""


@dataclass
class SparseDiffEntry:
    """One tensor of a :class:`SparseDiff`.

    Attributes:
        name: parameter name (as the exporting module's ``named_parameters()`` spells it).
        shape: the parameter's shape.
        kind: ``"sparse"`` (``indices`` + 1-D ``values``) or ``"dense"`` (``values`` of ``shape``, no indices).
        values: the differences ``θ − θ₀``.
        indices: flat (row-major) indices of the changed entries, for ``"sparse"``.
        param_dtype: the parameter's dtype at export (informative).
    """

    name: str
    shape: tuple[int, ...]
    kind: str
    values: torch.Tensor
    indices: Optional[torch.Tensor] = None
    param_dtype: str = "float32"

    @property
    def nnz(self) -> int:
        return int(self.values.numel())


@dataclass
class SparseDiff:
    """A loaded or freshly computed sparse difference ``φ = θ − θ₀`` (see the module docstring).

    Attributes:
        entries: name -> :class:`SparseDiffEntry`, in model order.
        module_prefix: path of the HF model inside the exporting module (``"model."``), or ``""``.
        diff_dtype: dtype of the stored values (``"float64"`` or ``"float32"``).
        metadata: free-form JSON-serialisable information (technique, K, threshold...).
        source: where the diff was loaded from (for error messages).
    """

    entries: dict[str, SparseDiffEntry]
    module_prefix: str = ""
    diff_dtype: str = "float64"
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "<in memory>"

    @property
    def nnz(self) -> int:
        """Number of stored differences (sparse entries plus every element of dense tensors)."""
        return sum(e.nnz for e in self.entries.values())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_diff_dtype(diff_dtype: str) -> torch.dtype:
    if diff_dtype not in _DIFF_DTYPES:
        raise ValueError(f"`diff_dtype` must be one of {sorted(_DIFF_DTYPES)}, got {diff_dtype!r}.")
    return _DIFF_DTYPES[diff_dtype]


def sparse_diff_from_params(
    model: nn.Module,
    theta0: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    diff_dtype: str = "float64",
    module_prefix: str = "",
    metadata: Optional[Mapping[str, Any]] = None,
) -> SparseDiff:
    """Compute ``φ = θ − θ₀`` of ``model``'s current parameters against ``theta0``.

    Args:
        model: module whose ``named_parameters()`` hold the fine-tuned values ``θ``.
        theta0: name -> base values ``θ₀``. For a name in ``masks`` either the full tensor (the parameter's shape)
            or, compactly, the 1-D values at the mask's ``True`` entries in row-major order. A name in ``theta0``
            but not in ``masks`` is stored densely (e.g. a head trained in full).
        masks: name -> ``torch.bool`` mask of the parameter's shape; only ``True`` entries are stored. A mask
            without ``True`` entries stores nothing.
        diff_dtype: ``"float64"`` (exact, default) or ``"float32"``.
        module_prefix: recorded in the header (path of the HF model inside ``model``).
        metadata: JSON-serialisable extra information for the header.

    Raises:
        KeyError: a name is not a parameter of ``model`` or a masked name has no ``theta0``.
        ValueError: a mask or a ``theta0`` tensor has the wrong shape / size or dtype.
    """
    dt = _check_diff_dtype(diff_dtype)
    params = dict(model.named_parameters())
    for name in list(masks) + list(theta0):
        if name not in params:
            close = difflib.get_close_matches(name, list(params), n=3, cutoff=0.5)
            raise KeyError(f"sparse diff: {name!r} is not a parameter of the model" + (f"; close: {close}" if close else "") + ".")
    missing = [n for n in masks if n not in theta0]
    if missing:
        raise KeyError(f"sparse diff: masked tensors {missing[:5]} have no base values in `theta0`.")
    entries: dict[str, SparseDiffEntry] = {}
    with torch.no_grad():
        for name, p in params.items():
            if name not in theta0:
                continue
            base = theta0[name]
            if name in masks:
                mask = masks[name]
                if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != p.shape:
                    raise ValueError(
                        f"sparse diff: mask of {name!r} must be a torch.bool tensor of shape {tuple(p.shape)}, got "
                        f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else (mask.dtype, tuple(mask.shape))}."
                    )
                flat_mask = mask.reshape(-1).to(p.device)
                idx = flat_mask.nonzero().squeeze(1)
                if idx.numel() == 0:
                    continue
                if base.shape == p.shape:
                    base_vals = base.reshape(-1).to(p.device)[idx]
                elif base.dim() == 1 and base.numel() == idx.numel():
                    base_vals = base.to(p.device)
                else:
                    raise ValueError(
                        f"sparse diff: theta0[{name!r}] has shape {tuple(base.shape)}; expected the parameter's shape "
                        f"{tuple(p.shape)} or the {idx.numel()} values at the mask."
                    )
                vals = (p.detach().reshape(-1)[idx].double() - base_vals.double()).to(dt)
                index_dtype = torch.int64 if p.numel() >= 2**31 else torch.int32
                entries[name] = SparseDiffEntry(name, tuple(p.shape), "sparse", vals.cpu(), idx.to(index_dtype).cpu(),
                                                _dtype_name(p.dtype))
            else:
                if base.shape != p.shape:
                    raise ValueError(
                        f"sparse diff: theta0[{name!r}] has shape {tuple(base.shape)} but the parameter has "
                        f"{tuple(p.shape)} (dense tensors need the full base values)."
                    )
                vals = (p.detach().double() - base.to(p.device).double()).to(dt)
                entries[name] = SparseDiffEntry(name, tuple(p.shape), "dense", vals.cpu(), None, _dtype_name(p.dtype))
    return SparseDiff(entries, module_prefix, diff_dtype, dict(metadata or {}))


def save_sparse_diff(diff: SparseDiff, path: Union[str, os.PathLike]) -> str:
    """Write ``diff`` as a safetensors file (format in the module docstring); returns the path."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    header_tensors = []
    for i, e in enumerate(diff.entries.values()):
        tensors[f"values/{i}"] = e.values.contiguous()
        if e.kind == "sparse":
            tensors[f"indices/{i}"] = e.indices.contiguous()  # type: ignore[union-attr]
        header_tensors.append(
            {"name": e.name, "shape": list(e.shape), "kind": e.kind, "param_dtype": e.param_dtype, "nnz": e.nnz}
        )
    header = {
        "format": FORMAT, "version": VERSION, "module_prefix": diff.module_prefix, "diff_dtype": diff.diff_dtype,
        "tensors": header_tensors, "metadata": diff.metadata,
    }
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    save_file(tensors, path, metadata={"lit_ft": json.dumps(header)})
    return path


def export_sparse_diff(
    model: nn.Module,
    theta0: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    path: Union[str, os.PathLike],
    diff_dtype: str = "float64",
    module_prefix: str = "",
    metadata: Optional[Mapping[str, Any]] = None,
) -> SparseDiff:
    """Compute ``φ = θ − θ₀`` (:func:`sparse_diff_from_params`, same arguments) and save it to ``path``
    (:func:`save_sparse_diff`). Returns the :class:`SparseDiff`."""
    diff = sparse_diff_from_params(model, theta0, masks, diff_dtype, module_prefix, metadata)
    save_sparse_diff(diff, path)
    diff.source = os.fspath(path)
    return diff


def load_sparse_diff(path: Union[str, os.PathLike]) -> SparseDiff:
    """Read a file written by :func:`save_sparse_diff` / :func:`export_sparse_diff`.

    Raises:
        SparseDiffError: the file is not a lit_ft sparse diff, or its header and tensors disagree.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if "lit_ft" not in meta:
            raise SparseDiffError(f"{path}: not a lit_ft sparse diff (no 'lit_ft' header in the safetensors metadata).")
        try:
            header = json.loads(meta["lit_ft"])
        except json.JSONDecodeError as e:
            raise SparseDiffError(f"{path}: the 'lit_ft' header is not valid JSON ({e}).") from None
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise SparseDiffError(
                f"{path}: header format/version {header.get('format')!r}/{header.get('version')!r}; this lit_ft reads "
                f"{FORMAT!r}/{VERSION}."
            )
        keys = set(f.keys())
        entries: dict[str, SparseDiffEntry] = {}
        for i, t in enumerate(header["tensors"]):
            name, shape, kind = t["name"], tuple(int(s) for s in t["shape"]), t["kind"]
            if f"values/{i}" not in keys or (kind == "sparse" and f"indices/{i}" not in keys):
                raise SparseDiffError(f"{path}: tensor data of {name!r} (#{i}) is missing.")
            values = f.get_tensor(f"values/{i}")
            indices = f.get_tensor(f"indices/{i}").long() if kind == "sparse" else None
            numel = math.prod(shape)
            if kind == "sparse":
                if values.dim() != 1 or indices.shape != values.shape:  # type: ignore[union-attr]
                    raise SparseDiffError(f"{path}: {name!r} has {tuple(indices.shape)} indices for {tuple(values.shape)} values.")  # type: ignore[union-attr]
                if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):  # type: ignore[union-attr]
                    raise SparseDiffError(f"{path}: {name!r} has indices outside [0, {numel}) for shape {list(shape)}.")
            elif kind == "dense":
                if tuple(values.shape) != shape:
                    raise SparseDiffError(f"{path}: dense {name!r} has values of shape {tuple(values.shape)}, header says {list(shape)}.")
            else:
                raise SparseDiffError(f"{path}: {name!r} has kind {kind!r}; allowed: 'sparse', 'dense'.")
            entries[name] = SparseDiffEntry(name, shape, kind, values, indices, t.get("param_dtype", "float32"))
    return SparseDiff(entries, header.get("module_prefix", ""), header.get("diff_dtype", "float64"),
                      header.get("metadata", {}), path)


def _resolve_names(diff: SparseDiff, params: Mapping[str, torch.Tensor], names_prefix: Optional[str]) -> dict[str, str]:
    """diff name -> model parameter name."""
    names = list(diff.entries)
    if names_prefix is None:
        if all(n in params for n in names) or not diff.module_prefix:
            prefix = ""
        elif all(n.startswith(diff.module_prefix) and n[len(diff.module_prefix):] in params for n in names):
            prefix = diff.module_prefix
        else:
            prefix = ""
    else:
        prefix = names_prefix
    out: dict[str, str] = {}
    unknown: list[str] = []
    for n in names:
        if prefix and not n.startswith(prefix):
            raise SparseDiffError(
                f"{diff.source}: tensor {n!r} does not start with names_prefix {prefix!r}; the diff's names look like "
                f"{names[:3]}."
            )
        target = n[len(prefix):]
        if target not in params:
            unknown.append(n)
        out[n] = target
    if unknown:
        first = unknown[0][len(prefix):]
        close = difflib.get_close_matches(first, list(params), n=3, cutoff=0.5)
        raise SparseDiffError(
            f"{diff.source}: {len(unknown)} tensor name(s) of the diff are not parameters of the model, e.g. "
            f"{unknown[:3]} (looked up as {first!r} after stripping names_prefix={prefix!r})"
            + (f"; close model names: {close}" if close else f"; model names look like {list(params)[:3]}")
            + f". The diff was exported with module_prefix={diff.module_prefix!r}: pass names_prefix= to strip the "
            "prefix the diff's names carry in front of this model's names."
        )
    return out


def compose_sparse_diffs(
    model: nn.Module,
    diffs: Sequence[Union[str, os.PathLike, SparseDiff]],
    names_prefix: Optional[str] = None,
) -> dict[str, int]:
    """Add sparse diffs onto ``model``'s parameters in place: ``θ = θ₀ + φ_1 + φ_2 + ...``.

    The sum is accumulated in float64 per tensor and rounded to the parameter's dtype once, so applying float64
    diffs together gives the same bits as applying them one after the other (each single diff lands exactly on
    its fine-tuned values). Every name and shape is checked before any parameter is changed.

    Args:
        model: the base model (a LightningModule or a bare HF model) holding ``θ₀``.
        diffs: paths of files written by :func:`export_sparse_diff`, or :class:`SparseDiff` objects.
        names_prefix: a prefix the diff's names carry in front of ``model``'s parameter names, stripped before
            lookup (``"model."`` to apply a diff exported from ``CausalLMModule`` to the bare HF model). ``None``
            (default): names are used as they are if they all exist in ``model``, else the ``module_prefix``
            recorded at export is stripped; ``""``: never strip.

    Returns:
        model parameter name -> number of entries changed (summed over the diffs).

    Raises:
        SparseDiffError: a file is malformed, a name is not a parameter of ``model`` (the message shows close names
            and the prefix), or a tensor's shape differs from the parameter's.
    """
    if isinstance(diffs, (str, os.PathLike, SparseDiff)):
        raise TypeError("`diffs` must be a list of paths or SparseDiff objects, e.g. [diff_a, diff_b].")
    if names_prefix is not None and not isinstance(names_prefix, str):
        raise TypeError(f"`names_prefix` must be a string or None, got {type(names_prefix).__name__}.")
    loaded: list[SparseDiff] = []
    for i, d in enumerate(diffs):
        if isinstance(d, SparseDiff):
            loaded.append(d)
        elif isinstance(d, (str, os.PathLike)):
            loaded.append(load_sparse_diff(d))
        else:
            raise TypeError(f"`diffs[{i}]` must be a path or a SparseDiff, got {type(d).__name__}.")
    params = dict(model.named_parameters(remove_duplicate=False))
    plan: dict[str, list[SparseDiffEntry]] = {}
    for d in loaded:
        for diff_name, target in _resolve_names(d, params, names_prefix).items():
            e = d.entries[diff_name]
            p = params[target]
            if tuple(p.shape) != tuple(e.shape):
                raise SparseDiffError(
                    f"{d.source}: tensor {diff_name!r} has shape {list(e.shape)} but the model's {target!r} has shape "
                    f"{list(p.shape)}; the diff was made for a different architecture."
                )
            plan.setdefault(target, []).append(e)
    counts: dict[str, int] = {}
    with torch.no_grad():
        for target, entries in plan.items():
            p = params[target]
            acc = p.detach().reshape(-1).to(torch.float64, copy=True)
            for e in entries:
                vals = e.values.to(device=acc.device, dtype=torch.float64)
                if e.kind == "sparse":
                    acc.index_add_(0, e.indices.to(acc.device), vals)  # type: ignore[union-attr]
                else:
                    acc += vals.reshape(-1)
            p.copy_(acc.view(p.shape).to(p.dtype))
            counts[target] = sum(e.nnz for e in entries)
    return counts
