"""What `lit-ft` prints: --quick shrinks any config and says what it changed, the progress bar never shows
"Epoch 0/-2", dependency noise is dropped (lit_ft's own warnings are not), and each technique says which
integration level it runs at."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from jsonargparse import Namespace

from lit_ft.cli import run as cli_run
from lit_ft.cli_output import StepProgressBar, quiet_dependencies
from lit_ft.cli_quick import QUICK_STEPS, apply_quick_mode
from tests.config_runs import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
#: the step / validation / logging overrides of the 2-step runs: --quick has to provide these itself
_SIZE_FLAGS = ("--trainer.max_steps", "--trainer.val_check_interval", "--trainer.log_every_n_steps",
               "--trainer.limit_val_batches", "--trainer.enable_progress_bar")


def _fit_config(**trainer) -> Namespace:
    t = dict(max_steps=300, val_check_interval=50, check_val_every_n_epoch=1, limit_val_batches=None,
             num_sanity_val_steps=2, log_every_n_steps=10)
    t.update(trainer)
    return Namespace(trainer=Namespace(**t),
                     model=Namespace(class_path="m", init_args=Namespace(eval_exact_match=200, max_new_tokens=64)),
                     data=Namespace(class_path="d", init_args=Namespace(max_val_samples=200, batch_size=8)))


def test_apply_quick_mode_shrinks_only_what_costs_time():
    cfg = _fit_config()
    changes = apply_quick_mode(cfg)
    t = cfg.trainer
    assert (t.max_steps, t.val_check_interval, t.check_val_every_n_epoch) == (QUICK_STEPS, QUICK_STEPS, None)
    assert (t.limit_val_batches, t.num_sanity_val_steps, t.log_every_n_steps) == (2, 0, 1)
    assert cfg.model.init_args.eval_exact_match == 4 and cfg.model.init_args.max_new_tokens == 64
    assert cfg.data.init_args.max_val_samples == 16 and cfg.data.init_args.batch_size == 8
    assert "trainer.max_steps: 300 -> 5" in changes and "model.init_args.eval_exact_match: 200 -> 4" in changes
    # a run shorter than the quick one, generation off and "all" held-out rows are the config's choice: kept
    small = _fit_config(max_steps=3)
    small.model.init_args.eval_exact_match = 0
    small.data.init_args.max_val_samples = None
    apply_quick_mode(small)
    assert small.trainer.max_steps == 3 and small.trainer.val_check_interval == 3
    assert small.model.init_args.eval_exact_match == 0 and small.data.init_args.max_val_samples is None
    epochs_only = _fit_config(max_steps=-1)
    apply_quick_mode(epochs_only)
    assert epochs_only.trainer.max_steps == QUICK_STEPS


def test_quick_flag_runs_a_technique_config_and_logs_its_metrics(tmp_path, tiny_tokenizer_path):
    config = str(ROOT / "configs" / "key_token_weighting.yaml")
    overrides = [o for o in tiny_overrides(tmp_path, tiny_tokenizer_path, config) if not o.startswith(_SIZE_FLAGS)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli = cli_run(["fit", f"--config={config}", *overrides, "--trainer.enable_progress_bar=false", "--quick"])  # bare, as the README
    printed = out.getvalue()
    assert "lit-ft --quick: trainer.max_steps:" in printed and "lit-ft fit finished" in printed, printed[-1500:]
    assert cli.trainer.global_step == QUICK_STEPS
    header = next((tmp_path / "logs").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "val/loss" in header and any(k.startswith("lit_ft/key_token_weighting/") for k in header.split(","))


def test_progress_bar_never_says_epoch_minus_two():
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=-1, max_steps=30)
    assert bar._get_train_description(0).strip() == "Epoch 0 · max_steps 30"
    bar._trainer = SimpleNamespace(max_epochs=10, max_steps=-1)
    assert bar._get_train_description(3).strip() == "Epoch 3/9"


def test_cli_installs_the_bar_unless_the_user_chose_one(tmp_path, tiny_tokenizer_path):
    config = str(ROOT / "configs" / "lora.yaml")
    overrides = [o for o in tiny_overrides(tmp_path, tiny_tokenizer_path, config)
                 if not o.startswith("--trainer.enable_progress_bar")]
    with contextlib.redirect_stdout(io.StringIO()):
        ours = cli_run(["fit", f"--config={config}", *overrides, "--trainer.max_steps=1"])
        theirs = cli_run(["fit", f"--config={config}", *overrides, "--trainer.max_steps=1",
                          "--trainer.callbacks+=lightning.pytorch.callbacks.TQDMProgressBar"])
    assert type(ours.trainer.progress_bar_callback) is StepProgressBar
    assert type(theirs.trainer.progress_bar_callback).__name__ == "TQDMProgressBar"


def test_quiet_dependencies_drops_their_noise_not_ours(caplog):
    from lightning.pytorch.utilities import rank_zero_info

    quiet_dependencies()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_dependencies()  # re-install after simplefilter reset the list
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("lit_ft: something about your run", UserWarning)
    assert [str(w.message) for w in seen] == ["lit_ft: something about your run"]
    with caplog.at_level(logging.INFO):
        rank_zero_info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        rank_zero_info("GPU available: False")
    messages = [r.getMessage() for r in caplog.records]
    assert "GPU available: False" in messages and not [m for m in messages if m.startswith("💡")]


def test_attach_says_which_level(caplog):
    import lightning.pytorch as pl

    from lit_ft.callbacks import ExcessLossSelection
    from lit_ft.modules import CausalLMModule
    from tests.helpers import ListDataModule, PlainHFModule, quiet_trainer, tiny_config

    with caplog.at_level(logging.INFO):
        quiet_trainer([ExcessLossSelection(reference="initial")], max_steps=1).fit(
            CausalLMModule(model_config=tiny_config()), datamodule=ListDataModule(n_batches=1))
        quiet_trainer([ExcessLossSelection(reference="initial")], max_steps=1).fit(
            PlainHFModule(), datamodule=ListDataModule(n_batches=1))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "ExcessLossSelection: level 3 (the module's token loss" in text and "chosen for CausalLMModule" in text
    assert "ExcessLossSelection: level 2 (the HF model's loss_function" in text and "chosen for PlainHFModule" in text


def test_closing_summary_names_the_artifacts(tmp_path, tiny_tokenizer_path):
    config = str(ROOT / "configs" / "linear_adapters.yaml")
    overrides = tiny_overrides(tmp_path, tiny_tokenizer_path, config)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_run(["fit", f"--config={config}", *overrides, "--trainer.callbacks.save_dir=adapters_out"])
    printed = out.getvalue()
    assert f"artifact (LinearAdapters): {tmp_path / 'adapters_out'}" in printed, printed[-1500:]
    assert (tmp_path / "adapters_out" / "adapters.safetensors").is_file()
