"""The command-line entry shared by the kernels' Triton self-checks (``python -m lit_ft.kernels.<op>.selfcheck``)."""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence, Tuple


def run_selfcheck(cases: Sequence[Tuple[str, dict]], run_case: Callable[..., bool],
                  argv: Optional[Sequence[str]] = None) -> int:
    """Runs every ``(name, kwargs)`` case with ``run_case(name, device=..., **kwargs)``; prints ``ALL PASS`` or
    ``SOME FAILED`` and returns the exit status (0 when every case passed)."""
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    results = [run_case(name, device=args.device, **kw) for name, kw in cases]
    print("ALL PASS" if all(results) else "SOME FAILED")
    return 0 if all(results) else 1
