"""The `lit-ft` CLI: every config in configs/ parses and round-trips through --print_config; the configs that belong
to no technique run 2 steps on a tiny model (each technique's own config runs in the contract suite,
tests/contract/); W&B offline receives the metrics; --help documents the lit_ft callbacks; `lit-ft techniques`
lists the registry."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lit_ft
from lit_ft.cli import main as console_main
from lit_ft.cli import run as main
from tests.config_runs import run_config_two_steps, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted(glob.glob(str(ROOT / "configs" / "*.yaml")))
# configs that no registered technique owns (a technique's config runs in tests/contract/test_contract.py)
TECHNIQUE_CONFIGS = {str(ROOT / record.config) for record in lit_ft.techniques()}
OTHER_CONFIGS = [c for c in CONFIGS if c not in TECHNIQUE_CONFIGS]


def test_configs_exist():
    names = {Path(c).name for c in CONFIGS}
    assert "quickstart.yaml" in names and "excess_loss.yaml" in names


def test_technique_configs_are_owned_by_registered_techniques():
    assert TECHNIQUE_CONFIGS <= set(CONFIGS), sorted(TECHNIQUE_CONFIGS - set(CONFIGS))
    assert {Path(c).name for c in OTHER_CONFIGS} == {"quickstart.yaml", "verbalizer.yaml", "configured_learning_rate.yaml",
                                                  "lora.yaml"}


@pytest.mark.parametrize("config", OTHER_CONFIGS, ids=[Path(c).stem for c in OTHER_CONFIGS])
def test_every_other_config_runs_two_steps_on_a_tiny_model(config, tmp_path, tiny_tokenizer_path):
    run_config_two_steps(config, tmp_path, tiny_tokenizer_path)


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
    cbs = yaml.safe_load(first)["trainer"]["callbacks"] or []  # none where the technique is the module itself
    assert all(cb["class_path"].startswith(("lit_ft.", "lightning.")) for cb in cbs)


def test_wandb_offline_receives_metrics_and_config(tmp_path, tiny_tokenizer_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = tiny_overrides(tmp_path, tiny_tokenizer_path)
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


def test_techniques_subcommand_lists_every_registered_technique(capsys):
    console_main(["techniques"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "class", "family", "arXiv", "config", "doc"]
    records = lit_ft.techniques()
    assert f"{len(records)} techniques" in lines[-1]
    for record in records:
        row = next(line for line in lines if line.split()[:1] == [record.name])
        assert row.split() == [record.name, record.cls.__name__, record.family, record.arxiv or "-", record.config,
                               record.doc]
        assert f"    paper: {record.paper}" in lines
    # listed by family then name
    assert [line.split()[0] for line in lines[2:-1:2]] == [r.name for r in records]
    assert lines.index(next(line for line in lines if line.startswith("excess_loss"))) < \
        lines.index(next(line for line in lines if line.startswith("freeze_layers")))


def test_techniques_subcommand_as_a_console_script():
    out = subprocess.run([sys.executable, "-m", "lit_ft.cli", "techniques"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ExcessLossSelection" in out.stdout and "2404.07965" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "lit_ft.cli", "techniques", "--json"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "takes no arguments" in bad.stderr
