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
