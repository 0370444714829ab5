"""Run a ``configs/*.yaml`` through ``lit-ft fit`` for 2 steps on a tiny model (tiny tokenizer, JSONL data, Llama).

Shared by ``tests/cli/test_cli.py`` (configs that belong to no technique: quickstart, verbalizer) and the contract
suite (``tests/contract/``: each technique's own config)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from lit_ft.cli import run as cli_run
from lit_ft.testing import tiny_llama_config, write_tiny_classification_jsonl, write_tiny_sft_jsonl


def tiny_overrides(tmp_path: Path, tokenizer: str, config: str | None = None) -> list[str]:
    """Command-line overrides that shrink a config to 2 steps on a tiny model and tiny JSONL data in ``tmp_path``."""
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


def config_extras(config: str, tmp_path: Path) -> list[str]:
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
    if "lit_ft.callbacks.ForgettingMonitor" in text:  # tiny held-out tasks instead of the real assets
        gen = write_tiny_sft_jsonl(tmp_path / "fm_gen.jsonl", n=6, seed=5)
        cls = write_tiny_classification_jsonl(tmp_path / "fm_cls.jsonl", n=6, seed=6)
        return [f"--trainer.callbacks.init_args.tasks={json.dumps([gen, cls])}",
                "--trainer.callbacks.init_args.max_samples=4"]
    if "lit_ft.callbacks.TokenElimination" in text:  # long-context settings scaled to the tiny model and data
        return ["--data.init_args.text_key=completion", "--data.init_args.seq_len=32",
                "--trainer.callbacks.init_args.min_seq_len=1", "--trainer.callbacks.init_args.segment_size=8",
                "--trainer.callbacks.init_args.dense_layers=1", "--trainer.callbacks.init_args.plot_every_n_steps=1"]
    if "lit_ft.callbacks.TokenRelationDistillation" in text:  # a tiny teacher instead of the MiniLM asset
        from tests.callbacks.trd_teacher import make_tiny_teacher

        return [f"--trainer.callbacks.init_args.teacher={make_tiny_teacher(tmp_path / 'trd_teacher')}",
                "--trainer.callbacks.init_args.projector_dim=16"]
    if "lit_ft.callbacks.OTDataSelection" in text:  # a tiny random encoder and target instead of MiniLM and ASDiv
        from tests.callbacks.got_d_helpers import files

        return [f"--trainer.callbacks.init_args.target={files()['target']}",
                f"--trainer.callbacks.init_args.encoder={files()['encoder']}", "--trainer.callbacks.init_args.k=12",
                f"--trainer.callbacks.init_args.cache_dir={tmp_path / 'got_d'}"]
    if "lit_ft.callbacks.FeedbackLoop" in text:  # 6 tiny problems instead of the HumanEval asset
        from tests.data.feedback_problems import write_tiny_problems

        return [f"--data.init_args.problems={write_tiny_problems(tmp_path / 'problems.jsonl')}",
                "--data.init_args.num_eval_problems=2", "--data.init_args.max_train_problems=null"]
    if "lit_ft.data.PreferenceDataModule" in text:  # preference pairs instead of prompt/completion rows
        from lit_ft.testing import write_tiny_preference_jsonl

        return [f"--data.init_args.data={write_tiny_preference_jsonl(tmp_path / 'pairs.jsonl', n=24)}",
                f"--data.init_args.val_data={write_tiny_preference_jsonl(tmp_path / 'pairs_val.jsonl', n=8, seed=1)}"]
    if "lit_ft.callbacks.ProMoT" in text:
        return ["--trainer.callbacks.init_args.prompt_steps=1",
                f"--trainer.callbacks.init_args.save_dir={tmp_path / 'prompt'}"]
    if "lit_ft.callbacks.BlackBoxPromptLearning" in text:  # candidates and reliable set sized to 24 tiny texts
        return ["--model.init_args.num_candidates=6", "--model.init_args.num_samples=2",
                "--model.init_args.prompt_length=3", "--model.init_args.reliable_per_class=2"]
    return []


def run_config_two_steps(config: str, tmp_path: Path, tokenizer: str) -> str:
    """``lit-ft fit --config <config>`` for 2 steps with validation; asserts the run finished, wrote CSV metrics
    (train/val loss, data statistics) and saved the resolved config. Returns the metrics.csv header."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        cli_run(["fit", f"--config={config}", *tiny_overrides(tmp_path, tokenizer, config),
                 *config_extras(config, tmp_path)])
    printed = out.getvalue()
    assert "lit-ft fit finished" in printed and "logs (CSVLogger)" in printed, printed[-2000:]
    metrics = list((tmp_path / "logs").rglob("metrics.csv"))
    assert metrics, "CSV metrics were not written"
    header = metrics[0].read_text().splitlines()[0]
    assert "train/loss" in header and "val/loss" in header
    text = Path(config).read_text()
    # truncation is logged; packed text truncates no document (it splits them) and logs the tokens cut off instead
    cut = "data/dropped_tokens" if "PackedTextDataModule" in text else "data/truncated_samples"
    assert "data/train_samples" in header and cut in header
    if "ExcessLossSelection" in text:
        assert "lit_ft/excess_loss/kept_fraction" in header
    if "lit_ft.callbacks.PANDA" in text:
        assert "lit_ft/panda/kd_loss" in header and "lit_ft/panda/beta" in header
    if "lit_ft.callbacks.ProMoT" in text:
        assert "lit_ft/promot/stage" in header
    if "lit_ft.callbacks.ForgettingMonitor" in text:
        assert any(k.startswith("lit_ft/forgetting_monitor/") for k in header.split(","))
    if "lit_ft.callbacks.TokenElimination" in text:
        assert "lit_ft/token_elimination/kept_fraction" in header
    saved = list((tmp_path / "logs").rglob("config.yaml"))
    assert saved, "resolved config was not saved to the log dir"
    return header
