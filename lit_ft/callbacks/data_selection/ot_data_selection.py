"""GOT-D: choose the training rows whose addition moves the training distribution closest to a target set, by the
gradient of the optimal-transport distance between the two (Kang et al., ICLR 2024)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.core.registry import technique
from lit_ft.data.ot_selection import (
    OTSelectionSettings,
    calibrated_gradient,
    check_selection_settings,
    keep_rows,
    row_text,
    select_rows,
)

__all__ = ["OTDataSelection", "calibrated_gradient", "row_text"]

_OWNER = "OTDataSelection"


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
    them). The Sinkhorn loop checkpoints its iterate every 10 iterations: interrupted, it resumes from there and
    ends with the same potentials, bit for bit, as an uninterrupted solve. The selection itself is
    :mod:`lit_ft.data.ot_selection`, shared with :class:`lit_ft.data.OTSelectedDataModule` (the same selection as a
    DataModule wrapper, for a run without this callback in the Trainer).

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
        self.settings: OTSelectionSettings = check_selection_settings(
            _OWNER, target=target, k=k, max_target=max_target, text_fields=text_fields, encoder=encoder,
            max_length=max_length, normalize=normalize, embed_batch_size=embed_batch_size, epsilon=epsilon,
            threshold=threshold, max_iterations=max_iterations, momentum=momentum, tile_size=tile_size,
            cache_dir=cache_dir, device=device, seed=seed)
        for name, value in vars(self.settings).items():  # self.k, self.targets, ...: the arguments as validated
            setattr(self, name, value)
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
        selection = select_rows(_OWNER, dm, self.settings)
        self.selected, self.pool_size, self.ot = selection.selected, selection.pool_size, selection.ot
        keep_rows(dm, selection)
        self._datamodule = dm
        rank_zero_info(selection.summary(_OWNER))

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

