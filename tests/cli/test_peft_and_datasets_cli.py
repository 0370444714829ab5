"""`lit-ft fit` with data and models as users hold them: configs/lora.yaml (a PEFT LoRA adapter declared in YAML)
trains only the adapter; a Parquet file through a ``datasets.load_dataset`` spec given on the command line and a
``datasets.Dataset`` object given to the CLI in Python each train the tiny model for 2 steps."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

import lit_ft.modules.causal_lm as causal_lm
from lit_ft.cli import run as cli_run
from tests.config_runs import run_config_two_steps, tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
LORA = str(ROOT / "configs" / "lora.yaml")
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def test_lora_config_trains_only_the_adapter(tmp_path, tiny_tokenizer_path, monkeypatch):
    pytest.importorskip("peft", reason="the optional `peft` extra is not installed")
    seen: dict = {}
    apply_peft = causal_lm.apply_peft

    def recording_apply_peft(*args, **kwargs):
        model = apply_peft(*args, **kwargs)
        # the weights right after the adapter is added, i.e. before training; the model object is the one trained
        seen["initial"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["model"] = model
        return model

    monkeypatch.setattr(causal_lm, "apply_peft", recording_apply_peft)
    header = run_config_two_steps(LORA, tmp_path, tiny_tokenizer_path)
    assert "lr-AdamW" in header  # the config's LearningRateMonitor
    saved = next((tmp_path / "logs").rglob("config.yaml")).read_text()
    assert "peft_type: LORA" in saved  # the resolved config keeps the adapter

    model, initial = seen["model"], seen["initial"]
    lora = {n for n in initial if ".lora_A." in n or ".lora_B." in n}
    assert lora and all(".q_proj." in n or ".v_proj." in n for n in lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), initial[n])}
    assert trainable == lora
    assert changed == lora  # every adapter tensor moved in 2 AdamW steps, no base weight did


def _fit(args: list[str] | dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_run(args)
    return out.getvalue()


def _parquet(tmp_path: Path, name: str, jsonl: str) -> str:
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")
    rows = [json.loads(line) for line in open(jsonl)]
    path = tmp_path / name
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


def test_parquet_spec_on_the_command_line(tmp_path, tiny_tokenizer_path, monkeypatch):
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets"))
    args = tiny_overrides(tmp_path, tiny_tokenizer_path)  # writes train.jsonl / val.jsonl into tmp_path
    spec = {"path": "parquet", "data_files": {"train": _parquet(tmp_path, "train.parquet", str(tmp_path / "train.jsonl")),
                                              "validation": _parquet(tmp_path, "val.parquet", str(tmp_path / "val.jsonl"))}}
    args = [a for a in args if not a.startswith(("--data.init_args.data=", "--data.init_args.val_data="))]
    printed = _fit(["fit", f"--config={QUICKSTART}", *args, f"--data.init_args.data={json.dumps(spec)}"])
    assert "lit-ft fit finished" in printed
    metrics = next((tmp_path / "logs").rglob("metrics.csv")).read_text()
    assert "train/loss" in metrics.splitlines()[0] and "val/loss" in metrics.splitlines()[0]
    assert "data/train_samples" in metrics.splitlines()[0]


def test_dataset_object_given_to_the_cli_in_python(tmp_path, tiny_tokenizer_path, monkeypatch):
    """A notebook user: LightningCLI's args as a dict, with a datasets.Dataset as the data."""
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra is not installed")
    import yaml

    args = tiny_overrides(tmp_path, tiny_tokenizer_path)
    train = datasets.Dataset.from_list([json.loads(line) for line in open(tmp_path / "train.jsonl")])
    config = yaml.safe_load(Path(QUICKSTART).read_text())
    config["trainer"]["callbacks"] = []  # the 2-step run needs no technique
    for arg in args:  # the same overrides, as nested keys
        key, value = arg[2:].split("=", 1)
        node = config
        *parents, last = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[last] = yaml.safe_load(value)
    config["data"]["init_args"]["data"] = train
    cli = cli_run({"fit": config})
    dm = cli.datamodule
    assert dm.data is train and dm.stats["train_samples"] == len(train)
    assert cli.trainer.global_step == 2
