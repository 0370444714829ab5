"""core/pictures: a figure saved as PNG under the run's log dir (rank 0), and logged to W&B when attached."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import lightning.pytorch as pl

from lit_ft.core.pictures import figure_path, log_figure, new_figure


def _figure():
    fig = new_figure(3, 2)
    fig.add_subplot(1, 1, 1).plot([0, 1, 2], [1, 0, 1])
    return fig


def test_log_figure_writes_a_png_under_the_log_dir(tmp_path):
    trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    path = log_figure(trainer, _figure(), "demo", "curve", step=7)
    assert path == figure_path(str(tmp_path), "demo", "curve", 7)
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_log_figure_logs_the_file_to_wandb_when_attached(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    wandb = mock.MagicMock(spec=WandbLogger)
    wandb.save_dir = str(tmp_path)  # Trainer.log_dir reads the first logger's save_dir
    trainer = pl.Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    with mock.patch.object(pl.Trainer, "loggers", new_callable=mock.PropertyMock, return_value=[wandb]):
        path = log_figure(trainer, _figure(), "demo", "curve", step=3)
    wandb.log_image.assert_called_once_with(key="lit_ft/demo/curve", images=[path], step=3)
    assert path.startswith(str(tmp_path)) and Path(path).is_file()
