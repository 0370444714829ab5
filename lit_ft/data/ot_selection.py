"""GOT-D's selection (Kang et al., ICLR 2024, arXiv 2405.02774), shared by its two entry points: the callback
``lit_ft.callbacks.OTDataSelection`` and the DataModule wrapper ``lit_ft.data.OTSelectedDataModule``.

Given a lit-ft text DataModule (its training rows are the candidate pool D_S) and target rows D_R: embed both
(lit_ft/core/text_embedding.py, cached in shards), solve entropic OT between target and pool (lit_ft/core/ot.py),
rank the pool by the calibrated pool-side potential and keep the ``k`` most negative. The potentials are cached
under ``<cache_dir>/ot/<key>.pt`` (``key`` hashes both embedding keys and the OT settings); while the Sinkhorn loop
runs, its iterate is checkpointed next to them (``<key>.sinkhorn.pt``, every :data:`SINKHORN_CHECKPOINT_EVERY`
iterations), so an interrupted solve resumes where it stopped and ends with the very potentials an uninterrupted
one would have given.

It lives in the data layer because it reads a DataModule's rows and hands back the kept ones; the callback and the
wrapper only decide when it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from lit_ft.core.ot import sinkhorn_potentials
from lit_ft.core.progress import progress
from lit_ft.core.validate import check_bool, check_int, check_number, check_str, check_str_list

__all__ = ["OTSelection", "OTSelectionSettings", "SINKHORN_CHECKPOINT_EVERY", "calibrated_gradient",
           "check_pool_datamodule", "check_selection_settings", "keep_rows", "rank_pool", "row_text", "select_rows"]

#: Sinkhorn iterations between two checkpoints of the iterate (a write of the two potentials: cheap next to an
#: iteration, which touches the whole target x pool cost)
SINKHORN_CHECKPOINT_EVERY = 10


@dataclass(frozen=True)
class OTSelectionSettings:
    """The validated selection arguments (see :func:`check_selection_settings` for their meaning)."""

    targets: list
    k: int
    max_target: int | None
    text_fields: list[str] | None
    encoder: str
    max_length: int
    normalize: bool
    embed_batch_size: int
    epsilon: float
    threshold: float
    max_iterations: int
    momentum: float
    tile_size: int
    cache_dir: str | None
    device: str | None
    seed: int


def check_selection_settings(owner: str, target: Any, k: int, max_target: int | None, text_fields: list[str] | None,
                             encoder: str, max_length: int, normalize: bool, embed_batch_size: int, epsilon: float,
                             threshold: float, max_iterations: int, momentum: float, tile_size: int,
                             cache_dir: str | None, device: str | None, seed: int) -> OTSelectionSettings:
    """The arguments of both entry points, checked with errors that start with ``owner`` and name the argument,
    its allowed range and the value (the ``Args:`` of ``OTDataSelection`` say what each one means)."""
    from lit_ft.data.sources import check_source

    targets = list(target) if isinstance(target, (list, tuple)) else [target]
    if not targets:
        raise ValueError(f"{owner}: `target` must be a data source or a non-empty list of them, got {target!r}")
    for i, t in enumerate(targets):
        try:
            check_source("target" if len(targets) == 1 else f"target[{i}]", t)
        except ValueError as e:
            raise ValueError(f"{owner}: {e}") from None
    return OTSelectionSettings(
        targets=[str(t) if isinstance(t, os.PathLike) else t for t in targets],
        k=check_int(owner, "k", k, minimum=1),
        max_target=check_int(owner, "max_target", max_target, minimum=1, allow_none=True, null_means="all"),
        text_fields=check_str_list(owner, "text_fields", text_fields, allow_none=True,
                                   null_means="text, else prompt + completion, else messages"),
        encoder=check_str(owner, "encoder", encoder),
        max_length=check_int(owner, "max_length", max_length, minimum=2),
        normalize=check_bool(owner, "normalize", normalize),
        embed_batch_size=check_int(owner, "embed_batch_size", embed_batch_size, minimum=1),
        epsilon=check_number(owner, "epsilon", epsilon, low=0, low_open=True),
        threshold=check_number(owner, "threshold", threshold, low=0, low_open=True),
        max_iterations=check_int(owner, "max_iterations", max_iterations, minimum=1),
        momentum=check_number(owner, "momentum", momentum, low=0, high=2, low_open=True, high_open=True),
        tile_size=check_int(owner, "tile_size", tile_size, minimum=1),
        cache_dir=check_str(owner, "cache_dir", cache_dir, allow_none=True),
        device=check_str(owner, "device", device, allow_none=True),
        seed=check_int(owner, "seed", seed, minimum=0),
    )


@dataclass
class OTSelection:
    """One selection: the kept rows' ``sample_idx`` (sorted), the pool and target sizes, the solve's diagnostics
    (``iterations``, ``error``, ``converged``, ``cost``) and the kept encoded examples (in pool order)."""

    selected: list[int]
    pool_size: int
    target_size: int
    ot: dict[str, Any]
    kept: list[dict] = field(repr=False)

    def summary(self, owner: str) -> str:
        ot = self.ot
        return (f"{owner}: kept {len(self.selected)} of {self.pool_size} training rows toward {self.target_size} "
                f"target rows (Sinkhorn: {ot['iterations']} iterations, marginal error {ot['error']:.3g}"
                f"{'' if ot['converged'] else ' — NOT below threshold'}; OT cost {ot['cost']:.4g})")


def calibrated_gradient(g: torch.Tensor) -> torch.Tensor:
    """The authors' calibration of the pool-side potential (LAVA's): ``g_i - (mean(g) - g_i / N)``.

    It is ``(1 + 1/N) g_i - mean(g)``, an increasing function of ``g_i``: it shifts and scales the values but never
    changes their order, so the selection is the same as ranking by ``g`` itself."""
    return g - (g.sum() / g.numel() - g / g.numel())


def row_text(row: dict, fields: Sequence[str] | None, where: str, owner: str = "OTDataSelection") -> str:
    """The text of one row that is embedded: the given ``fields`` joined by newlines, or, with ``fields=None``,
    ``text`` when the row has it, else its ``prompt`` and ``completion``, else its chat ``messages``' contents."""
    if fields:
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{owner}: {where} has no field {missing[0]!r} named in `text_fields` (its keys: "
                             f"{sorted(row)})")
        return "\n".join(str(row[f]) for f in fields)
    if isinstance(row.get("text"), str):
        return row["text"]
    if "prompt" in row or "completion" in row:
        return "\n".join(str(row[k]) for k in ("prompt", "completion") if row.get(k))
    if isinstance(row.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
    raise ValueError(f"{owner}: {where} has none of 'text', 'prompt'/'completion', 'messages' (its keys: "
                     f"{sorted(row)}); set `text_fields` to the fields to embed")


# ----------------------------------------------------------------------------------------------------------------
def select_rows(owner: str, dm: Any, settings: OTSelectionSettings) -> OTSelection:
    """Run the selection on ``dm``'s training rows (``dm`` is set up for fit if it is not yet); ``dm`` is not
    changed: :func:`keep_rows` applies the result."""
    examples, rows = _pool(owner, dm, settings.text_fields)
    texts = [row_text(rows[e["sample_idx"]], settings.text_fields, f"training row {e['sample_idx']}", owner)
             for e in examples]
    if settings.k > len(texts):
        raise ValueError(f"{owner}: `k`={settings.k} is larger than the pool: the DataModule has {len(texts)} "
                         f"training rows; choose k <= {len(texts)}")
    target = _target_texts(owner, settings)
    order, ot = rank_pool(owner, texts, target, settings)
    keep = sorted(order[: settings.k])
    return OTSelection(selected=[int(examples[i]["sample_idx"]) for i in keep], pool_size=len(texts),
                       target_size=len(target), ot=ot, kept=[examples[i] for i in keep])


def keep_rows(dm: Any, selection: OTSelection) -> None:
    """Make ``dm`` serve only the selected training rows (its validation rows are untouched)."""
    dm._splits["train"] = list(selection.kept)


def rank_pool(owner: str, pool_texts: Sequence[str], target_texts: Sequence[str],
              settings: OTSelectionSettings) -> tuple[list[int], dict[str, Any]]:
    """Pool indices ordered by calibrated gradient, most negative first (the selection is a prefix), and the
    solve's diagnostics. Cached: a second call with the same texts, encoder and OT settings embeds and solves
    nothing; an interrupted solve resumes from its last checkpointed iterate."""
    from lit_ft.core.text_embedding import TextEmbedder

    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    root = Path(settings.cache_dir) if settings.cache_dir else _default_cache()
    embedder = TextEmbedder(settings.encoder, root, max_length=settings.max_length,
                            batch_size=settings.embed_batch_size, normalize=settings.normalize, device=device)
    key = _digest(embedder.key(pool_texts), embedder.key(target_texts), settings.epsilon, settings.threshold,
                  settings.max_iterations, settings.momentum)
    path = root / "ot" / f"{key}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
    else:
        pool = embedder.embed(pool_texts, desc=f"{owner}: embedding the pool")
        tgt = embedder.embed(target_texts, desc=f"{owner}: embedding the target")
        bar = lambda it: progress(it, desc=f"{owner}: Sinkhorn ({len(tgt)} x {len(pool)})",  # noqa: E731
                                  total=len(it), unit="it")
        partial = path.with_name(f"{key}.sinkhorn.pt")
        r = sinkhorn_potentials(
            tgt.to(device), pool.to(device), epsilon=settings.epsilon, threshold=settings.threshold,
            max_iterations=settings.max_iterations, momentum=settings.momentum, tile_size=settings.tile_size,
            iterations=bar, checkpoint_path=partial, checkpoint_every=SINKHORN_CHECKPOINT_EVERY)
        saved = {"g": r.g.double().cpu(), "iterations": torch.tensor(r.iterations),
                 "error": torch.tensor(r.error), "converged": torch.tensor(r.converged),
                 "cost": torch.tensor(r.cost)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(saved, tmp)
        os.replace(tmp, path)
        partial.unlink(missing_ok=True)  # the final potentials replace the iterate
    ot = {"iterations": int(saved["iterations"]), "error": float(saved["error"]),
          "converged": bool(saved["converged"]), "cost": float(saved["cost"])}
    scores = calibrated_gradient(saved["g"])
    return torch.argsort(scores, stable=True).tolist(), ot


def check_pool_datamodule(owner: str, dm: Any, how: str) -> None:
    """Refuse a DataModule whose training rows cannot be selected (``how`` says where the user gives it)."""
    from lit_ft.data._base import _TextDataModule

    packed = type(dm).__name__ == "PackedTextDataModule"  # its rows are cut into fixed-length sequences
    if not isinstance(dm, _TextDataModule) or packed:
        raise TypeError(f"{owner} selects rows of a lit-ft text DataModule: use lit_ft.data.SFTDataModule or "
                        f"ClassificationDataModule ({how}); got "
                        f"{type(dm).__name__ if dm is not None else 'no DataModule'}")


def _pool(owner: str, dm: Any, text_fields: list[str] | None) -> tuple[list[dict], list[dict]]:
    """The DataModule's encoded training examples and its raw training rows (``sample_idx`` indexes them)."""
    from lit_ft.data._common import load_splits

    check_pool_datamodule(owner, dm, "as `data:` in the config, or trainer.fit(datamodule=...)")
    dm.setup("fit")
    examples = dm._examples("train")
    if not examples:
        raise ValueError(f"{owner}: the pool is empty: the DataModule has no training rows")
    rows, _, _ = load_splits(dm.data, dm.val_data, dm.val_split, dm.seed)
    renames = getattr(dm, "_renames", {})  # SFTDataModule's prompt_key / completion_key / ...
    if renames and text_fields is None:
        rows = [{**r, **{std: r[key] for std, key in renames.items() if key in r}} for r in rows]
    return examples, rows


def _target_texts(owner: str, settings: OTSelectionSettings) -> list[str]:
    from lit_ft.data._common import load_source

    rows: list[dict] = []
    for i, src in enumerate(settings.targets):
        name = "target" if len(settings.targets) == 1 else f"target[{i}]"
        try:
            got, _, _ = load_source(name, src)
        except ValueError as e:
            raise ValueError(f"{owner}: {e}") from None
        rows.extend(got)
    if not rows:
        raise ValueError(f"{owner}: `target` holds no rows ({settings.targets!r})")
    if settings.max_target is not None and settings.max_target < len(rows):
        rows = [rows[i] for i in sorted(random.Random(settings.seed).sample(range(len(rows)), settings.max_target))]
    texts = [row_text(r, settings.text_fields, f"target row {i}", owner) for i, r in enumerate(rows)]
    if not any(t.strip() for t in texts):
        raise ValueError(f"{owner}: `target` rows hold no text ({settings.targets!r})")
    return texts


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


def _default_cache() -> Path:
    from lit_ft.assets import cache_dir

    return cache_dir() / "got_d"
