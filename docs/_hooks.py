"""MkDocs hooks for the documentation site (``hooks:`` in ``mkdocs.yml``; ``make docs`` builds it with --strict).

Three jobs, each so that the site needs no hand edits when a technique is added:

* the **API reference** (``api/*.md``) is generated from the technique registry (``lit_ft.core.registry``) and the
  public ``__all__`` of ``lit_ft.modules`` / ``lit_ft.data`` / ``lit_ft.metrics``: one ``::: dotted.path`` block per
  object, rendered by mkdocstrings from the docstrings; ``api/index.md`` is the registry's technique index (family,
  paper, doc page, config);
* the ``Techniques`` and ``API reference`` navigation sections, written as a single page in ``mkdocs.yml``, are
  expanded here: the technique pages in registry order (family, then name), then any other page under
  ``docs/techniques/``; the generated API pages;
* links from a page to a repository file outside ``docs/`` (``../../configs/x.yaml``, ``../lit_ft/...``), which work
  on GitHub but are not part of the site, become links to the repository (``repo_url``/blob/main/...) when
  ``repo_url`` is set in ``mkdocs.yml``, else plain code text naming the path. Links whose target does not exist
  are left alone, so the strict build still reports them; links inside ``docs/`` are never touched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from markdown.extensions import toc as markdown_toc
from mkdocs.config.defaults import MkDocsConfig
from mkdocs.structure.files import File, Files
from mkdocs.structure.pages import Page

#: nav placeholders this hook expands (title -> the single page mkdocs.yml gives it)
TECHNIQUES_NAV = ("Techniques", "techniques/index.md")
API_NAV = ("API reference", "api/index.md")

# (title, module) of the non-technique API pages: one block per name in the module's ``__all__``
_OTHER_API = (
    ("Modules", "lit_ft.modules"),
    ("Data modules", "lit_ft.data"),
    ("Metrics", "lit_ft.metrics"),
)

_FENCE = re.compile(r"^\s*(```|~~~)")
_INLINE_CODE = re.compile(r"(`+)(?:(?!\1).)+?\1")
# [text](target) or ![alt](target), with an optional "title"; the text may hold one level of [...]
_LINK = re.compile(r"(!?)\[((?:[^\[\]]|\[[^\]]*\])*)\]\(\s*<?([^)\s>]+)>?(\s+\"[^\"]*\")?\s*\)")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _records() -> list:
    # imported here, not at module level: mkdocs loads this file before the build, and lit_ft imports torch
    from lit_ft.callbacks import techniques

    return techniques()


def _utilities() -> tuple[str, ...]:
    from lit_ft.callbacks import UTILITIES

    return UTILITIES


def _family_title(family: str) -> str:
    return family.replace("_", " ").capitalize()


def api_pages() -> dict[str, str]:
    """The generated API pages: path under ``docs/`` -> markdown."""
    import importlib

    records = _records()
    pages: dict[str, str] = {}

    # the technique index, from the registry (``lit-ft techniques`` prints the same records as text)
    rows = []
    for r in records:
        paper = f"[{r.paper}]({r.arxiv_url})" if r.arxiv_url else r.paper
        doc = f"[{r.name}](../{r.doc.removeprefix('docs/')})"
        rows.append(f"| {doc} | [`{r.cls.__name__}`][{r.class_path}] | "
                    f"{_family_title(r.family)} | {paper} | `{r.config}` |")
    pages["api/index.md"] = "\n".join([
        "# API reference",
        "",
        "Generated from the docstrings at build time. The technique index below is generated from the technique "
        "registry (`lit_ft.core.registry`, also printed by `lit-ft techniques`): every class registered with "
        "`@technique` appears here and on the [techniques](techniques.md) page without a hand edit.",
        "",
        "| technique (doc page) | class | family | paper | config |",
        "|---|---|---|---|---|",
        *rows,
        "",
        f"{len(records)} techniques. Callbacks that are not paper techniques: [utilities](utilities.md). "
        "Also: [modules](modules.md), [data modules](data.md), [metrics](metrics.md), "
        "[registry](registry.md).",
        "",
    ])

    # one section per family (in registry order), one ``:::`` block per technique class
    lines = ["# Technique callbacks", "",
             "Every registered technique, by family; the doc page of each is linked from the "
             "[technique index](index.md).", ""]
    family = None
    for r in records:
        if r.family != family:
            family = r.family
            lines += [f"## {_family_title(family)}", ""]
        lines += [f"::: {r.class_path}", "    options:", "      heading_level: 3", ""]
    pages["api/techniques.md"] = "\n".join(lines)

    lines = ["# Utility callbacks", "", "Callbacks that are not paper techniques (not in the registry).", ""]
    lines += [f"::: lit_ft.callbacks.{name}\n" for name in _utilities()]
    pages["api/utilities.md"] = "\n".join(lines)

    for title, module in _OTHER_API:
        lines = [f"# {title}", "", f"The public API of `{module}`.", ""]
        lines += [f"::: {module}.{name}\n" for name in importlib.import_module(module).__all__]
        pages[f"api/{module.rsplit('.', 1)[1]}.md"] = "\n".join(lines)

    pages["api/registry.md"] = "# Technique registry\n\n::: lit_ft.core.registry\n"
    return pages


def _technique_pages(docs_dir: Path) -> list[str]:
    """Technique pages in registry order (family, then name), then the other pages of ``docs/techniques/``."""
    index = TECHNIQUES_NAV[1]
    registered = [r.doc.removeprefix("docs/") for r in _records()]
    others = sorted(p.relative_to(docs_dir).as_posix() for p in (docs_dir / "techniques").glob("*.md"))
    ordered = [index] + [p for p in registered if p != index]
    return ordered + [p for p in others if p not in ordered]


def _has(nav: list, title: str, placeholder: str) -> bool:
    for item in nav:
        if isinstance(item, dict) and len(item) == 1:
            (key, value), = item.items()
            if (key, value) == (title, placeholder) or (isinstance(value, list) and _has(value, title, placeholder)):
                return True
    return False


def _expand(nav: list, title: str, placeholder: str, pages: list) -> bool:
    for i, item in enumerate(nav):
        if isinstance(item, dict) and len(item) == 1:
            (key, value), = item.items()
            if key == title and value == placeholder:
                nav[i] = {key: pages}
                return True
            if isinstance(value, list) and _expand(value, title, placeholder, pages):
                return True
    return False


def github_unique(slug: str, used: set[str], counters: dict | None = None) -> str:
    """GitHub's id for a repeated heading: ``again``, ``again-1``, ``again-2`` (Python-Markdown's own rule is
    ``again_1``), so that an anchor tests/test_docs.py accepts is the one the site has. ``counters`` (a cache
    Python-Markdown passes) is not needed: pages have few headings."""
    base, n = slug, 0
    while slug in used or not slug:
        n += 1
        slug = f"{base}-{n}"
    used.add(slug)
    return slug


# whether this build asked for the generated API pages (an API reference placeholder in its nav)
_api_wanted = False


def on_config(config: MkDocsConfig) -> MkDocsConfig:
    global _api_wanted
    # the toc extension looks `unique` up in its module at each heading
    markdown_toc.unique = github_unique
    nav = config.nav or []
    docs_dir = Path(config.docs_dir)
    if (docs_dir / "techniques").is_dir():
        _expand(nav, *TECHNIQUES_NAV, _technique_pages(docs_dir))
    # a nav without the placeholder (a scratch docs tree, as in tests/test_docs_site.py) gets no API pages, and no
    # lit_ft import
    _api_wanted = _has(nav, *API_NAV)
    if _api_wanted:
        _expand(nav, *API_NAV, [{"Overview": API_NAV[1]}] + [p for p in api_pages() if p != API_NAV[1]])
    return config


def on_files(files: Files, config: MkDocsConfig) -> Files:
    if _api_wanted:
        for path, content in api_pages().items():
            files.append(File.generated(config, path, content=content))
    return files


def _lexical(path: Path) -> Path:
    # `..` resolved by name, symlinks kept: configs/ is a symlink into lit_ft/, and the link names configs/...
    return Path(os.path.normpath(path))


def repo_link(target: str, page_dir: Path, docs_dir: Path, repo_root: Path, repo_url: str | None) -> str | None:
    """What a link ``target`` on a page in ``page_dir`` becomes when it names a repository file outside the docs:
    the repository URL (``repo_url`` set) or ``None`` (the caller writes the path as code). Returns ``target``
    itself for every link to leave alone (external, inside ``docs/``, or missing: strict reports those)."""
    if _SCHEME.match(target) or target.startswith(("//", "#")):
        return target
    path, _, anchor = target.partition("#")
    dest = _lexical(page_dir / path)
    inside_repo = dest == repo_root or repo_root in dest.parents
    inside_docs = dest == docs_dir or docs_dir in dest.parents
    if inside_docs or not inside_repo or not dest.exists():
        return target
    if not repo_url:
        return None
    kind = "tree" if dest.is_dir() else "blob"
    rel = dest.relative_to(repo_root).as_posix()
    return f"{repo_url.rstrip('/')}/{kind}/main/{rel}" + (f"#{anchor}" if anchor else "")


def rewrite_repo_links(markdown: str, page_dir: Path, docs_dir: Path, repo_root: Path,
                       repo_url: str | None) -> str:
    """``markdown`` with its links to repository files outside ``docs_dir`` rewritten (see :func:`repo_link`);
    fenced code blocks and inline code are left as written."""
    out, fenced = [], False
    for line in markdown.split("\n"):
        if _FENCE.match(line):
            fenced = not fenced
        if fenced or _FENCE.match(line) or "](" not in line:
            out.append(line)
            continue
        # only links outside inline code spans: mask the spans, find links in the masked line, edit the original
        masked = _INLINE_CODE.sub(lambda m: "\0" * len(m.group(0)), line)
        pieces, last = [], 0
        for m in _LINK.finditer(masked):
            bang, target = m.group(1), m.group(3)
            new = repo_link(target, page_dir, docs_dir, repo_root, repo_url)
            if new == target:
                continue
            text = line[m.start(2):m.end(2)]
            rel = _lexical(page_dir / target.partition("#")[0]).relative_to(repo_root).as_posix()
            if new is not None:
                replacement = f"{bang}[{text}]({new})"
            elif text.strip("`") == rel:
                replacement = f"`{rel}`"
            else:
                replacement = f"{text} (`{rel}`)"
            pieces += [line[last:m.start()], replacement]
            last = m.end()
        out.append("".join(pieces) + line[last:])
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Page, config: MkDocsConfig, files: Files) -> str:
    if page.file.abs_src_path is None:  # a generated page: its links are written by this hook
        return markdown
    docs_dir = _lexical(Path(config.docs_dir).absolute())
    repo_root = _lexical(Path(config.config_file_path).absolute().parent)
    page_dir = _lexical(Path(page.file.abs_src_path).absolute().parent)
    return rewrite_repo_links(markdown, page_dir, docs_dir, repo_root, config.repo_url)
