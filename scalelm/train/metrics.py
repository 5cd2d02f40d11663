"""Run metrics: ``metrics.jsonl``, the progress bar, optional TensorBoard / wandb / MLflow, throughput, MFU, memory.

``metrics.jsonl`` holds one JSON object per line: training records (``step``, ``loss``, ``lr``,
``grad_norm``, ``tokens``, ``tokens_per_s``, ``mfu``, ``peak_mem_mb``, ``elapsed_s``) and
evaluation records (``step``, ``val_loss``, ``val_perplexity``, ``val_bits_per_byte``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint.names import METRICS  # noqa: F401 (RUN_DIR/metrics.jsonl; re-exported)
from ..errors import UserError
from ..fileio import atomic_write_text


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated by tensors; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_flops(device: torch.device, dtype: torch.dtype) -> Optional[float]:
    """The device's peak FLOP/s for ``dtype`` (GPU table or measured CPU matmul), or None."""
    try:
        from ..hardware import peak_flops as hw_peak
    except ImportError:
        return None
    try:
        with torch.random.fork_rng(devices=[]):  # a measurement must not shift the training RNG
            return float(hw_peak(device, dtype))
    except Exception as e:  # a missing table entry must not stop training; MFU is then unknown
        print(f"MFU unavailable: {e}", file=sys.stderr)
        return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    p = Path(run_dir) / METRICS
    if not p.is_file():
        raise UserError(f"{p} not found: is {run_dir} a run directory written by `scalelm train`?")
    records = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
    return records


class MetricsLogger:
    """Appends records to ``metrics.jsonl`` (and TensorBoard, wandb, MLflow); only the main rank writes.

    ``config`` (the run's resolved :class:`~scalelm.config.Config`) turns on the trackers its ``log``
    section asks for; they open their runs at the first record, once :meth:`truncate_after` has said
    whether this is a resume (which continues the tracker runs recorded in ``RUN_DIR/trackers.json``)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False, config=None):
        self.path = Path(run_dir) / METRICS
        self.enabled = enabled
        self.tb = None
        self.trackers = None
        self._resumed_at: Optional[int] = None
        self._started = False
        if enabled and config is not None and (config.log.wandb or config.log.mlflow):
            from .trackers import Trackers

            self.trackers = Trackers(run_dir, config.log, config.to_dict())
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("log.tensorboard=true needs the tensorboard package: "
                                "pip install tensorboard (or pip install 'scalelm[dev]')") from None
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps the resumed run will redo (logged after the checkpoint)."""
        self._resumed_at = step
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path.parent) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:  # one short line per write: a kill loses at most that line
            f.write(json.dumps(clean) + "\n")
            f.flush()
        if self.tb is not None:
            step = record["step"]
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k, v, step)
        if self.trackers is not None:
            if not self._started:
                self._started = True
                self.trackers.start(self._resumed_at)
            self.trackers.log(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.trackers is not None:
            self.trackers.close()


class Progress:
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) one plain line per log step.

    ``total`` None: the clock governs the run (``budget_s``), so progress is time, not steps."""

    def __init__(self, total: Optional[int], initial: int, enabled: bool, budget_s: Optional[float] = None):
        self.enabled, self.total, self.budget_s = enabled, total, budget_s
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, file=sys.stderr, unit="step",
                            dynamic_ncols=True, smoothing=0.1)

    def _clock(self, rec: Optional[dict]) -> str:
        """Time used of the budget and the time-based ETA (what a time-budgeted run ends by)."""
        if self.budget_s is None or rec is None or rec.get("elapsed_s") is None:
            return ""
        used = rec["elapsed_s"]
        return f"{_mmss(used)}/{_mmss(self.budget_s)}, ETA {_mmss(max(0.0, self.budget_s - used))}"

    def update(self, step: int, rec: Optional[dict] = None) -> None:
        clock = self._clock(rec)
        if self.bar is not None:
            self.bar.n = step
            if rec is not None:
                self.bar.set_postfix_str(" | ".join(filter(None, [_fmt(rec), clock])), refresh=False)
            self.bar.refresh()
        elif self.enabled and rec is not None:
            of = f"/{self.total}" if self.total is not None else ""
            print(f"step {step}{of} {_fmt(rec)}{f' | {clock}' if clock else ''}", file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _mmss(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _fmt(rec: dict) -> str:
    parts = [f"loss {rec['loss']:.4f}", f"lr {rec['lr']:.2e}"]
    if rec.get("tokens_per_s"):
        parts.append(f"{rec['tokens_per_s']:,.0f} tok/s")
    if rec.get("mfu") is not None and rec["mfu"] <= 1:  # above 1: a CPU peak measured under load
        parts.append(f"mfu {100 * rec['mfu']:.1f}%")
    return " | ".join(parts)


def env_summary() -> dict:
    """What the throughput numbers depend on, recorded next to them."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "loadavg_1m": load}
