"""The documentation site (``mkdocs.yml`` + ``docs/_hooks.py``): the real site builds with ``--strict``, and the same
configuration fails a strict build on a broken anchor, a missing page or a missing repository file.

Needs the ``docs`` extra (``pip install -e '.[docs]'``); without it the tests skip (CI runs ``make docs``, which
installs it, anyway). The builds run in a subprocess, as ``make docs`` does, and write only under ``tmp_path``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HOOKS = REPO / "docs" / "_hooks.py"

# MkDocs, the Material theme, mkdocstrings and its handlers (the python handler lives in mkdocstrings_handlers)
_MISSING = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers")
            if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(_MISSING), reason=f"the docs extra is not installed ({', '.join(_MISSING)} missing): "
                           "pip install -e '.[docs]' (CI builds the site with `make docs`)")


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
                          capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_site_builds_strict(tmp_path):
    """The real site: no warning at all (links, anchors, nav, docstrings), and the generated API reference lists
    every registered technique."""
    from lit_ft.callbacks import techniques

    site = tmp_path / "site"
    result = mkdocs_build(REPO / "mkdocs.yml", site)
    assert result.returncode == 0, result.stdout + result.stderr
    api = (site / "api" / "techniques" / "index.html").read_text(encoding="utf-8")
    index = (site / "api" / "index.html").read_text(encoding="utf-8")
    for record in techniques():
        assert f'id="{record.class_path}"' in api, f"{record.class_path} has no API entry"
        assert record.cls.__name__ in index, f"{record.name} is missing from the technique index"
        page = site / Path(record.doc).relative_to("docs").with_suffix("") / "index.html"
        assert page.exists(), f"{record.doc} did not become {page.relative_to(site)}"
    benchmarks = (site / "benchmarks" / "index.html").read_text(encoding="utf-8")
    assert 'src="../img/quality_token_selection.png"' in benchmarks
    assert (site / "img" / "quality_token_selection.png").exists()
    assert not (site / "_hooks.py").exists()


def _scratch_site(root: Path, page: str) -> Path:
    """A two-page docs tree with the repository's configuration (``INHERIT``) and hook; returns its config."""
    (root / "docs").mkdir(parents=True)
    (root / "configs").mkdir()
    (root / "configs" / "x.yaml").write_text("a: 1\n")
    (root / "docs" / "other.md").write_text("# Other\n\n## Again\n\n## Again\n")
    (root / "docs" / "index.md").write_text(page)
    config = root / "mkdocs.yml"
    # the nav has no API placeholder, so the hook generates no API pages (and imports nothing from lit_ft)
    config.write_text(
        f"INHERIT: {REPO / 'mkdocs.yml'}\n"
        f"docs_dir: docs\n"
        f"hooks: [{HOOKS}]\n"
        f"plugins: [search]\n"
        f"nav: [index.md, other.md]\n")
    return config


GOOD = "# Home\n\n[second again](other.md#again-1) [x](../configs/x.yaml) [self](#home)\n"


def test_scratch_site_builds_and_rewrites_repo_links(tmp_path):
    result = mkdocs_build(_scratch_site(tmp_path, GOOD), tmp_path / "site")
    assert result.returncode == 0, result.stdout + result.stderr
    html = (tmp_path / "site" / "index.html").read_text(encoding="utf-8")
    # a repository file outside docs/ becomes code text (no repo_url is set), not a dead link
    assert "<code>configs/x.yaml</code>" in html and "x.yaml</a>" not in html
    # the second "Again" heading has GitHub's id, the one tests/test_docs.py accepts
    assert 'id="again-1"' in (tmp_path / "site" / "other" / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ("[gone](other.md#no-such-heading)", "no-such-heading"),
        ("[gone](missing.md)", "missing.md"),
        ("[gone](../configs/missing.yaml)", "missing.yaml"),
    ],
    ids=["anchor", "page", "repo-file"],
)
def test_strict_build_fails_on_breakage(tmp_path, broken, message):
    result = mkdocs_build(_scratch_site(tmp_path, GOOD + broken + "\n"), tmp_path / "site")
    assert result.returncode != 0, "the strict build passed a broken link"
    assert message in result.stdout + result.stderr


def test_repo_links_use_repo_url(tmp_path):
    """With ``repo_url`` set, a link to a repository file outside docs/ points at the file on the repository."""
    spec = importlib.util.spec_from_file_location("lit_ft_docs_hooks", HOOKS)
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "x.yaml").write_text("a: 1\n")
    # a link to a repository file (with its anchor), a link inside docs/, inline code, a fenced block
    text = ("[cfg](../../configs/x.yaml#L2) [in](../index.md) `[code](../../configs/x.yaml)`\n"
            "```\n[f](../../configs/x.yaml)\n```")
    out = hooks.rewrite_repo_links(text, tmp_path / "docs" / "sub", tmp_path / "docs", tmp_path,
                                   "https://github.com/o/lit-ft")
    assert out.splitlines()[0] == (
        "[cfg](https://github.com/o/lit-ft/blob/main/configs/x.yaml#L2) [in](../index.md) "
        "`[code](../../configs/x.yaml)`")
    assert out.splitlines()[2] == "[f](../../configs/x.yaml)"
