"""Finding a run's checkpoints (``ckpt-N``, ``latest``), publishing and pruning them. No torch."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError
from ..fileio import atomic_write_text
from .names import ADAPTER, CKPT_GLOB, CONFIG, DCP_METADATA, LATEST, STAGING, WEIGHTS, ckpt_name


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary dirs start with '.')."""
    d = Path(run_dir)
    return sorted(p for p in d.glob(CKPT_GLOB) if p.is_dir() and (p / CONFIG).is_file())


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The checkpoint ``latest`` names, if it is a complete one inside ``run_dir``.

    ``latest`` holds a bare directory name. Anything else (``../other/model``, an absolute path,
    a link out of the run) is not followed: the newest complete ``ckpt-*`` is used instead.
    """
    d = Path(run_dir)
    marker = d / LATEST
    if marker.is_file():
        try:
            name = marker.read_text().strip()
        except (OSError, UnicodeDecodeError):
            name = ""
        p = d / name
        if name and "/" not in name and "\\" not in name and name not in (".", "..") \
                and p.resolve().parent == d.resolve() and (p / CONFIG).is_file():
            return p
    ckpts = list_checkpoints(d)  # marker missing, stale or pointing elsewhere: the newest complete one
    return ckpts[-1] if ckpts else None


def set_latest(run_dir: str | Path, name: str) -> None:
    """Point ``RUN_DIR/latest`` at the (published) checkpoint ``name``, atomically."""
    atomic_write_text(Path(run_dir) / LATEST, name + "\n")


def prune_checkpoints(run_dir: str | Path, keep_last: int, protect: str) -> None:
    """Delete all but the newest ``keep_last`` checkpoints (never ``protect``)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def clean_staging(run_dir: str | Path) -> None:
    """Remove half-written checkpoints left by a kill (they were never visible). Safe only under
    the run's lock: a live writer's staging dirs have the same names."""
    for pattern in STAGING:  # ..staging-*: a writer's temporary dir inside a checkpoint's stage
        for p in Path(run_dir).glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def is_model_dir(path: str | Path) -> bool:
    """A config.json and weights: full ones, LoRA adapters or a sharded checkpoint's shards."""
    p = Path(path)
    return (p / CONFIG).is_file() and any((p / f).is_file() for f in (WEIGHTS, ADAPTER, DCP_METADATA))


def resolve_checkpoint(path: str | Path) -> Path:
    """A model directory, or a RUN_DIR meaning its latest checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if is_model_dir(p):
        return p  # a model dir, or a sharded checkpoint that load_model_dir consolidates
    latest = latest_checkpoint(p)
    if latest is None:
        raise CheckpointError(f"{p} holds no checkpoint (expected {WEIGHTS} + {CONFIG}, "
                              f"or a run directory with {ckpt_name(0).replace('0' * 8, '<step>')}/ inside)")
    return latest
