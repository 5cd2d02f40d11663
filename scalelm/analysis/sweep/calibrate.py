"""Turning ``--minutes`` into a plan: measured step times per model size, then a scaled grid.

Small models on a CPU are far from the matmul peak (per-op overheads, attention, the loss),
so a single FLOP rate would misjudge them. Instead each family member that a plan uses is
timed for a few real training steps (the trainer's own step, ``scalelm.train.probe``: its
precision, master weights, AdamW and clipping), and a run's time is predicted as process
start-up + steps x step time + its two evaluations; the fixed part is measured with one real,
3-step trainer run. The grid's compute is then scaled until the predicted total fits the minutes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

from ...config import Config
from .plan import Family, GridSettings, Member, PlanError, RunSpec, auto_grid

PROBE_STEPS = 3


class StepTimer:
    """Measures (and caches) one optimizer step's wall time for members of a family."""

    def __init__(self, family: Family, cfg: Config, micro_batch: int, accum: int, repeats: int = 3,
                 log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
                 probe_cmd: Optional[Callable] = None):
        self.family, self.cfg, self.B, self.accum, self.repeats = family, cfg, micro_batch, accum, repeats
        self.probe_cmd = probe_cmd  # (member, steps, run_dir) -> a `scalelm train` command line
        self.log = log
        self.cache: dict[tuple[int, int], float] = {}
        self._startup: Optional[float] = None

    def step_seconds(self, m: Member) -> float:
        key = (m.width, m.n_layer)
        if key not in self.cache:
            self.cache[key] = self._measure(m)
            tps = self.B * self.accum * self.family.base.block_size / self.cache[key]
            self.log(f"calibrate: {m.shape} ({m.params:,} non-embedding params): "
                     f"{self.cache[key] * 1e3:.0f} ms/step, {tps:,.0f} tokens/s")
        return self.cache[key]

    def _measure(self, m: Member) -> float:
        """The trainer's own step for the sweep's config (its precision, master weights, AdamW,
        clipping), ``accum`` micro-batches of ``B`` sequences, on a fresh member."""
        from ...train.probe import time_steps

        return time_steps(self.cfg, self.family.config(m.width, m.n_layer), micro_batch=self.B, accum=self.accum,
                          repeats=self.repeats)

    def startup_seconds(self) -> float:
        """A run's fixed cost: a real trainer process trained for ``PROBE_STEPS`` steps of the smallest
        member (start-up, data, first evaluation, peak measurement, checkpoint), less those steps."""
        if self._startup is None:
            self._startup = self._probe() if self.probe_cmd is not None else None
            if self._startup is None:  # no probe (or it failed): at least the interpreter and imports
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", "import scalelm.train, scalelm.data.loader"], check=True,
                               capture_output=True)
                self._startup = time.perf_counter() - t0
            self.log(f"calibrate: a run costs {self._startup:.1f} s besides its steps (start-up, evaluation, saving)")
        return self._startup

    def _probe(self) -> Optional[float]:
        import torch

        m = self.family.member(self.family.head_dim)
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), TOKENIZERS_PARALLELISM="false")
        with tempfile.TemporaryDirectory(prefix="scalelm-probe-") as tmp:
            cmd = self.probe_cmd(m, PROBE_STEPS, Path(tmp) / "run")
            t0 = time.perf_counter()
            p = subprocess.run(cmd, capture_output=True, text=True, env=env)
            wall = time.perf_counter() - t0
        if p.returncode != 0:
            self.log(f"calibrate: the probe run failed ({p.stderr.strip().splitlines()[-1:] or p.returncode}); "
                     f"counting start-up only")
            return None
        return max(0.0, wall - PROBE_STEPS * self.step_seconds(m))

    def run_seconds(self, run: RunSpec) -> float:
        t = self.step_seconds(run.member)
        evals = 2 * self.cfg.train.eval_iters * t / (3 * self.accum)  # at step 0 and at the end; forward only
        return self.startup_seconds() + run.steps * t + evals


def plan_for_seconds(family: Family, seconds: float, tokens_per_step: int, g: GridSettings, timer: StepTimer,
                     sizes: Optional[list[Member]] = None, tokens: Optional[list[float]] = None
                     ) -> tuple[list[RunSpec], float]:
    """The auto grid whose predicted wall time is close to (and not above) ``seconds``."""
    probe = min(sizes or family.members(8 * family.head_dim), key=lambda m: abs(m.width - 4 * family.head_dim))
    rate = probe.flops_per_token * tokens_per_step / timer.step_seconds(probe)  # FLOP/s, a first guess
    budget = 0.7 * seconds * rate
    best: Optional[tuple[list[RunSpec], float]] = None
    below, above = 0.0, math.inf  # FLOP budgets known to plan too little (or nothing) / too much time
    for _ in range(24):
        try:
            runs = auto_grid(family, budget, tokens_per_step, g, sizes, tokens)
        except PlanError:  # too small a budget for the grid's minimum runs
            below = max(below, budget)
            budget = math.sqrt(budget * above) if math.isfinite(above) else budget * 2
            continue
        est = [timer.run_seconds(r) for r in runs]
        total = sum(est)
        for r, e in zip(runs, est):
            r.est_seconds = round(e, 1)
        if total <= seconds:
            below = max(below, budget)
            if best is None or total > best[1]:
                best = (runs, total)
            if total >= 0.97 * seconds:
                break
        else:
            above = min(above, budget)
        fixed = len(runs) * timer.startup_seconds()
        if seconds <= fixed and best is None and not below:
            break
        ratio = (seconds - fixed) / max(total - fixed, 1e-9)
        if total > seconds:  # just over: step down at least 3%, or the discrete grid may not change at all
            ratio = min(ratio, 0.97)
        guess = budget * max(0.1, min(10.0, ratio))
        # a bracketed guess stays inside the bracket (the grid is discrete: proportional steps can
        # jump back and forth over the target); otherwise follow the proportional estimate
        budget = guess if below < guess < above else (math.sqrt(max(below, 1e-30) * above)
                                                       if below and math.isfinite(above) else guess)
    if best is None:
        raise PlanError(f"{seconds / 60:.1f} minutes of training cannot fit a sweep here: each run costs at least "
                        f"{timer.startup_seconds():.0f} s to start and needs {g.min_steps} steps; "
                        f"give more --minutes, fewer --levels/--per-level, or smaller --model.block_size")
    return best


# ----------------------------------------------------------------------------- the data-parallel check's cost

DP_STEPS = 30


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def dp_configs(device_type: str, gpus: int = 0, cores: Optional[int] = None) -> list[tuple[str, int, Optional[int]]]:
    """(name, processes, threads per process); threads is None on GPUs."""
    if device_type == "cuda":
        counts = [p for p in (1, 2, 4, 8) if p <= gpus]
        return [(f"{p}gpu", p, None) for p in counts] if len(counts) > 1 else []
    cores = cores or usable_cores()
    procs = [p for p in (2, 4) if p <= cores]
    if not procs:
        return []
    return [("1x1", 1, 1)] + [(f"{p}x1", p, 1) for p in procs] + [(f"1x{procs[-1]}", 1, procs[-1])]


def dp_check_seconds(family: Family, timer) -> float:
    """What the check will cost (for ``--minutes``): start-ups plus steps of a mid-size member."""
    configs = dp_configs("cpu")
    mid = family.member(4 * family.head_dim)
    return len(configs) * (timer.startup_seconds() + 5) + 1.5 * len(configs) * DP_STEPS * timer.step_seconds(mid)
