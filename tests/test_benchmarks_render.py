"""``python -m benchmarks`` (``make bench``): each study's block in docs/benchmarks.md is rewritten from its results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.__main__ import REPO, STUDIES, Study, render


def test_every_study_has_its_block_and_script() -> None:
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    for name, study in STUDIES.items():
        assert f"<!-- bench:{name} -->" in docs and f"<!-- /bench:{name} -->" in docs, name
        assert (REPO / "benchmarks" / f"{study.script}.py").is_file(), study.script


def test_render_replaces_only_the_studys_block(tmp_path: Path) -> None:
    (tmp_path / "demo.json").write_text(json.dumps({"table": "| a |\n|---|\n| 2 |", "rows": []}))
    docs = ("intro\n<!-- bench:demo -->\nold table\n<!-- /bench:demo -->\nbetween\n"
            "<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    out = render("demo", Study("none"), docs, results=tmp_path, draw=False)
    assert out == ("intro\n<!-- bench:demo -->\n| a |\n|---|\n| 2 |\n<!-- /bench:demo -->\nbetween\n"
                   "<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    assert render("demo", Study("none"), out, results=tmp_path, draw=False) == out  # idempotent


def test_render_without_results_keeps_the_block_and_a_missing_block_fails(tmp_path: Path) -> None:
    docs = "<!-- bench:demo -->\nold\n<!-- /bench:demo -->"
    assert render("demo", Study("none"), docs, results=tmp_path, draw=False) == docs
    (tmp_path / "demo.json").write_text(json.dumps({"table": "new", "rows": []}))
    with pytest.raises(SystemExit, match="no <!-- bench:demo -->"):
        render("demo", Study("none"), "no markers here", results=tmp_path, draw=False)


def test_cached_rows_run_each_missing_row_once_and_resume(tmp_path: Path) -> None:
    import argparse

    from benchmarks._row_cache import cached_rows

    ran: list[tuple[str, int]] = []

    def run(name: str, seed: int) -> dict:
        ran.append((name, seed))
        return {"name": name, "seed": seed}

    args = argparse.Namespace(cache=str(tmp_path), seeds="0,1", only=None, force=False, cached_only=False)
    key = lambda name, seed: f"{name}_{seed}"  # noqa: E731
    assert len(cached_rows(args, ["a", "b"], key, run)) == 4 and len(ran) == 4
    assert cached_rows(args, ["a", "b"], key, run) == [{"name": n, "seed": s} for s in (0, 1) for n in "ab"]
    assert len(ran) == 4  # the second call read every row from the cache
    (tmp_path / "row_b_1.json").unlink()
    args.cached_only = True  # a missing row is left out, not run
    assert len(cached_rows(args, ["a", "b"], key, run)) == 3 and len(ran) == 4
    args.cached_only, args.only = False, "b"
    assert [r["name"] for r in cached_rows(args, ["a", "b"], key, run)] == ["b", "b"] and ran[-1] == ("b", 1)


def test_seeds_override_replaces_only_the_seeds_and_rejects_bad_values(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.__main__ import main, study_args

    noise = STUDIES["token_selection_noise"]
    assert study_args(noise) == noise.args  # the published run
    assert study_args(noise, "0") == ["--seeds", "0", "--diagnose", "400", "--oracle"]
    assert noise.args[:2] == ["--seeds", "0,1"]  # the study's own arguments are not mutated
    with pytest.raises(SystemExit, match="takes no seeds"):
        study_args(Study("x", ["--steps", "2"]), "0")
    main(["--list", "--seeds", "1", "--only", "param_forgetting"])
    assert "param_forgetting.py --seeds 1" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected comma-separated integers"):
        main(["--list", "--seeds", "zero"])
