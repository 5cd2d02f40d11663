"""Shared benchmark plumbing: a quiet-machine check, alternating pairs, medians, JSON results.

Timings on a shared machine are only worth reporting when nobody else was using it: every
sample is taken inside a ``LoadMeter`` (CPU time other processes used, from /proc/stat) and
samples taken while others used more than ``BUSY`` of the cores are discarded and retaken.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

from scalelm.hardware import LoadMeter, cpu_has_bf16, cpu_name  # noqa: E402

BUSY = 0.15  # a sample is discarded when other processes used more than 15% of the cores


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def wait_quiet(max_wait: float = 120.0, window: float = 1.0) -> bool:
    """Wait until other processes leave the machine alone for a ``window``; False on timeout."""
    deadline = time.time() + max_wait
    while True:
        with LoadMeter() as lm:
            time.sleep(window)
        if lm.other <= BUSY:
            return True
        if time.time() > deadline:
            return False
        log(f"  waiting for a quiet machine (others use {lm.other:.0%} of the cores)")


def timed(fn: Callable[[], None], max_retries: int = 20, wait: float = 120.0) -> tuple[float, float, int]:
    """Seconds one call of ``fn`` takes on a quiet machine: (seconds, others' load, discarded)."""
    discarded = 0
    while True:
        with LoadMeter() as lm:
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
        if lm.other <= BUSY or discarded >= max_retries:
            return dt, lm.other, discarded
        discarded += 1
        wait_quiet(wait)


def alternate(fns: dict[str, Callable[[], None]], rounds: int, max_retries: int = 20) -> dict:
    """Run every function once per round, in turn, so slow drift hits all alike.

    Returns per name: the samples (seconds), their median, the loads they ran under and how
    many samples were discarded as taken on a busy machine.
    """
    out = {k: dict(samples=[], loads=[], discarded=0) for k in fns}
    for r in range(rounds):
        names = list(fns) if r % 2 == 0 else list(fns)[::-1]  # ABBA order cancels linear drift
        for k in names:
            dt, load, disc = timed(fns[k], max_retries)
            out[k]["samples"].append(dt)
            out[k]["loads"].append(round(load, 3))
            out[k]["discarded"] += disc
    for v in out.values():
        v["median"] = statistics.median(v["samples"])
    return out


def paired_ratio(a: list[float], b: list[float]) -> float:
    """Median over rounds of a[i] / b[i]: the speed of b relative to a, robust to drift."""
    return statistics.median(x / y for x, y in zip(a, b))


def machine(peaks: bool = True) -> dict:
    import torch

    info = dict(cpu=cpu_name(), cores=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), bf16_native=cpu_has_bf16())
    if peaks:
        from scalelm.hardware import cpu_peaks

        p = cpu_peaks()
        info.update(peak_fp32_gflops=round(p["fp32"] / 1e9, 1), peak_bf16_gflops=round(p["bf16"] / 1e9, 1),
                    mem_bandwidth_gbs=round(p["mem_bandwidth"] / 1e9, 1), peaks_measured_under_load=p["other_load"])
    return info


def write_json(name: str, data: dict, results: Optional[Path] = None) -> Path:
    from scalelm.fileio import atomic_write_text

    path = (results or RESULTS) / name
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    return path
