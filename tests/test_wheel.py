"""lit-ft as an installed wheel, outside the repository: the sdist and wheel ship every packaged config, and from a
working directory outside the checkout the installed ``lit-ft`` lists the techniques and configs, runs a technique's
config by name for 2 steps on tiny data and runs the quickstart's first step.

How: the source (pyproject.toml, README.md, lit_ft/) is copied to tmp_path and built there (the build writes
``build/`` and ``*.egg-info`` next to the source, never into the repository): an sdist with setuptools' PEP 517 hook,
then the wheel from the unpacked sdist with ``pip wheel --no-deps --no-build-isolation --no-index`` (so the wheel
proves the sdist is complete; no network). A fresh venv (``--without-pip``) gets the wheel with ``pip --python ...
install --no-deps``; only then a ``.pth`` file in its site-packages adds the test interpreter's site-packages, so
torch, Lightning and transformers are reused instead of reinstalled (that directory also holds the editable lit_ft,
but a plain ``.pth`` line runs none of its ``.pth`` hooks and comes after the venv's own site-packages, so
``import lit_ft`` finds the wheel's copy, which the test asserts).

The quickstart step uses the real SmolLM2 and ASDiv when they are already in the lit_ft.assets cache (with
``LIT_FT_OFFLINE=1``: never a download) and the hub-free tiny model and data of lit_ft.testing otherwise; the test's
id says which ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch

import lit_ft
from lit_ft import assets
from lit_ft.config_files import packaged_configs
from tests.config_runs import tiny_overrides

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEPS_SITE = Path(torch.__file__).resolve().parents[1]  # the site-packages holding lit_ft's dependencies
EXPECTED_CONFIGS = {f"lit_ft/configs/{name}.yaml" for name in packaged_configs()}
QUICKSTART_ASSETS = ("smollm2-135m-instruct", "asdiv", "asdiv-val")
REAL_QUICKSTART = all(assets.is_cached(name) for name in QUICKSTART_ASSETS)
TECHNIQUE = "freeze_layers"  # any technique's config name; its 2-step run is the contract suite's, here installed


def _run(cmd: list[str], cwd: Path, timeout: int = 180) -> str:
    """Run ``cmd`` with one intra-op thread, no downloads and no PYTHONPATH leaking the checkout; return stdout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS="1", LIT_FT_OFFLINE="1", PYTHONNOUSERSITE="1")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """sdist and wheel built from a copy of the source, and a venv with the wheel installed."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "lit_ft", src / "lit_ft", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = base / "dist"
    hook = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    sdist = dist / _run([sys.executable, "-c", hook], cwd=src).strip().splitlines()[-1]
    with tarfile.open(sdist) as t:
        t.extractall(base / "unpacked", filter="data")
    (unpacked,) = (base / "unpacked").iterdir()
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
          "-q", "-w", str(dist), str(unpacked)], cwd=base)
    (wheel,) = dist.glob("*.whl")

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=base)
    python = venv / "bin" / "python"
    # the .pth comes after the install: pip would otherwise see the editable lit_ft of DEPS_SITE as installed
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--no-cache-dir",
          "-q", str(wheel)], cwd=base)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(_run([str(python), "-c", purelib], cwd=base).strip())
    (site / "_lit_ft_test_deps.pth").write_text(f"{DEPS_SITE}\n")
    work = base / "elsewhere"  # the working directory of every run: outside the repository, no configs/ in it
    work.mkdir()
    return {"sdist": sdist, "wheel": wheel, "venv": venv, "python": python, "lit_ft": venv / "bin" / "lit-ft",
            "work": work}


def test_sdist_and_wheel_ship_every_config(built):
    with zipfile.ZipFile(built["wheel"]) as z:
        in_wheel = {n for n in z.namelist() if n.startswith("lit_ft/configs/")}
    assert in_wheel == EXPECTED_CONFIGS
    with tarfile.open(built["sdist"]) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if n.endswith(".yaml")}
    assert in_sdist == EXPECTED_CONFIGS


def test_installed_wheel_is_what_runs_outside_the_repo(built):
    work, venv = built["work"], built["venv"].resolve()
    # where `import lit_ft` comes from (lit_ft.__file__), without paying for the import itself
    where = "import importlib.util; print(importlib.util.find_spec('lit_ft').origin)"
    imported = Path(_run([str(built["python"]), "-c", where], cwd=work).strip())
    assert imported.resolve().is_relative_to(venv), imported
    assert not imported.resolve().is_relative_to(ROOT)
    listing = _run([str(built["lit_ft"]), "configs"], cwd=work).splitlines()
    paths = dict(line.split(None, 1) for line in listing[:-1])
    assert set(paths) == set(packaged_configs())
    assert all(Path(p).resolve().is_relative_to(venv) and Path(p).is_file() for p in paths.values()), paths
    techniques = _run([str(built["lit_ft"]), "techniques"], cwd=work)
    for record in lit_ft.techniques():
        assert f"\n{record.name} " in techniques, record.name


def _fit(built, config: str, overrides: list[str], logs: Path) -> str:
    """``lit-ft fit --config <config> <overrides>`` in the outside working directory; returns the metrics.csv header
    (``logs``: the CSV logger's save_dir that ``overrides`` set)."""
    out = _run([str(built["lit_ft"]), "fit", "--config", config, *overrides], cwd=built["work"])
    assert "=== lit-ft fit finished ===" in out, out[-2000:]
    (metrics,) = logs.rglob("metrics.csv")
    return metrics.read_text().splitlines()[0]


def test_installed_technique_config_runs_two_steps(built, tmp_path, tiny_tokenizer_path):
    header = _fit(built, TECHNIQUE, tiny_overrides(tmp_path, tiny_tokenizer_path), tmp_path / "logs")
    assert "train/loss" in header and "val/loss" in header


@pytest.mark.parametrize("model", ["real" if REAL_QUICKSTART else "tiny"])
def test_installed_quickstart_first_step(built, tmp_path, tiny_tokenizer_path, model):
    if model == "real":  # the real model and data from the cache; short sequences and small batches for speed
        shrink = ["--model.init_args.eval_exact_match=0", "--data.init_args.batch_size=4",
                  "--data.init_args.eval_batch_size=2", "--data.init_args.max_length=64",
                  "--data.init_args.max_val_samples=2",
                  f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}"]
    else:  # not cached: the hub-free tiny Llama, tokenizer and JSONL data of lit_ft.testing
        shrink = tiny_overrides(tmp_path, tiny_tokenizer_path)
    fast = ["--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.limit_val_batches=1",
            "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.callbacks.init_args.plot_every_n_steps=0", "--model.init_args.eval_before_training=false"]
    header = _fit(built, "quickstart", [*shrink, *fast], tmp_path / "logs")  # later overrides win
    assert "train/loss" in header and "lit_ft/qtuning/" in header, header
    (saved,) = (tmp_path / "logs").rglob("config.yaml")
    resolved = saved.read_text()
    assert "lit_ft.callbacks.QTuning" in resolved and "max_steps: 1" in resolved
    # the real run loads the named model; the tiny one builds the model from model_config instead
    assert ("model_config: null" in resolved) == (model == "real")
