"""GOT-D: choose the training rows whose addition moves the training distribution closest to a target set, by the
gradient of the optimal-transport distance between the two (Kang et al., ICLR 2024)."""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.core.ot import SinkhornResult, sinkhorn_potentials
from lit_ft.core.progress import progress
from lit_ft.core.registry import technique
from lit_ft.core.validate import check_bool, check_int, check_number, check_str, check_str_list

__all__ = ["OTDataSelection", "calibrated_gradient", "row_text"]

_OWNER = "OTDataSelection"


def calibrated_gradient(g: torch.Tensor) -> torch.Tensor:
    """The authors' calibration of the pool-side potential (LAVA's): ``g_i - (mean(g) - g_i / N)``.

    It is ``(1 + 1/N) g_i - mean(g)``, an increasing function of ``g_i``: it shifts and scales the values but never
    changes their order, so the selection is the same as ranking by ``g`` itself."""
    return g - (g.sum() / g.numel() - g / g.numel())


def row_text(row: dict, fields: Sequence[str] | None, where: str) -> str:
    """The text of one row that is embedded: the given ``fields`` joined by newlines, or, with ``fields=None``,
    ``text`` when the row has it, else its ``prompt`` and ``completion``, else its chat ``messages``' contents."""
    if fields:
        missing = [f for f in fields if f not in row]
        if missing:
            raise ValueError(f"{_OWNER}: {where} has no field {missing[0]!r} named in `text_fields` (its keys: "
                             f"{sorted(row)})")
        return "\n".join(str(row[f]) for f in fields)
    if isinstance(row.get("text"), str):
        return row["text"]
    if "prompt" in row or "completion" in row:
        return "\n".join(str(row[k]) for k in ("prompt", "completion") if row.get(k))
    if isinstance(row.get("messages"), list):
        return "\n".join(str(m.get("content", "")) for m in row["messages"] if isinstance(m, dict))
    raise ValueError(f"{_OWNER}: {where} has none of 'text', 'prompt'/'completion', 'messages' (its keys: "
                     f"{sorted(row)}); set `text_fields` to the fields to embed")


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


@technique(name="ot_data_selection", family="data_selection",
           paper="Get more for less: Principled Data Selection for Warming Up Fine-Tuning in LLMs", arxiv="2405.02774")
class OTDataSelection(pl.Callback):
    """GOT-D (Kang et al., ICLR 2024, arXiv 2405.02774): keep the ``k`` training rows that best pull the training
    distribution toward a target set.

    At the start of fit, before the first batch: embed every training row of the DataModule (the candidate pool
    D_S) and the ``target`` rows (D_R) with a sentence encoder; solve entropic OT between the target and the pool
    (log-domain Sinkhorn, the cost ``||x - y||^2`` computed tile by tile, never whole); take the pool-side dual
    potential ``g`` — the gradient of the OT distance with respect to each candidate's weight — calibrate it
    (``g_i - (mean(g) - g_i/N)``) and keep the ``k`` candidates with the most negative value. The DataModule then
    serves only those rows (validation is untouched). The paper pre-fine-tunes on the selection (without labels),
    then fine-tunes on the task: put this callback on the first of the two runs.

    Embeddings are cached in shards (an interrupted embedding resumes at the first missing shard) and so are the
    potentials (a second run with the same texts, encoder and OT settings does no work; a different ``k`` reuses
    them). The Sinkhorn loop itself is not checkpointed: interrupted, it restarts from zero potentials.

    Works with the lit-ft text DataModules (``SFTDataModule``, ``ClassificationDataModule``, ``PackedTextDataModule``
    is refused: its rows are cut into fixed-length sequences). Under DDP every rank computes the same selection
    (run it once beforehand to fill the cache).

    Args:
        target: the target data D_R: a .jsonl/.json/.parquet path, an asset name, a ``datasets`` object or a
            ``load_dataset`` spec dict — or a list of them (their rows are pooled).
        k: candidates kept (>= 1; at most the pool's size). Default 20000, the paper's GPT-2 detoxification
            budget.
        max_target: a seeded random subset of this many target rows (>= 1); None = all.
        text_fields: the row fields embedded (joined by newlines), for pool and target; None = ``text``, else
            ``prompt`` + ``completion``, else the chat messages' contents.
        encoder: HF encoder folder or model asset name (mean-pooled last hidden states). The paper embeds with a
            DistilBERT fine-tuned on the target task; the default is the bundled MiniLM.
        max_length: encoder tokens per text (>= 2); longer texts are truncated (MiniLM's limit is 256; the paper
            chunks texts to 1000 characters and used 295 BERT tokens).
        normalize: L2-normalise the embeddings. The authors' code averages DistilBERT states without normalising
            (default False).
        embed_batch_size: texts per encoder forward (>= 1).
        epsilon: entropic regularisation of the OT problem (absolute, on the squared Euclidean cost), > 0.
        threshold: Sinkhorn stops once the L1 error of the pool marginal is below it, > 0.
        max_iterations: Sinkhorn iterations at most (>= 1).
        momentum: over-relaxation of every Sinkhorn update (OTT-JAX's ``Momentum(value=...)``), in (0, 2);
            1 = plain Sinkhorn.
        tile_size: pool rows per cost tile (>= 1); memory ``target rows x tile_size`` floats.
        cache_dir: where embeddings and potentials are cached; None = ``$LIT_FT_CACHE/got_d`` (``~/.cache/lit_ft``).
        device: where the encoder and the OT run; None = CUDA when available, else CPU.
        seed: seed of the ``max_target`` subset (>= 0).
    """

    technique_name = "ot_data_selection"

    def __init__(
        self,
        target: Any = "asdiv",
        k: int = 20000,
        max_target: int | None = None,
        text_fields: list[str] | None = None,
        encoder: str = "minilm-l6-v2",
        max_length: int = 256,
        normalize: bool = False,
        embed_batch_size: int = 64,
        epsilon: float = 0.1,
        threshold: float = 0.1,
        max_iterations: int = 2000,
        momentum: float = 1.3,
        tile_size: int = 2000,
        cache_dir: str | None = None,
        device: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        from lit_ft.data.sources import check_source

        targets = list(target) if isinstance(target, (list, tuple)) else [target]
        if not targets:
            raise ValueError(f"{_OWNER}: `target` must be a data source or a non-empty list of them, got {target!r}")
        for i, t in enumerate(targets):
            try:
                check_source("target" if len(targets) == 1 else f"target[{i}]", t)
            except ValueError as e:
                raise ValueError(f"{_OWNER}: {e}") from None
        self.targets = [str(t) if isinstance(t, os.PathLike) else t for t in targets]
        self.k = check_int(_OWNER, "k", k, minimum=1)
        self.max_target = check_int(_OWNER, "max_target", max_target, minimum=1, allow_none=True, null_means="all")
        self.text_fields = check_str_list(_OWNER, "text_fields", text_fields, allow_none=True,
                                          null_means="text, else prompt + completion, else messages")
        self.encoder = check_str(_OWNER, "encoder", encoder)
        self.max_length = check_int(_OWNER, "max_length", max_length, minimum=2)
        self.normalize = check_bool(_OWNER, "normalize", normalize)
        self.embed_batch_size = check_int(_OWNER, "embed_batch_size", embed_batch_size, minimum=1)
        self.epsilon = check_number(_OWNER, "epsilon", epsilon, low=0, low_open=True)
        self.threshold = check_number(_OWNER, "threshold", threshold, low=0, low_open=True)
        self.max_iterations = check_int(_OWNER, "max_iterations", max_iterations, minimum=1)
        self.momentum = check_number(_OWNER, "momentum", momentum, low=0, high=2, low_open=True, high_open=True)
        self.tile_size = check_int(_OWNER, "tile_size", tile_size, minimum=1)
        self.cache_dir = check_str(_OWNER, "cache_dir", cache_dir, allow_none=True)
        self.device = check_str(_OWNER, "device", device, allow_none=True)
        self.seed = check_int(_OWNER, "seed", seed, minimum=0)
        #: after setup: the kept rows' ``sample_idx`` (sorted), the pool size and the solve's diagnostics
        self.selected: list[int] | None = None
        self.pool_size: int | None = None
        self.ot: dict[str, Any] = {}
        self._datamodule: Any = None
        self._logged = False

    @property
    def state_key(self) -> str:
        return self._generate_state_key(target=repr(self.targets), k=self.k, encoder=self.encoder)

    # ------------------------------------------------------------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        dm = getattr(trainer, "datamodule", None)
        if dm is not None and dm is self._datamodule:
            return  # this datamodule already serves the selection
        examples, rows = self._pool(dm)
        texts = [row_text(rows[e["sample_idx"]], self.text_fields, f"training row {e['sample_idx']}")
                 for e in examples]
        if self.k > len(texts):
            raise ValueError(f"{_OWNER}: `k`={self.k} is larger than the pool: the DataModule has {len(texts)} "
                             f"training rows; choose k <= {len(texts)}")
        target = self._target_texts()
        order = self.rank(texts, target)
        keep = sorted(order[: self.k])
        self.selected = [int(examples[i]["sample_idx"]) for i in keep]
        self.pool_size = len(texts)
        dm._splits["train"] = [examples[i] for i in keep]
        self._datamodule = dm
        rank_zero_info(
            f"{_OWNER}: kept {self.k} of {len(texts)} training rows toward {len(target)} target rows (Sinkhorn: "
            f"{self.ot['iterations']} iterations, marginal error {self.ot['error']:.3g}"
            f"{'' if self.ot['converged'] else ' — NOT below threshold'}; OT cost {self.ot['cost']:.4g})")

    def rank(self, pool_texts: Sequence[str], target_texts: Sequence[str]) -> list[int]:
        """Pool indices ordered by calibrated gradient, most negative first (the selection is a prefix)."""
        from lit_ft.callbacks.data_selection._text_embedding import TextEmbedder

        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        root = Path(self.cache_dir) if self.cache_dir else _default_cache()
        embedder = TextEmbedder(self.encoder, root, max_length=self.max_length, batch_size=self.embed_batch_size,
                                normalize=self.normalize, device=device)
        key = _digest(embedder.key(pool_texts), embedder.key(target_texts), self.epsilon, self.threshold,
                      self.max_iterations, self.momentum)
        path = root / "ot" / f"{key}.pt"
        if path.is_file():
            saved = torch.load(path, map_location="cpu", weights_only=True)
        else:
            pool = embedder.embed(pool_texts, desc=f"{_OWNER}: embedding the pool")
            tgt = embedder.embed(target_texts, desc=f"{_OWNER}: embedding the target")
            bar = lambda it: progress(it, desc=f"{_OWNER}: Sinkhorn ({len(tgt)} x {len(pool)})",  # noqa: E731
                                      total=self.max_iterations + 1, unit="it")
            r: SinkhornResult = sinkhorn_potentials(
                tgt.to(device), pool.to(device), epsilon=self.epsilon, threshold=self.threshold,
                max_iterations=self.max_iterations, momentum=self.momentum, tile_size=self.tile_size, iterations=bar)
            saved = {"g": r.g.double().cpu(), "iterations": torch.tensor(r.iterations),
                     "error": torch.tensor(r.error), "converged": torch.tensor(r.converged),
                     "cost": torch.tensor(r.cost)}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(saved, tmp)
            os.replace(tmp, path)
        self.ot = {"iterations": int(saved["iterations"]), "error": float(saved["error"]),
                   "converged": bool(saved["converged"]), "cost": float(saved["cost"])}
        scores = calibrated_gradient(saved["g"])
        return torch.argsort(scores, stable=True).tolist()

    def _pool(self, dm: Any) -> tuple[list[dict], list[dict]]:
        """The DataModule's encoded training examples and its raw training rows (``sample_idx`` indexes them)."""
        from lit_ft.data._base import _TextDataModule
        from lit_ft.data._common import load_splits

        packed = type(dm).__name__ == "PackedTextDataModule"
        if not isinstance(dm, _TextDataModule) or packed:
            raise TypeError(f"{_OWNER} selects rows of the Trainer's DataModule: use lit_ft.data.SFTDataModule or "
                            f"ClassificationDataModule (as `data:` in the config, or trainer.fit(datamodule=...)); "
                            f"got {type(dm).__name__ if dm is not None else 'no DataModule'}")
        dm.setup("fit")
        examples = dm._examples("train")
        if not examples:
            raise ValueError(f"{_OWNER}: the pool is empty: the DataModule has no training rows")
        rows, _, _ = load_splits(dm.data, dm.val_data, dm.val_split, dm.seed)
        renames = getattr(dm, "_renames", {})  # SFTDataModule's prompt_key / completion_key / ...
        if renames and self.text_fields is None:
            rows = [{**r, **{std: r[key] for std, key in renames.items() if key in r}} for r in rows]
        return examples, rows

    def _target_texts(self) -> list[str]:
        from lit_ft.data._common import load_source

        rows: list[dict] = []
        for i, src in enumerate(self.targets):
            name = "target" if len(self.targets) == 1 else f"target[{i}]"
            try:
                got, _, _ = load_source(name, src)
            except ValueError as e:
                raise ValueError(f"{_OWNER}: {e}") from None
            rows.extend(got)
        if not rows:
            raise ValueError(f"{_OWNER}: `target` holds no rows ({self.targets!r})")
        if self.max_target is not None and self.max_target < len(rows):
            rows = [rows[i] for i in sorted(random.Random(self.seed).sample(range(len(rows)), self.max_target))]
        texts = [row_text(r, self.text_fields, f"target row {i}") for i, r in enumerate(rows)]
        if not any(t.strip() for t in texts):
            raise ValueError(f"{_OWNER}: `target` rows hold no text ({self.targets!r})")
        return texts

    # ------------------------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._logged or self.selected is None:
            return
        self._logged = True
        p = f"lit_ft/{self.technique_name}"
        pl_module.log(f"{p}/kept_fraction", len(self.selected) / max(1, self.pool_size or 1), on_step=True,
                      on_epoch=False)
        pl_module.log(f"{p}/ot_cost", self.ot.get("cost", float("nan")), on_step=True, on_epoch=False)
        pl_module.log(f"{p}/sinkhorn_iterations", float(self.ot.get("iterations", 0)), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"selected": list(self.selected or []), "pool_size": self.pool_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("selected")
        if self.selected is not None and saved and list(saved) != self.selected:
            raise RuntimeError(
                f"{_OWNER}: the checkpoint was trained on another selection ({len(saved)} rows of a pool of "
                f"{state_dict.get('pool_size')}) than this run made ({len(self.selected)} of {self.pool_size}): the "
                "pool, the target or an argument changed since; resume with the same data and arguments")


def _default_cache() -> Path:
    from lit_ft.assets import cache_dir

    return cache_dir() / "got_d"
