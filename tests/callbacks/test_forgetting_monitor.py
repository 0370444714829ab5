"""ForgettingMonitor: hand references on a tiny model, conjugate transforms, baseline kept on resume, no work during
training steps, logged scalars and the retention picture."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger

from lit_ft.callbacks.analysis._forgetting_tasks import (
    encode_task, leetspeak, load_task, pig_latin, render_prompt,
)
from lit_ft.callbacks.analysis.forgetting_monitor import ForgettingMonitor, evaluate_forgetting, measure
from lit_ft.modules import CausalLMModule
from lit_ft.testing import write_tiny_classification_jsonl, write_tiny_sft_jsonl
from tests.helpers import ListDataModule, tiny_config, tiny_hf_model


@pytest.fixture
def task_files(tmp_path):
    return (write_tiny_sft_jsonl(tmp_path / "gen.jsonl", n=3, seed=1),
            write_tiny_classification_jsonl(tmp_path / "cls.jsonl", n=3, seed=2))


def _tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _item_logprobs(model, ids: list[int]) -> torch.Tensor:
    """[len(ids), V] log-probabilities of one unpadded row (row t predicts token t + 1)."""
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def test_loss_and_accuracy_match_a_per_item_reference(task_files, tiny_tokenizer_path):
    tok, model = _tok(tiny_tokenizer_path), tiny_hf_model(3)
    gen, cls = load_task(task_files[0], 3), load_task(task_files[1], 3)
    assert gen.kind == "generation" and cls.kind == "choice" and cls.label_names == ("0", "1")
    got = measure(model, [encode_task(gen, tok), encode_task(cls, tok)], match_tokens=2, batch_size=2,
                  pad_id=tok.pad_token_id)

    # generation: every completion token's NLL after the chat-rendered prompt, one item at a time, no padding
    nll, n, hits = 0.0, 0, 0
    for prompt, completion in gen.items:
        p = tok(render_prompt(tok, prompt, "none"), add_special_tokens=False)["input_ids"]
        a = tok(completion, add_special_tokens=False)["input_ids"]
        lp = _item_logprobs(model, p + a)
        for j, token in enumerate(a):
            nll -= lp[len(p) + j - 1, token].item()
        n += len(a)
        hits += all(lp[len(p) + j - 1].argmax().item() == a[j] for j in range(min(2, len(a))))
    assert got["gen/loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["gen/accuracy"] == pytest.approx(hits / len(gen.items))

    # classification: the label with the highest summed log-likelihood; the loss over the gold label's tokens
    nll, n, hits = 0.0, 0, 0
    for prompt, gold in cls.items:
        p = tok(render_prompt(tok, prompt, "none"), add_special_tokens=False)["input_ids"]
        scores = []
        for k, name in enumerate(cls.label_names):
            a = tok(name, add_special_tokens=False)["input_ids"]
            lp = _item_logprobs(model, p + a)
            s = sum(lp[len(p) + j - 1, t].item() for j, t in enumerate(a))
            scores.append(s)
            if k == gold:
                nll, n = nll - s, n + len(a)
        hits += max(range(len(scores)), key=lambda k: (scores[k], -k)) == gold
    assert got["cls/loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["cls/accuracy"] == pytest.approx(hits / len(cls.items))


def test_conjugate_transforms_rewrite_the_prompt_only(task_files, tiny_tokenizer_path):
    assert pig_latin("The string, Apple and rhythm!") == "Ethay ingstray, Appleway andway ythmrhay!"
    assert leetspeak("Best site") == "8357 5173"
    tok = _tok(tiny_tokenizer_path)
    gen = load_task(task_files[0], 3)
    prompt = gen.items[0][0]
    assert render_prompt(tok, prompt, "reformat") == f"Q: {prompt}\nA: "
    assert pig_latin(prompt) in render_prompt(tok, prompt, "pig_latin")  # inside the chat template
    assert "<|im_start|>" in render_prompt(tok, prompt, "none")
    plain, conj = encode_task(gen, tok, "none"), encode_task(gen, tok, "pig_latin")
    for lp, lc, ip, ic in zip(plain.labels, conj.labels, plain.input_ids, conj.input_ids):
        assert [t for t in lp if t != -100] == [t for t in lc if t != -100]  # the same answer tokens are scored
        assert ip != ic


def test_arguments_are_validated():
    for kwargs, name in [({"max_samples": 0}, "max_samples"), ({"every_n_val": 0}, "every_n_val"),
                         ({"conjugate": "french"}, "conjugate"), ({"tasks": []}, "tasks"),
                         ({"max_length": 4}, "max_length"), ({"match_tokens": -1}, "match_tokens"),
                         ({"plot": 1}, "plot"), ({"choice_score": "max"}, "choice_score")]:
        with pytest.raises(ValueError, match=f"`{name}`"):
            ForgettingMonitor(**kwargs)
    assert ForgettingMonitor().tasks == ["alpaca-en-demo", "sarcasm-val", "bbcnews"]


def _fit(tmp_path, monitor, steps, ckpt=None, callbacks=(), logger=False, sanity=0, seed=0):
    pl.seed_everything(seed)
    module = CausalLMModule(model_config=tiny_config(), learning_rate=5e-2)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, val_check_interval=2, limit_val_batches=1,
                         num_sanity_val_steps=sanity, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[monitor, *callbacks])
    trainer.fit(module, datamodule=ListDataModule(n_batches=4), ckpt_path=ckpt)
    return trainer, module


class _Stages(Callback):
    """Records the trainer's stage around every measurement (the monitor's _measure is wrapped)."""

    def __init__(self, monitor: ForgettingMonitor) -> None:
        self.calls: list[tuple[str, int]] = []
        self.train_batches = 0
        self.in_batch = False  # between a training batch's start and end
        inner = monitor._measure

        def wrapped(trainer, pl_module):
            assert not self.in_batch, "measured inside a training step"
            self.calls.append((trainer.state.stage.value, int(trainer.global_step)))
            return inner(trainer, pl_module)

        monitor._measure = wrapped

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_batches += 1
        self.in_batch = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.in_batch = False


def test_measures_at_fit_start_and_validation_only(tmp_path, task_files, tiny_tokenizer_path):
    monitor = ForgettingMonitor(tasks=list(task_files), max_samples=2, tokenizer=tiny_tokenizer_path, plot=False)
    stages = _Stages(monitor)
    _fit(tmp_path, monitor, steps=4, callbacks=[stages], sanity=1)
    # baseline before step 0, then the validations at steps 2 and 4; the sanity check does not count
    assert stages.calls == [("train", 0), ("validate", 2), ("validate", 4)]
    assert stages.train_batches == 4
    # no batch hook of the training loop is overridden: nothing can run during a training step
    for hook in ("on_train_batch_start", "on_train_batch_end", "on_before_backward", "on_after_backward",
                 "on_before_optimizer_step"):
        assert getattr(ForgettingMonitor, hook) is getattr(Callback, hook), hook
    every2 = ForgettingMonitor(tasks=list(task_files), max_samples=2, tokenizer=tiny_tokenizer_path, plot=False,
                               every_n_val=2)
    stages2 = _Stages(every2)
    _fit(tmp_path / "b", every2, steps=4, callbacks=[stages2])
    assert stages2.calls == [("train", 0), ("validate", 4)]


def test_baseline_is_kept_on_resume(tmp_path, task_files, tiny_tokenizer_path):
    kw = dict(tasks=list(task_files), max_samples=3, tokenizer=tiny_tokenizer_path, plot=False)
    first = ForgettingMonitor(**kw)
    trainer, module = _fit(tmp_path, first, steps=2)
    ckpt = str(tmp_path / "mid.ckpt")
    trainer.save_checkpoint(ckpt)
    baseline = first.baseline
    assert baseline is not None and len(first.history) == 1

    resumed = ForgettingMonitor(**kw)
    stages = _Stages(resumed)
    _, module2 = _fit(tmp_path, resumed, steps=4, ckpt=ckpt, seed=1)
    assert resumed.baseline == baseline  # the original, from the checkpoint
    assert stages.calls == [("validate", 4)]  # never re-measured at the resumed fit's start
    assert [h["step"] for h in resumed.history] == [2, 4]
    # the trained weights really score differently: a baseline taken from them would have been wrong
    fresh = measure(module2.model, resumed._encoded["plain"], 4, 8, 0)  # type: ignore[index]
    assert fresh["gen/loss"] != pytest.approx(baseline["plain"]["gen/loss"], rel=1e-4)
    # a changed argument the baseline depends on refuses to resume
    changed = ForgettingMonitor(**{**kw, "max_length": 64})
    with pytest.raises(ValueError, match="max_length"):
        _fit(tmp_path, changed, steps=4, ckpt=ckpt)


def test_logged_scalars_and_retention_picture(tmp_path, task_files, tiny_tokenizer_path):
    monitor = ForgettingMonitor(tasks=list(task_files), max_samples=3, tokenizer=tiny_tokenizer_path,
                                conjugate="pig_latin")
    logger = CSVLogger(str(tmp_path), name="run")
    trainer, _ = _fit(tmp_path, monitor, steps=4, logger=logger)
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    keys = {k for r in rows for k, v in r.items() if v not in ("", None)}
    prefix = "lit_ft/forgetting_monitor"
    for task in ("gen", "cls"):
        for name in ("loss", "loss_ratio", "accuracy", "accuracy_retention", "conjugate/loss", "conjugate/accuracy",
                     "recovery_loss", "recovery_accuracy", "loss_before", "conjugate/loss_before"):
            assert f"{prefix}/{task}/{name}" in keys, name
    # the last logged ratio is the last measurement over the baseline
    last = [r for r in rows if r.get(f"{prefix}/gen/loss_ratio")][-1]
    h = monitor.history[-1]
    assert float(last[f"{prefix}/gen/loss_ratio"]) == pytest.approx(
        h["plain"]["gen/loss"] / monitor.baseline["plain"]["gen/loss"], rel=1e-5)
    png = Path(logger.log_dir) / "forgetting_monitor" / "retention_step4.png"
    assert png.exists() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (Path(logger.log_dir) / "forgetting_monitor" / "retention_step2.png").exists()
    # content: three panels (loss ratio, accuracy retention, recovery), one line per task from the baseline on
    fig = monitor.retention_figure()
    axes = fig.get_axes()
    assert [ax.get_title().split(" ")[0] for ax in axes] == ["held-out", "accuracy", "pig_latin:"]
    lines = {ln.get_label(): ln for ln in axes[0].get_lines() if not ln.get_label().startswith("_")}
    assert set(lines) == {"gen", "cls"}
    assert list(lines["gen"].get_xdata()) == [0, 2, 4]
    expect = [1.0] + [h["plain"]["gen/loss"] / monitor.baseline["plain"]["gen/loss"] for h in monitor.history]
    assert list(lines["gen"].get_ydata()) == pytest.approx(expect)
    rec = {ln.get_label(): ln for ln in axes[2].get_lines() if not ln.get_label().startswith("_")}
    assert rec["cls"].get_ydata()[0] == 0.0 and len(rec["cls"].get_ydata()) == 3


def test_benchmark_hook(task_files, tiny_tokenizer_path):
    before, after = tiny_hf_model(0), tiny_hf_model(1)
    out = evaluate_forgetting(before, after, list(task_files), tiny_tokenizer_path, conjugate="reformat",
                              max_samples=2)
    ref_after = measure(after, [encode_task(load_task(f, 2), _tok(tiny_tokenizer_path)) for f in task_files], 4, 8,
                        0)
    assert out["gen/loss"] == pytest.approx(ref_after["gen/loss"], rel=1e-6)
    assert out["gen/loss_ratio"] == pytest.approx(out["gen/loss"] / out["gen/loss_before"])
    expect = (out["cls/conjugate/accuracy"] - out["cls/accuracy"]) \
        - (out["cls/conjugate/accuracy_before"] - out["cls/accuracy_before"])
    assert out["cls/recovery_accuracy"] == pytest.approx(expect)
    assert not any(math.isnan(v) for k, v in out.items() if k.endswith("/loss"))


def test_rank_shares_cover_every_row_once(task_files, tiny_tokenizer_path):
    """Under DDP each rank measures a share (whole classification items); the shares of 2 ranks, accumulated in
    one metric, give exactly the single-process result (the metric's sum-reduction does the rest)."""
    from lit_ft.callbacks.analysis._forgetting_tasks import evaluate_encoded
    from lit_ft.metrics.forgetting import ForgettingMetric

    tok, model = _tok(tiny_tokenizer_path), tiny_hf_model(2)
    enc = [encode_task(load_task(f, 3), tok) for f in task_files]
    single = ForgettingMetric(["gen", "cls"])
    evaluate_encoded(model, enc, single, batch_size=3)
    shared = ForgettingMetric(["gen", "cls"])
    for rank in (0, 1):
        evaluate_encoded(model, enc, shared, batch_size=3, rank=rank, world=2)
    for state in ("nll_sum", "tokens", "correct", "labelled"):
        torch.testing.assert_close(getattr(shared, state), getattr(single, state), rtol=1e-6, atol=1e-9)
    assert single.labelled[1].item() == 3  # 3 classification items, each counted once
