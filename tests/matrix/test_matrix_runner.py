"""The compatibility-matrix runner (issue 18, ``tests/matrix/run_matrix.py``): one real cell end to end (2 gloo
ranks against one process, the JSON cache, the generated page), and the outcome rules on synthetic cells."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_matrix_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run_matrix = _load("run_matrix")
worker = _load("worker")


@pytest.mark.slow
def test_one_cell_runs_is_cached_and_generates_its_row(tmp_path, capsys):
    """``plain`` under 2-rank DDP equals one process (the module's weights really moved, and the largest difference
    is fp32 noise); the cell is cached as JSON and skipped on a rerun; the page carries the generated-page note,
    the command and that row. (The runner's ``main`` runs here; the ranks are its worker subprocesses.)"""
    out, page = tmp_path / "runs", tmp_path / "compatibility.md"
    args = ["--techniques", "plain", "--settings", "ddp", "--out-dir", str(out), "--page", str(page)]
    assert run_matrix.main(args) == 0
    cell = json.loads((out / "plain__ddp.json").read_text())
    assert cell["category"] == "works", cell
    assert cell["result"]["moved"] and cell["result"]["max_abs_diff"] < 1e-5
    assert [r["returncode"] for r in cell["ranks"]] == [0, 0]
    text = page.read_text()
    assert run_matrix.GENERATED_MARK in text and "do not edit it by hand" in text
    assert "python tests/matrix/run_matrix.py --techniques plain --settings ddp" in text
    assert "| `plain` | — | works (= 1 process) |" in text

    capsys.readouterr()
    assert run_matrix.main(args) == 0
    assert "cached" in capsys.readouterr().out
    assert json.loads((out / "plain__ddp.json").read_text())["finished_at"] == cell["finished_at"]


def test_compare_finds_differences_missing_keys_and_unmoved_weights():
    start = {"w": torch.zeros(3), "b": torch.zeros(2)}
    ref = {"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.zeros(2)}
    same = worker.compare(ref, {k: v.clone() for k, v in ref.items()}, start)
    assert same["close"] and same["moved"] and same["max_abs_diff"] == 0.0
    off = worker.compare(ref, {"w": ref["w"] + torch.tensor([0.0, 1e-3, 0.0]), "b": ref["b"]}, start)
    assert not off["close"] and off["worst_tensor"] == "w" and off["max_abs_diff"] == pytest.approx(1e-3, rel=1e-3)
    missing = worker.compare(ref, {"w": ref["w"]}, start)
    assert not missing["close"] and missing["keys_only_in_reference"] == ["b"]
    assert not worker.compare(start, start, start)["moved"]
    # a tensor the steps moved by only 1e-7 (a prompt's small learning rate): within atol, but as large as the update
    small = {"w": torch.full((3,), 0.02)}
    tiny = worker.compare({"w": small["w"] + 1e-7}, {"w": small["w"] + 2e-7}, small)
    assert not tiny["close"] and tiny["max_diff_over_update"] > 0.5
    assert worker.compare({"w": small["w"] + 1e-7}, {"w": small["w"] + 1e-7}, small)["close"]


def _record(ranks=None, result=None, timed_out=False, exit_order=(0, 1)) -> dict:
    ranks = ranks or [{"rank": 0, "phase": "done", "returncode": 0, "log_tail": ""},
                      {"rank": 1, "phase": "done", "returncode": 0, "log_tail": ""}]
    return {"ranks": ranks, "result": result, "timed_out": timed_out, "timeout_s": 120, "exit_order": list(exit_order)}


def _error(rank: int, phase: str, message: str, where: str = "distributed", type_: str = "RuntimeError") -> dict:
    return {"rank": rank, "phase": phase, "returncode": 1, "log_tail": "",
            "error": {"where": where, "phase": phase, "type": type_, "message": message, "traceback": "",
                      "lit_ft_frame": None, "raised_at": None}}


def test_classify_outcomes():
    ok = {"close": True, "moved": True, "max_abs_diff": 1e-8, "keys_only_in_reference": [],
          "keys_only_in_distributed": [], "reference_error": None}
    c = run_matrix.classify
    assert c(_record(result=ok))["outcome"] == "works (= 1 process)"
    differs = dict(ok, close=False, max_abs_diff=0.031)
    assert c(_record(result=differs))["outcome"] == "runs but differs (max abs diff 0.031)"
    done = {"rank": 1, "phase": "done", "returncode": 0, "log_tail": ""}
    refused = c(_record([_error(0, "setup", "FreezeLayers does not support DDP: use ...\nmore"), done]))
    assert refused["category"] == "refused" and refused["outcome"] == "refused: FreezeLayers does not support DDP: use ..."
    unclear = c(_record([_error(0, "setup", "index out of range"), done]))
    assert unclear["outcome"] == "fails: RuntimeError: index out of range"
    # the rank that died first is the cause; its peer only saw the connection close
    later = c(_record([_error(0, "step 1", "Connection closed by peer"), _error(1, "step 1", "shape mismatch")],
                      exit_order=(1, 0)))
    assert later["outcome"] == "fails (step 1): RuntimeError: shape mismatch" and later["detail"]["rank"] == 1
    hang = c(_record([{"rank": 0, "phase": "step 1", "returncode": -9, "log_tail": ""},
                      {"rank": 1, "phase": "setup", "returncode": -9, "log_tail": ""}], timed_out=True))
    assert hang["category"] == "hangs" and "rank 0 at step 1, rank 1 at setup" in hang["detail"]["where"]
    not_run = c(_record([_error(0, "build", "no case", where="build", type_="KeyError"), done]))
    assert not_run["outcome"] == "not run: KeyError: no case"


@pytest.mark.slow
def test_single_process_cell_runs_in_its_own_process_and_fills_its_column(tmp_path):
    """``plain`` under ``accum`` as ``make matrix`` runs it (``single_worker.py`` in a subprocess): exact; the page
    gets the column, and the columns never run say so."""
    out, page = tmp_path / "runs", tmp_path / "compatibility.md"
    assert run_matrix.main(["--techniques", "plain", "--settings", "accum,checkpointing", "--out-dir", str(out),
                            "--page", str(page), "--timeout", "300"]) in (0,)
    cell = json.loads((out / "plain__accum.json").read_text())
    assert cell["outcome"] == "works (exact)" and cell["detail"]["max_abs_diff"] < 1e-5, cell
    assert cell["ranks"][0]["returncode"] == 0
    text = page.read_text()
    assert "| technique | family | accum | checkpointing |" in text
    assert "| `plain` | — | works (exact) | works (= without" in text
    assert "`--settings accum`" in text and run_matrix.SETTING_DOC["accum"] in text
    run_matrix.main(["--techniques", "plain", "--settings", "ddp,accum", "--out-dir", str(out), "--page",
                     str(page), "--render-only"])
    assert "| `plain` | — | not run | works (exact) |" in page.read_text()


def test_a_single_process_cell_past_its_timeout_is_killed_and_hangs(tmp_path):
    record = run_matrix.run_single_cell("plain", "sigkill", tmp_path, timeout=2)
    assert record["category"] == "hangs" and record["ranks"][0]["killed"], record
    assert record["ranks"][0]["returncode"] == -9


def test_each_cell_runs_in_its_own_folder(tmp_path, monkeypatch):
    """What a technique writes to a relative default path (CriticalTokenScoring's weights cache) lands in the cell's
    folder, never in the repository nor in another cell's run: every process of a cell runs there (an absolute
    path, also for a relative ``--out-dir``)."""
    seen = []

    class FakeProc:
        pid, returncode = 0, 0

        def __init__(self, args, **kw):
            seen.append(kw["cwd"])

        def wait(self, timeout=None):
            return 0

        def poll(self):
            return 0

    monkeypatch.setattr(run_matrix.subprocess, "Popen", FakeProc)
    monkeypatch.chdir(tmp_path)
    run_matrix.run_single_cell("plain", "accum", Path("runs"), timeout=5)
    run_matrix.run_dist_cell("plain", "ddp", Path("runs"), timeout=5)
    runs = (tmp_path / "runs").resolve()
    assert seen == [str(runs / "plain__accum"), str(runs / "plain__ddp"), str(runs / "plain__ddp")]


def test_classify_single_process_outcomes():
    c = run_matrix.classify

    def single(setting, ranks=None, result=None):
        return dict(_record(ranks or [{"rank": 0, "phase": "done", "returncode": 0, "log_tail": ""}], result,
                            exit_order=(0,)), setting=setting)

    judged = {"category": "works", "outcome": "works (exact)", "detail": {"max_abs_diff": 0.0}}
    assert c(single("accum", result=judged)) == judged
    refused = c(single("bf16", [_error(0, "bf16 setup", "X does not support precision='bf16-mixed': ...")]))
    assert refused["category"] == "refused" and refused["outcome"].startswith("refused: X does not support precision")
    # a setup error that does not name the setting, or an error in a step, fails
    assert c(single("bf16", [_error(0, "bf16 setup", "index out of range")]))["category"] == "fails"
    step = c(single("lora", [_error(0, "lora step 1", "no attribute 'last_hidden_state'", type_="AttributeError")]))
    assert step["outcome"] == "fails (lora step 1): AttributeError: no attribute 'last_hidden_state'"
    # the DDP words do not count as a refusal of a single-process setting
    assert c(single("compile", [_error(0, "compiled setup", "DDP is required")]))["category"] == "fails"
