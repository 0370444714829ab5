"""The `lit-ft` CLI: every config in configs/ parses, round-trips through --print_config and runs 2 steps on a
tiny model; W&B offline receives the metrics; --help documents the lit_ft callbacks."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lit_ft.cli import run as main
from lit_ft.testing import tiny_llama_config, write_tiny_classification_jsonl, write_tiny_sft_jsonl

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))


def _tiny_overrides(tmp_path: Path, tokenizer: str, config: str | None = None) -> list[str]:
    # classification configs (ClassificationDataModule) get {text, label} rows and no generation arguments
    classify = config is not None and "ClassificationDataModule" in Path(config).read_text()
    write = write_tiny_classification_jsonl if classify else write_tiny_sft_jsonl
    train = write(tmp_path / "train.jsonl", n=24)
    val = write(tmp_path / "val.jsonl", n=8, seed=1)
    cfg = tiny_llama_config(vocab_size=384)
    generation = [] if classify else ["--model.init_args.eval_exact_match=4", "--model.init_args.max_new_tokens=3"]
    return [
        "--trainer.max_steps=2",
        "--trainer.val_check_interval=2",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        f"--model.init_args.model_config={json.dumps(cfg)}",
        *generation,
        f"--data.init_args.data={train}",
        f"--data.init_args.val_data={val}",
        f"--data.init_args.tokenizer={tokenizer}",
        "--data.init_args.batch_size=4",
        "--data.init_args.max_val_samples=null",
    ]


def _config_extras(config: str, tmp_path: Path) -> list[str]:
    """Per-technique overrides for the 2-step run: a prompt artifact PANDA reads (a tiny source prompt for the tiny
    model), ProMoT switches to stage 2 within the 2 steps, their artifacts go to tmp_path."""
    text = Path(config).read_text()
    if "lit_ft.callbacks.PANDA" in text:
        from lit_ft.callbacks.prompt.prompt_tuning import PromptEmbedding
        from lit_ft.core.prompts import ModelGeometry, save_prompt

        c = tiny_llama_config(vocab_size=384)
        geometry = ModelGeometry(c["hidden_size"], c["num_hidden_layers"], c["num_key_value_heads"],
                                 c["hidden_size"] // c["num_attention_heads"], c["vocab_size"])
        source = save_prompt(PromptEmbedding(geometry, 20), tmp_path / "source_prompt")
        return [f"--trainer.callbacks.init_args.source_prompt={source}",
                f"--trainer.callbacks.init_args.save_dir={tmp_path / 'prompt'}"]
    if "lit_ft.callbacks.ProMoT" in text:
        return ["--trainer.callbacks.init_args.prompt_steps=1",
                f"--trainer.callbacks.init_args.save_dir={tmp_path / 'prompt'}"]
    return []


def test_configs_exist():
    names = {Path(c).name for c in CONFIGS}
    assert "quickstart.yaml" in names and "excess_loss.yaml" in names


@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).stem for c in CONFIGS])
def test_every_config_runs_two_steps_on_a_tiny_model(config, tmp_path, tiny_tokenizer_path, capsys):
    main(["fit", f"--config={config}", *_tiny_overrides(tmp_path, tiny_tokenizer_path, config),
          *_config_extras(config, tmp_path)])
    out = capsys.readouterr().out
    assert "lit-ft fit finished" in out and "logs (CSVLogger)" in out
    metrics = list((tmp_path / "logs").rglob("metrics.csv"))
    assert metrics, "CSV metrics were not written"
    header = metrics[0].read_text().splitlines()[0]
    assert "train/loss" in header and "val/loss" in header
    assert "data/train_samples" in header and "data/truncated_samples" in header  # truncation is logged
    if "ExcessLossSelection" in Path(config).read_text():
        assert "lit_ft/excess_loss/kept_fraction" in header
    if "lit_ft.callbacks.PANDA" in Path(config).read_text():
        assert "lit_ft/panda/kd_loss" in header and "lit_ft/panda/beta" in header
    if "lit_ft.callbacks.ProMoT" in Path(config).read_text():
        assert "lit_ft/promot/stage" in header
    saved = list((tmp_path / "logs").rglob("config.yaml"))
    assert saved, "resolved config was not saved to the log dir"


@pytest.mark.parametrize("config", CONFIGS, ids=[Path(c).stem for c in CONFIGS])
def test_print_config_round_trips(config, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", f"--config={config}", "--print_config"])
    first = capsys.readouterr().out
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", f"--config={dumped}", "--print_config"])
    second = capsys.readouterr().out
    assert yaml.safe_load(first) == yaml.safe_load(second)
    cbs = yaml.safe_load(first)["trainer"]["callbacks"]
    assert all(cb["class_path"].startswith(("lit_ft.", "lightning.")) for cb in cbs)


def test_wandb_offline_receives_metrics_and_config(tmp_path, tiny_tokenizer_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = _tiny_overrides(tmp_path, tiny_tokenizer_path)
    args = [a for a in args if not a.startswith("--trainer.logger")]
    cli = main([
        "fit", f"--config={ROOT / 'configs' / 'excess_loss.yaml'}", *args,
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.offline=true", f"--trainer.logger.save_dir={tmp_path}", "--trainer.logger.project=lit-ft-test",
    ])
    import time

    cli.trainer.logger.experiment.finish()
    runs = list(tmp_path.rglob("offline-run-*"))
    assert runs, f"no offline run under {tmp_path}"
    deadline = time.time() + 30  # the W&B service flushes its run file asynchronously
    while True:
        blobs = b"".join(p.read_bytes() for p in runs[0].rglob("*.wandb"))
        if b"train/loss" in blobs or time.time() > deadline:
            break
        time.sleep(0.5)
    for name in (b"train/loss", b"lit_ft/excess_loss/kept_fraction", b"lit_ft_config", b"ExcessLossSelection"):
        assert name in blobs, f"{name!r} not found in the offline W&B run"


def test_help_documents_lit_ft_callbacks():
    out = subprocess.run([sys.executable, "-m", "lit_ft.cli", "fit", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    assert "ExcessLossSelection" in out.stdout and "keep_ratio" in out.stdout
    assert "fraction of valid tokens kept per step" in " ".join(out.stdout.split())


def test_import_lit_ft_does_not_import_triton():
    # (lightning itself imports triton through torch._dynamo, so lit_ft.modules/callbacks cannot promise this;
    # the package, its contracts and its kernels do not pull it in)
    code = "import sys, lit_ft, lit_ft.core, lit_ft.kernels, lit_ft.assets; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
