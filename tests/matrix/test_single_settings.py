"""The matrix's single-process settings (``single_settings.py``, ``fuzz_cell.py``): the fast slice of ``make test``
runs every setting for ``plain`` and all but ``compile`` and ``sigkill`` (fixed costs: dynamo's first compile, a
child interpreter; plain covers them) for one technique, in this process (``make matrix`` runs each cell as its own
subprocess), and shows that the checks can fail: a resume that restarts the epoch, a
constructor that raises an unclear error, a batch crash inside torch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fuzz_cell  # noqa: E402
import single_settings  # noqa: E402
from single_job import SingleJob  # noqa: E402
from worker import Progress  # noqa: E402

# a token scorer with a window normaliser counted ahead (docs: exact under accumulation) reading a batch key
TECHNIQUE = "key_token_weighting"


def _job(technique: str, tmp_path: Path) -> SingleJob:
    cell = tmp_path / technique
    cell.mkdir(parents=True, exist_ok=True)
    return SingleJob(technique, cell, Progress(cell, 0))


@pytest.fixture
def fast(monkeypatch):
    """aot_eager instead of inductor (compiling C++ kernels takes ~10 s a cell), few fuzz examples."""
    monkeypatch.setenv(single_settings.COMPILE_BACKEND_ENV, "aot_eager")
    monkeypatch.setattr(fuzz_cell, "MAX_CTOR", 8)
    monkeypatch.setattr(fuzz_cell, "MAX_BATCH", 3)


def _check_fuzz(out: dict) -> None:
    ctor, batches = out["detail"]["constructor"], out["detail"]["batches"]
    assert ctor["examples"] == fuzz_cell.MAX_CTOR and batches["examples"] == fuzz_cell.MAX_BATCH
    assert out["category"] == ("works" if not ctor["bad"] and not batches["bad"] else "fails")


@pytest.mark.slow
def test_plain_passes_every_single_process_setting(tmp_path, fast):
    """plain (CausalLMModule alone) trains identically with gradient checkpointing, accumulation, compile and a
    mid-epoch or SIGKILL resume; bf16 stays near fp32; a PEFT-LoRA plain module trains its adapters only."""
    job = _job("plain", tmp_path)
    for setting in ("accum", "checkpointing", "compile", "resume_mid_epoch", "sigkill"):
        out = single_settings.SETTINGS[setting](job)
        assert out["category"] == "works", (setting, out)
        assert out["detail"]["moved"] and out["detail"]["max_abs_diff"] < 1e-5, (setting, out)
    bf16 = single_settings.bf16(job)
    assert bf16["category"] == "works" and 0 < bf16["detail"]["update_rel_diff"] <= single_settings.BF16_REL_TOL
    lora = single_settings.lora(job)
    assert lora["outcome"] == "works (8 adapter tensors trained; base frozen)", lora  # q, v × A, B × 2 layers
    _check_fuzz(single_settings.fuzz(job))


@pytest.mark.slow
def test_one_technique_under_the_single_process_settings(tmp_path, fast):
    """KeyTokenWeighting: its Σw normaliser is exact under accumulation, and it trains identically with gradient
    checkpointing and across a mid-epoch resume, near fp32 under bf16, and on a PEFT-LoRA plain module."""
    job = _job(TECHNIQUE, tmp_path)
    for setting in ("accum", "checkpointing", "resume_mid_epoch", "bf16", "lora"):
        out = single_settings.SETTINGS[setting](job)
        assert out["category"] == "works", (setting, out)
    _check_fuzz(single_settings.fuzz(job))


def test_a_resume_that_restarts_the_epoch_is_caught(tmp_path, monkeypatch):
    """With a plain DataLoader (Lightning cannot restore its position) the resumed run retrains the epoch's first
    batch: the setting must say it differs."""
    job = _job("plain", tmp_path)
    real = job.datamodule
    monkeypatch.setattr(job, "datamodule", lambda batches, resumable=False: real(batches, resumable=False))
    out = single_settings.resume_mid_epoch(job)
    assert out["category"] == "differs" and out["detail"]["max_abs_diff"] > 1e-4, out


def test_constructor_fuzz_accepts_named_errors_and_reports_others(tmp_path, fast):
    class Checked:
        def __init__(self, ratio: float = 0.5) -> None:
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
                raise ValueError(f"ratio must be a number in (0, 1], got {ratio!r}")

    class Unchecked:
        def __init__(self, ratio: float = 0.5) -> None:
            self.keep = 1 / ratio  # TypeError / ZeroDivisionError without the argument's name

    job = SimpleJobStub(Checked)
    good = fuzz_cell.fuzz_constructor(job)
    assert not good["bad"] and good["refused"] > 0 and good["examples"] == fuzz_cell.MAX_CTOR
    bad = fuzz_cell.fuzz_constructor(SimpleJobStub(Unchecked))
    assert bad["bad"] and all("ratio" == b["argument"] for b in bad["bad"])


class SimpleJobStub:
    """What ``fuzz_constructor`` reads of a job: the class and its valid arguments."""

    def __init__(self, cls) -> None:
        self.cls, self.kwargs = cls, {}


def test_batch_errors_count_only_when_lit_ft_raised_them(tmp_path):
    """A ``raise`` in a lit_ft file is a check; a torch op failing on a line of lit_ft, or a raise elsewhere, is not."""
    import importlib.util

    path = tmp_path / "lit_ft" / "fake_check.py"
    path.parent.mkdir()
    path.write_text("import torch\n\n\ndef check():\n    raise ValueError('labels must be -100 or a class')\n\n\n"
                    "def crash():\n    return torch.zeros(2) @ torch.zeros(3)\n")
    spec = importlib.util.spec_from_file_location("fake_check", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)

    def elsewhere():
        raise ValueError("not lit_ft")

    for fn, want in ((mod.check, True), (mod.crash, False), (elsewhere, False)):
        with pytest.raises((ValueError, RuntimeError)) as e:
            fn()
        assert fuzz_cell.raised_by_lit_ft(e.value) is want, fn


def test_shaped_batch_makes_the_rows_it_says():
    import torch

    template = {"input_ids": torch.arange(3, 19).reshape(2, 8), "attention_mask": torch.ones(2, 8, dtype=torch.long),
                "labels": torch.full((2, 8), -100), "sample_idx": torch.tensor([4, 5]),
                "key_token_mask": torch.ones(2, 8, dtype=torch.bool)}
    b = fuzz_cell.shaped_batch(template, ["normal", "padded"], 2, with_mask=True)
    assert b["input_ids"].tolist() == [[3, 4], [11, 12]]
    assert b["labels"].tolist() == [[3, 4], [-100, -100]] and b["attention_mask"].tolist() == [[1, 1], [0, 0]]
    assert b["key_token_mask"].tolist() == [[True, True], [False, False]] and b["sample_idx"].tolist() == [4, 5]
    ignored = fuzz_cell.shaped_batch(template, ["ignored"], 1, with_mask=False)
    assert "attention_mask" not in ignored and ignored["labels"].tolist() == [[-100]]
