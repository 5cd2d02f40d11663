"""Run and model directories on disk: their file names, ``ckpt-N``, ``latest`` and ``best``.

Shared by every stage (data reads a run's tokenizer, model loads a run's latest weights, train
writes checkpoints), so it lives at the bottom and imports no torch::

    RUN_DIR/config.json        the resolved training config
            latest             names the newest complete checkpoint (ckpt-00000400)
            ckpt-00000400/     a model directory (+ optimizer, RNG, state for resuming)
            best/              a model directory of the best validation loss so far
    MODEL_DIR/model.safetensors + config.json (+ tokenizer.json)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import CheckpointError

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
DCP_METADATA = Path("dcp") / ".metadata"  # a sharded (torchrun) checkpoint instead of WEIGHTS
LATEST = "latest"  # RUN_DIR/latest names the newest complete checkpoint directory
BEST = "best"  # RUN_DIR/best is a model dir of the best validation loss so far


def ckpt_name(step: int) -> str:
    return f"ckpt-{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary dirs start with '.')."""
    d = Path(run_dir)
    return sorted(p for p in d.glob("ckpt-*") if p.is_dir() and (p / CONFIG).is_file())


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


def is_model_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and ((p / WEIGHTS).is_file() or (p / DCP_METADATA).is_file())


def is_run_dir(path: str | Path) -> bool:
    """A training run's directory (checkpoints or a saved run config without a model format)."""
    p = Path(path)
    return p.is_dir() and (bool(list_checkpoints(p)) or (p / LATEST).is_file() or (p / "metrics.jsonl").is_file())


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
