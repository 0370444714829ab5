"""The layering rules of docs/architecture.md, checked on the source (static imports, including function-level ones):
no import cycle between lit_ft modules; nothing under lit_ft/callbacks imports lit_ft.modules; lit_ft/core and
lit_ft/kernels import no technique; a technique never imports another technique's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lit_ft"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import in the file, absolute, lit_ft only."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("lit_ft")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("lit_ft"):
                out.append((mod, [a.name for a in node.names]))
    return out


FILES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(mod: str, names: list[str]) -> list[str]:
    """The lit_ft modules an import statement loads (``from pkg import submodule`` loads the submodule)."""
    found = [mod] if mod in FILES else []
    found += [f"{mod}.{n}" for n in names if f"{mod}.{n}" in FILES]
    return found


GRAPH = {m: sorted({t for mod, names in _imports(p) for t in _resolve(mod, names)} - {m}) for m, p in FILES.items()}


def _is_technique(mod: str) -> bool:
    parts = mod.split(".")
    return len(parts) >= 4 and parts[1] == "callbacks" and not parts[-1].startswith("_") and parts[-1] != "__init__"


def test_no_import_cycle():
    """Module-level imports only: function-level imports are how a lazy optional dependency is written, but a cycle
    through them still means two layers lean on each other, so they count too."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in GRAPH.get(m, []):
            # a package's __init__ re-exporting its own submodules is not a cycle of layers
            if t.startswith(m + ".") or m.startswith(t + ".") and FILES[t].name == "__init__.py":
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(t) is None:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if state.get(m) is None:
            visit(m)


def _module_techniques() -> set[str]:
    """The files of registered techniques that are LightningModules themselves (BlackBoxPromptLearning runs its own
    loop): the registry addresses every technique as ``lit_ft.callbacks.<Name>``, so a callbacks package re-exports
    them."""
    import lightning.pytorch as pl

    import lit_ft

    return {r.cls.__module__ for r in lit_ft.techniques() if issubclass(r.cls, pl.LightningModule)}


def test_callbacks_never_import_modules():
    exempt = _module_techniques()
    bad = [(m, t) for m, ts in GRAPH.items() if m.startswith("lit_ft.callbacks") for t in ts
           if t.startswith("lit_ft.modules") and not (FILES[m].name == "__init__.py" and t in exempt)]
    assert not bad, bad


def test_core_and_kernels_import_no_technique_or_module():
    bad = [(m, t) for m, ts in GRAPH.items() if m.startswith(("lit_ft.core", "lit_ft.kernels")) for t in ts
           if t.startswith(("lit_ft.callbacks", "lit_ft.modules", "lit_ft.data", "lit_ft.cli"))]
    assert not bad, bad


def test_no_technique_imports_another_techniques_private_names():
    bad = []
    for m, p in FILES.items():
        if not m.startswith("lit_ft.callbacks"):
            continue
        for mod, names in _imports(p):
            if _is_technique(mod) and mod != m:
                bad += [(m, mod, n) for n in names if n.startswith("_")]
    assert not bad, bad


def test_the_checks_see_the_code():
    """Guards against a vacuous pass: the graph holds the engine and its known edges."""
    assert "lit_ft.core.loss.attach" in GRAPH and "lit_ft.core.loss.pipeline" in GRAPH["lit_ft.core.loss.attach"]
    assert any(_is_technique(m) for m in GRAPH)
