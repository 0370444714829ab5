"""The per-row cache of the resumable studies (``python -m benchmarks``): every finished row is written at once under
the study's cache folder, keyed by the arguments that change it, so an interrupted study resumes at the first
missing row and a rerun only renders."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

Row = dict[str, Any]


def add_cache_arguments(p: argparse.ArgumentParser, default_cache: str) -> None:
    """``--only``, ``--cache``, ``--cached-only``, ``--force``, ``--no-results``, ``--plot``: the same in every study."""
    p.add_argument("--only", type=str, default=None, help="comma-separated arm-name prefixes")
    p.add_argument("--cache", type=str, default=default_cache)
    p.add_argument("--cached-only", action="store_true",
                   help="no training: the table from the rows already cached (missing rows are left out)")
    p.add_argument("--force", action="store_true", help="rerun cached rows")
    p.add_argument("--no-results", action="store_true", help="do not write benchmarks/results/ (smoke runs)")
    p.add_argument("--plot", type=str, default=None)


def selected(arms: list[str], only: str | None) -> list[str]:
    return [n for n in arms if not only or any(n.startswith(w.strip()) for w in only.split(","))]


def cached_rows(args: argparse.Namespace, arms: list[str], key: Callable[[str, int], str],
                run: Callable[[str, int], Row]) -> list[Row]:
    """Each (seed, arm) row from ``<cache>/row_<key>.json``, running (and caching) the missing ones unless
    ``--cached-only``; ``--force`` reruns them all."""
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for name in selected(arms, args.only):
            path = cache / f"row_{key(name, seed)}.json"
            if path.is_file() and not args.force:
                rows.append(json.loads(path.read_text()))
                continue
            if args.cached_only:
                continue
            row = run(name, seed)
            path.write_text(json.dumps(row))
            print(f"[{name}, seed {seed}] {row}", flush=True)
            rows.append(row)
    return rows


def write_results(repo: str, study: str, args: argparse.Namespace, rows: list[Row], table: str, **extra: Any) -> None:
    """``benchmarks/results/<study>.json``: what ``python -m benchmarks --render-only`` renders from."""
    if args.no_results:
        return
    out = Path(repo) / "benchmarks" / "results" / f"{study}.json"
    out.write_text(json.dumps({"args": vars(args), **extra, "rows": rows, "table": table}, indent=1) + "\n")


def bar_plot(ax: Any, rows: list[Row], metric: str, is_reference: Callable[[str], bool]) -> None:
    """One bar per arm (mean over seeds, each seed a dot); references grey."""
    import statistics

    names = list(dict.fromkeys(r["name"] for r in rows))
    for j, n in enumerate(names):
        vals = [r[metric] for r in rows if r["name"] == n]
        ax.bar(j, statistics.mean(vals), color="#888" if is_reference(n) else "#3a7")
        ax.plot([j] * len(vals), vals, "k.", markersize=4)
    ax.set_xticks(range(len(names)), [n.split(" (")[0] for n in names], rotation=25, ha="right", fontsize=8)
