"""Peak resident memory of this process on Linux (CPU has no allocator statistics): reset the high-water mark through
/proc/self/clear_refs, read it back from /proc/self/status. Shared by the CPU benchmarks."""

from __future__ import annotations

import os


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_worker(cmd: list[str], what: str) -> dict:
    """Run one measurement in a fresh process (its peak RSS is its own) and parse its ``RESULT {json}`` line."""
    import json
    import subprocess

    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{what} worker failed:\n{proc.stdout}\n{proc.stderr}")


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def measure_peak(fn, cuda: bool) -> tuple[float, int]:
    """Run ``fn()`` once; returns ``(seconds, peak bytes above the start)``: the CUDA allocator's peak on a GPU, the
    process's RSS high-water mark on CPU (reset first)."""
    import time

    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_bytes()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - base
    return elapsed, peak


def first_peak_then_times(step, cuda: bool, repeats: int) -> tuple[int, list[float]]:
    """Peak memory of the first full-size ``step()`` in this fresh process (freed heap memory would hide later peaks),
    then the wall time of ``repeats`` more steps (synchronised on CUDA)."""
    import gc
    import time

    import torch

    gc.collect()
    _, peak = measure_peak(step, cuda)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return peak, times
