"""Docs lint: what a user reads must hold together and must not point at things they cannot see.

* every relative link in ``README.md`` and ``docs/**/*.md`` resolves to a file or folder of the repository;
* every ``#anchor`` on a link to a markdown file (or on a same-page link) matches a heading of that file, by GitHub's
  anchor rule (the rendered heading text lowercased, punctuation dropped, spaces to ``-``, ``-1``/``-2`` suffixes for
  repeated headings) or an explicit ``<a name=...>`` / ``id=...``;
* no user-facing text (that markdown, and the docstrings under ``lit_ft/callbacks`` and ``lit_ft/modules``, which
  jsonargparse shows in ``lit-ft fit --help``) carries internal notes: ``VERIFY`` markers, "spec card" references
  or paths into the project's private ``shared/papers`` folder.

Static text only (no lit_ft import): it runs in well under a second.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: internal notes that must not reach users (regex, flags): a VERIFY marker (upper case: the English verb is fine),
#: a reference to the private paper notes ("spec card", ``shared/papers/...``)
FORBIDDEN = {
    "VERIFY marker": re.compile(r"\bVERIFY\b"),
    "spec card reference": re.compile(r"spec[ -]card", re.IGNORECASE),
    "shared/papers path": re.compile(r"shared/papers"),
}

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) and ![alt](target); the target may be <...> and may carry a "title"
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]+)(?:\s+\"[^\"]*\")?\s*\)")
_REF_DEF = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"<a\s+[^>]*(?:name|id)\s*=\s*\"([^\"]+)\"", re.IGNORECASE)
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def user_markdown(root: Path = REPO) -> list[Path]:
    """README.md and every markdown file under docs/."""
    files = [root / "README.md"] if (root / "README.md").exists() else []
    return files + sorted((root / "docs").rglob("*.md"))


def _prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks."""
    out, fenced = [], False
    for i, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append((i, line))
    return out


def github_anchor(heading: str) -> str:
    """GitHub's anchor for a heading's markdown text: the rendered text (link text kept, code ticks and emphasis
    markers dropped) lowercased, every character that is not a letter, digit, space, ``-`` or ``_`` dropped, then
    spaces turned into ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags render to nothing
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    text = "".join(ch for ch in text if ch.isalnum() or ch in " -_")
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every anchor a link into ``path`` may use: GitHub's heading anchors (repeats numbered) and HTML anchors."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        out.update(_HTML_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if not m:
            continue
        slug = github_anchor(m.group(2))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline link, image and reference definition outside code."""
    out = []
    for i, line in _prose_lines(path.read_text(encoding="utf-8")):
        line = _INLINE_CODE.sub("", line)
        targets = [m.group(1) for m in _INLINE_LINK.finditer(line)]
        ref = _REF_DEF.match(line)
        if ref:
            targets.append(ref.group(1))
        out += [(i, t[1:-1] if t.startswith("<") else t) for t in targets]
    return out


def link_problems(root: Path = REPO) -> list[str]:
    """Broken relative links and anchors in the user markdown under ``root``, one message each."""
    problems = []
    anchor_cache: dict[Path, set[str]] = {}
    for md in user_markdown(root):
        where = md.relative_to(root)
        for lineno, target in links(md):
            if _SCHEME.match(target) or target.startswith("//"):
                continue  # external (https:, mailto:, ...)
            path_part, _, anchor = target.partition("#")
            dest = md if not path_part else (md.parent / path_part).resolve()
            if path_part and (not dest.exists() or root.resolve() not in (dest, *dest.parents)):
                problems.append(f"{where}:{lineno}: link target {target!r} does not exist in the repository")
                continue
            if anchor and dest.suffix == ".md":
                if dest not in anchor_cache:
                    anchor_cache[dest] = anchors(dest)
                if anchor not in anchor_cache[dest]:
                    problems.append(
                        f"{where}:{lineno}: anchor {('#' + anchor)!r} of {target!r} matches no heading of "
                        f"{dest.relative_to(root.resolve()) if dest != md else where}"
                    )
    return problems


def _docstrings(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the module, class and function docstrings of a Python file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc is not None:
                out.append((node.body[0].lineno, doc))
    return out


def internal_note_problems(root: Path = REPO) -> list[str]:
    """Internal notes (``FORBIDDEN``) in the user markdown and in the user-facing docstrings under ``root``."""
    problems = []
    for md in user_markdown(root):
        for i, line in enumerate(md.read_text(encoding="utf-8").splitlines(), 1):
            for what, pattern in FORBIDDEN.items():
                if pattern.search(line):
                    problems.append(f"{md.relative_to(root)}:{i}: {what}: {line.strip()[:120]}")
    for package in ("lit_ft/callbacks", "lit_ft/modules"):
        for py in sorted((root / package).rglob("*.py")):
            for lineno, doc in _docstrings(py):
                for what, pattern in FORBIDDEN.items():
                    if pattern.search(doc):
                        problems.append(f"{py.relative_to(root)}:{lineno}: {what} in a docstring")
    return problems


def test_links_and_anchors_resolve():
    problems = link_problems()
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


def test_no_internal_notes_in_user_text():
    problems = internal_note_problems()
    assert not problems, "internal notes in user-facing text:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("heading", "anchor"),
    [
        ("Prompt techniques (CPU, real weights)", "prompt-techniques-cpu-real-weights"),
        ("Fused token-loss op vs peers (GPU)", "fused-token-loss-op-vs-peers-gpu"),
        ("Registering and the contract suite", "registering-and-the-contract-suite"),
        ("`ParamPlan` — composing plans", "paramplan--composing-plans"),
        ("Token selection / weighting: quality study", "token-selection--weighting-quality-study"),
        ("Step time × memory_peak", "step-time--memory_peak"),
        ("See [the paper](https://arxiv.org) first", "see-the-paper-first"),
    ],
)
def test_github_anchor_rule(heading, anchor):
    assert github_anchor(heading) == anchor


def test_checker_catches_breakage(tmp_path):
    """The checker itself, on a scratch tree: a sound tree passes, and each kind of breakage is reported."""
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "lit_ft" / "callbacks").mkdir(parents=True)
    (tmp_path / "lit_ft" / "modules").mkdir(parents=True)
    (tmp_path / "docs" / "b.md").write_text("# B\n\n## Prompt techniques (CPU, real weights)\n\n## Again\n\n## Again\n")
    (tmp_path / "docs" / "sub" / "c.md").write_text("# C\n\n```\n[not a link](nowhere.md)\n```\n")
    good = (
        "# A\n\n[b](b.md#prompt-techniques-cpu-real-weights) [again](b.md#again-1) [c](sub/c.md) [self](#a)\n"
        "[web](https://example.com/x#y) `[code](missing.md)`\n"
    )
    (tmp_path / "docs" / "a.md").write_text(good)
    (tmp_path / "lit_ft" / "callbacks" / "t.py").write_text('"""A technique (arXiv 2404.07965)."""\n')
    (tmp_path / "README.md").write_text("[docs](docs/a.md#a)\n")
    assert link_problems(tmp_path) == []
    assert internal_note_problems(tmp_path) == []

    (tmp_path / "docs" / "a.md").write_text(good + "[old](b.md#prompt-techniques) [gone](missing.md) [x](#nope)\n")
    problems = link_problems(tmp_path)
    assert len(problems) == 3, problems
    assert "'b.md#prompt-techniques'" in problems[0] and "missing.md" in problems[1] and "#nope" in problems[2]

    (tmp_path / "docs" / "sub" / "c.md").write_text("# C\n\nSpec card A6 in `shared/papers/x.md`.\n")
    (tmp_path / "lit_ft" / "callbacks" / "t.py").write_text('"""A technique.\n\nk: layers (VERIFY)."""\n')
    problems = internal_note_problems(tmp_path)
    assert len(problems) == 3, problems
    assert any("VERIFY" in p and "t.py" in p for p in problems)
