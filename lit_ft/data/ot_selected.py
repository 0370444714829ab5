"""``OTSelectedDataModule``: GOT-D's selection (Kang et al., ICLR 2024, arXiv 2405.02774) as a DataModule: any lit-ft
text DataModule, serving only the ``k`` training rows that best pull its distribution toward a target set.

The same selection as the callback ``lit_ft.callbacks.OTDataSelection`` (both run
:func:`lit_ft.data.ot_selection.select_rows`), decided by the data instead of a callback in the Trainer.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_ft.data.ot_selection import OTSelection, check_pool_datamodule, check_selection_settings, keep_rows, \
    select_rows

__all__ = ["OTSelectedDataModule"]

_OWNER = "OTSelectedDataModule"


class OTSelectedDataModule(pl.LightningDataModule):
    """A lit-ft text DataModule restricted to the GOT-D selection of its training rows.

    At ``setup("fit")`` the wrapped DataModule is set up, its training rows (the candidate pool) and the ``target``
    rows are embedded, entropic OT is solved between them and the ``k`` rows with the most negative calibrated
    pool-side potential are kept (:mod:`lit_ft.data.ot_selection`; the ``OTDataSelection`` callback runs the same
    function with the same arguments and keeps the same rows). Training loaders serve only those rows;
    validation is untouched. Everything else — the validation / test loaders, ``tokenizer``, ``stats`` and any
    other attribute, the batch-transfer hooks — is the wrapped DataModule's.

    Caches are the callback's: embeddings in shards, the potentials, and the Sinkhorn iterate every 10 iterations,
    so a second run (or a resumed one) embeds and solves nothing, and an interrupted solve resumes where it stopped
    with the same result. The checkpoint stores the wrapped DataModule's state (its sampler position) and the kept
    rows; resuming on another selection is refused.

    Use it instead of the callback when the selection belongs to the data (a config whose ``data:`` is the selected
    pool, a DataModule handed to several Trainers, a run whose callbacks are fixed elsewhere); the callback when the
    data section must stay the plain pool.

    Args:
        datamodule: the pool: a lit-ft text DataModule (``SFTDataModule``, ``ClassificationDataModule``); in YAML a
            ``class_path`` / ``init_args`` mapping.
        target: the target data D_R: a .jsonl/.json/.parquet path, an asset name, a ``datasets`` object or a
            ``load_dataset`` spec dict — or a list of them (their rows are pooled).
        k: candidates kept (>= 1; at most the pool's size). Default 20000, the paper's GPT-2 detoxification budget.
        max_target: a seeded random subset of this many target rows (>= 1); None = all.
        text_fields: the row fields embedded (joined by newlines), for pool and target; None = ``text``, else
            ``prompt`` + ``completion``, else the chat messages' contents.
        encoder: HF encoder folder or model asset name (mean-pooled last hidden states).
        max_length: encoder tokens per text (>= 2).
        normalize: L2-normalise the embeddings (the authors do not: default False).
        embed_batch_size: texts per encoder forward (>= 1).
        epsilon: entropic regularisation of the OT problem (absolute, on the squared Euclidean cost), > 0.
        threshold: Sinkhorn stops once the L1 error of the pool marginal is below it, > 0.
        max_iterations: Sinkhorn iterations at most (>= 1).
        momentum: over-relaxation of every Sinkhorn update, in (0, 2); 1 = plain Sinkhorn.
        tile_size: pool rows per cost tile (>= 1); memory ``target rows x tile_size`` floats.
        cache_dir: where embeddings, potentials and the Sinkhorn iterate are cached; None =
            ``$LIT_FT_CACHE/got_d``.
        device: where the encoder and the OT run; None = CUDA when available, else CPU.
        seed: seed of the ``max_target`` subset (>= 0).
    """

    def __init__(
        self,
        datamodule: pl.LightningDataModule,
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
        check_pool_datamodule(_OWNER, datamodule, "as `datamodule`: a class_path / init_args mapping in YAML")
        self.datamodule = datamodule
        self.settings = check_selection_settings(
            _OWNER, target=target, k=k, max_target=max_target, text_fields=text_fields, encoder=encoder,
            max_length=max_length, normalize=normalize, embed_batch_size=embed_batch_size, epsilon=epsilon,
            threshold=threshold, max_iterations=max_iterations, momentum=momentum, tile_size=tile_size,
            cache_dir=cache_dir, device=device, seed=seed)
        self.prepare_data_per_node = datamodule.prepare_data_per_node
        #: after setup("fit"): the selection (kept rows' ``sample_idx``, pool size, the solve's diagnostics)
        self.selection: OTSelection | None = None

    # the wrapped DataModule reads its Trainer (sampler progress and world size, for resume): it gets the same one
    @property
    def trainer(self) -> Any:
        return self.__dict__.get("_trainer")

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        self.__dict__["_trainer"] = trainer
        inner = self.__dict__.get("datamodule")
        if inner is not None:
            inner.trainer = trainer

    def __getattr__(self, name: str) -> Any:
        """Attributes this wrapper does not have (``tokenizer``, ``stats``, ``data``, ...) are the wrapped one's."""
        inner = self.__dict__.get("datamodule")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    @property
    def selected(self) -> list[int] | None:
        """The kept rows' ``sample_idx`` (sorted); None before ``setup("fit")``."""
        return None if self.selection is None else self.selection.selected

    @property
    def pool_size(self) -> int | None:
        return None if self.selection is None else self.selection.pool_size

    @property
    def ot(self) -> dict[str, Any]:
        """The solve's diagnostics: ``iterations``, ``error``, ``converged``, ``cost``."""
        return {} if self.selection is None else dict(self.selection.ot)

    # ------------------------------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.datamodule.setup(stage)
        if stage == "fit":
            self._select()

    def _select(self) -> None:
        if self.selection is not None:
            return  # selected once: a second fit with this DataModule trains on the same rows
        self.selection = select_rows(_OWNER, self.datamodule, self.settings)
        keep_rows(self.datamodule, self.selection)
        rank_zero_info(self.selection.summary(_OWNER))

    def teardown(self, stage: str) -> None:
        self.datamodule.teardown(stage)

    def train_dataloader(self) -> Any:
        self._select()
        return self.datamodule.train_dataloader()

    def val_dataloader(self) -> Any:
        return self.datamodule.val_dataloader()

    def test_dataloader(self) -> Any:
        return self.datamodule.test_dataloader()

    def predict_dataloader(self) -> Any:
        return self.datamodule.predict_dataloader()

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_before_batch_transfer(batch, dataloader_idx)

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int) -> Any:
        return self.datamodule.transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.datamodule.on_after_batch_transfer(batch, dataloader_idx)

    # ------------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The wrapped DataModule's state (its sampler position) and the kept rows."""
        return {"datamodule": self.datamodule.state_dict(), "selected": list(self.selected or []),
                "pool_size": self.pool_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("selected")
        if self.selected is not None and saved and list(saved) != self.selected:
            raise RuntimeError(
                f"{_OWNER}: the checkpoint was trained on another selection ({len(saved)} rows of a pool of "
                f"{state_dict.get('pool_size')}) than this run made ({len(self.selected)} of {self.pool_size}): the "
                "pool, the target or an argument changed since; resume with the same data and arguments")
        self.datamodule.load_state_dict(state_dict.get("datamodule") or {})
