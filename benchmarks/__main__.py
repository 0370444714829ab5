"""``python -m benchmarks`` (what ``make bench`` runs): every study with a resumable per-row cache, then the tables
and pictures of docs/benchmarks.md and the README regenerated from their results.

Each study below caches every finished row under ``runs/bench/<study>/`` and writes
``benchmarks/results/<study>.json`` (its rows and its markdown table), so an interrupted ``make bench`` resumes where
it stopped and a second one only re-renders. The table goes into docs/benchmarks.md between the markers
``<!-- bench:<study> -->`` and ``<!-- /bench:<study> -->``; the picture is redrawn from the rows.

    python -m benchmarks                        # run (resume) every study, then render
    python -m benchmarks --render-only          # tables and pictures from benchmarks/results/*.json, no training
    python -m benchmarks --only param_forgetting
    python -m benchmarks --seeds 0              # one seed: about 3 h on 2 cores from an empty cache (published: 0,1)
    python -m benchmarks --list

The other scripts in this folder (kernel timings, memory probes, older studies) print their own tables; their
commands are on the sections of docs/benchmarks.md that quote them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Study:
    """One resumable study: its script (a module of this folder with ``main`` and ``_plot(rows, path)``), the
    arguments of the published run, and the picture it draws."""

    script: str
    args: list[str] = field(default_factory=list)
    picture: str | None = None
    what: str = ""


#: issue 12's three studies, one per family: the published runs' arguments
STUDIES: dict[str, Study] = {
    "token_selection_noise": Study(
        "token_selection_noise", ["--seeds", "0,1", "--diagnose", "400", "--oracle"], "docs/img/token_selection_noise.png",
        "token selection under 40% wrong answers (ASDiv): plain SFT vs Rho-1 with a clean reference, SSToken, "
        "QTuning, KeyTokenWeighting"),
    "param_forgetting": Study(
        "param_forgetting", ["--seeds", "0,1"], "docs/img/param_forgetting.png",
        "parameter techniques on the whole 30-layer model: ASDiv gain and Alpaca forgetting"),
    "prompt_rates": Study(
        "prompt_rates", ["--seeds", "0,1"], "docs/img/prompt_rates.png",
        "prompt methods at their papers' rates beside full fine-tuning and LoRA (sarcasm)"),
}
_BLOCK = "<!-- bench:{name} -->\n{body}\n<!-- /bench:{name} -->"


RESULTS = REPO / "benchmarks" / "results"


def study_args(study: Study, seeds: str | None = None) -> list[str]:
    """The study's published arguments, with its ``--seeds`` value replaced by ``seeds`` when given (a one-seed
    run fits the ~3 h budget on 2 cores; the published run has two seeds)."""
    args = list(study.args)
    if seeds is not None:
        if "--seeds" not in args:
            raise SystemExit(f"--seeds: study {study.script!r} takes no seeds")
        args[args.index("--seeds") + 1] = seeds
    return args


def run(name: str, study: Study, seeds: str | None = None) -> None:
    cmd = [sys.executable, str(REPO / "benchmarks" / f"{study.script}.py"), *study_args(study, seeds)]
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})


def render(name: str, study: Study, docs: str, results: Path = RESULTS, draw: bool = True) -> str:
    """``docs`` (docs/benchmarks.md's text) with this study's block replaced by its results' table; with ``draw``
    its picture redrawn from the rows. A study without results yet leaves its block as it is."""
    path = results / f"{name}.json"
    if not path.is_file():
        print(f"-- {name}: no {path} yet (run the study first)", flush=True)
        return docs
    data = json.loads(path.read_text())
    pattern = re.compile(re.escape(f"<!-- bench:{name} -->") + r"\n.*?\n" + re.escape(f"<!-- /bench:{name} -->"),
                         re.S)
    if not pattern.search(docs):
        raise SystemExit(f"docs/benchmarks.md has no <!-- bench:{name} --> ... <!-- /bench:{name} --> block")
    docs = pattern.sub(lambda _: _BLOCK.format(name=name, body=data["table"]), docs)
    if study.picture and draw:
        sys.path.insert(0, str(REPO))
        importlib.import_module(f"benchmarks.{study.script}")._plot(data["rows"], str(REPO / study.picture))
    print(f"-- {name}: table{' and ' + study.picture if study.picture and draw else ''} rendered", flush=True)
    return docs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--render-only", action="store_true", help="no training: tables and pictures from the results")
    p.add_argument("--only", type=str, default=None, help="comma-separated study names")
    p.add_argument("--list", action="store_true")
    p.add_argument("--seeds", type=str, default=None,
                   help="replace every study's seeds (e.g. 0: about 3 h on 2 cores from an empty cache; the tables "
                        "then show those seeds only)")
    args = p.parse_args(argv)
    if args.seeds is not None and not all(s.strip().isdigit() for s in args.seeds.split(",")):
        raise SystemExit(f"--seeds: expected comma-separated integers such as 0 or 0,1, got {args.seeds!r}")
    names = list(STUDIES) if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        raise SystemExit(f"--only: unknown studies {unknown}; known: {list(STUDIES)}")
    if args.list:
        for n in names:
            print(f"{n}: {STUDIES[n].what}\n    python benchmarks/{STUDIES[n].script}.py "
                  f"{' '.join(study_args(STUDIES[n], args.seeds))}")
        return
    if not args.render_only:
        for n in names:
            run(n, STUDIES[n], args.seeds)
    doc_path = REPO / "docs" / "benchmarks.md"
    docs = doc_path.read_text()
    for n in names:
        docs = render(n, STUDIES[n], docs)
    doc_path.write_text(docs)


if __name__ == "__main__":
    main()
