"""Packaged configs (lit_ft/config_files.py): `--config NAME` finds lit_ft/configs/NAME.yaml from any directory, a
real file always wins, an unknown name lists the packaged ones, `lit-ft configs` lists them; the repository's root
`configs` is the packaged folder. The installed-wheel run of the same is tests/test_wheel.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import lit_ft
from lit_ft.cli import main as console_main
from lit_ft.cli import run
from lit_ft.config_files import (
    CONFIG_DIR,
    UnknownConfigError,
    configs_table,
    packaged_configs,
    resolve_config,
    resolve_config_args,
)

ROOT = Path(__file__).resolve().parents[2]


def test_root_configs_is_the_packaged_folder():
    assert (ROOT / "configs").is_symlink()
    assert os.path.samefile(ROOT / "configs", CONFIG_DIR)
    assert CONFIG_DIR == Path(lit_ft.__file__).resolve().parent / "configs"


def test_packaged_configs_are_named_by_path_without_suffix():
    configs = packaged_configs()
    assert {"quickstart", "excess_loss", "rho1/reference", "rho1/excess_loss"} <= set(configs)
    assert configs["rho1/reference"] == CONFIG_DIR / "rho1" / "reference.yaml"
    assert all(p.is_file() and p.suffix == ".yaml" for p in configs.values())


@pytest.mark.parametrize("record", lit_ft.techniques(), ids=lambda r: r.name)
def test_every_technique_config_resolves_by_name_and_by_documented_path(record, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no configs/ here: both forms must come from the package
    for value in (record.name, record.config):
        resolved = Path(resolve_config(value))
        assert resolved.is_absolute() and os.path.samefile(resolved, ROOT / record.config), value


@pytest.mark.parametrize("value", ["quickstart", "quickstart.yaml", "configs/quickstart.yaml", "./configs/quickstart"])
def test_name_forms_resolve_to_the_packaged_file(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_config(value) == str(CONFIG_DIR / "quickstart.yaml")


def test_a_real_file_wins_over_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("seed_everything: 1\n")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "excess_loss.yaml").write_text("seed_everything: 2\n")
    assert resolve_config("quickstart") == "quickstart"
    assert resolve_config("configs/excess_loss.yaml") == "configs/excess_loss.yaml"
    assert resolve_config(str(tmp_path / "quickstart")) == str(tmp_path / "quickstart")


def test_inline_yaml_passes_through_untouched():
    inline = '{"trainer": {"max_steps": 3}}'
    assert resolve_config(inline) == inline
    assert resolve_config("trainer: {max_steps: 3}") == "trainer: {max_steps: 3}"


def test_unknown_name_error_names_it_and_lists_the_packaged_configs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownConfigError) as err:
        resolve_config("quikstart")
    message = str(err.value)
    assert "'quikstart'" in message and "quickstart" in message.split("Packaged configs", 1)[1]
    assert "rho1/reference" in message


def test_resolve_config_args_rewrites_only_config_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qs = str(CONFIG_DIR / "quickstart.yaml")
    argv = ["fit", "--config", "quickstart", "-c", "rho1/reference", "--config=lora",
            "--model.init_args.config=quickstart", "--trainer.max_steps=1", "quickstart"]
    assert resolve_config_args(argv) == [
        "fit", "--config", qs, "-c", str(CONFIG_DIR / "rho1" / "reference.yaml"),
        f"--config={CONFIG_DIR / 'lora.yaml'}", "--model.init_args.config=quickstart", "--trainer.max_steps=1",
        "quickstart"]


def test_run_loads_a_packaged_config_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        run(["fit", "--config", "quickstart", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    packaged = yaml.safe_load((CONFIG_DIR / "quickstart.yaml").read_text())
    assert printed["trainer"]["max_steps"] == packaged["trainer"]["max_steps"]
    assert printed["trainer"]["callbacks"][0]["class_path"] == "lit_ft.callbacks.QTuning"


def test_console_lists_configs_and_rejects_unknown_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    console_main(["configs"])
    out = capsys.readouterr().out
    assert out == configs_table() + "\n"
    assert "rho1/reference" in out and str(CONFIG_DIR / "rho1" / "reference.yaml") in out
    with pytest.raises(SystemExit, match="takes no arguments"):
        console_main(["configs", "extra"])
    with pytest.raises(SystemExit, match="no packaged config named 'nope'.*quickstart"):
        console_main(["fit", "--config", "nope"])
