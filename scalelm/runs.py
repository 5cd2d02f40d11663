"""Run and model directories on disk: their file names, ``ckpt-N``, ``latest`` and ``best``.

Shared by every stage (data reads a run's tokenizer, model loads a run's latest weights, train
writes checkpoints), so it lives low and imports no torch. The file names themselves, and
finding a run's checkpoints, are :mod:`scalelm.checkpoint`'s (re-exported here)::

    RUN_DIR/config.json        the resolved training config
            latest             names the newest complete checkpoint (ckpt-00000400)
            ckpt-00000400/     a model directory (+ optimizer, RNG, state for resuming)
            best/              a model directory of the best validation loss so far
    MODEL_DIR/model.safetensors + config.json (+ tokenizer.json)
    LORA_DIR/adapter.safetensors + config.json naming its base model dir (a LoRA run's checkpoints)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from .checkpoint.names import (  # noqa: F401 (the names, re-exported for the stages that import them from here)
    ADAPTER,
    BEST,
    CONFIG,
    DCP_METADATA,
    LATEST,
    LOCK,
    LOCK_HOLDER,
    RUN_MARKERS,
    STATE,
    TOKENIZER,
    WEIGHTS,
    ckpt_name,
)
from .checkpoint.rundir import is_model_dir, latest_checkpoint, list_checkpoints, resolve_checkpoint  # noqa: F401
from .errors import UserError


def is_run_dir(path: str | Path) -> bool:
    """A training run's directory: checkpoints, ``latest``, metrics or the run's data record."""
    p = Path(path)
    return p.is_dir() and (bool(list_checkpoints(p)) or any((p / m).is_file() for m in RUN_MARKERS))


def is_scalelm_model_dir(path: str | Path) -> bool:
    """A model directory that is not a training checkpoint (those belong to their run)."""
    return is_model_dir(path) and not (Path(path) / STATE).exists()


def check_output_dir(out: str | Path, kind: str, is_kind: Callable[[Path], bool], sources: Iterable = (),
                     overwrite: bool = False, option: str = "--out") -> None:
    """Refuse an output directory whose replacement would destroy something.

    Always refused: the source itself, a folder above a source, a run directory. An existing,
    non-empty directory is replaced only if ``is_kind`` says it is an earlier output of this
    kind and ``overwrite`` is set. Called before anything is read or written.
    """
    out = Path(out)
    target = out.resolve()
    for src in sources:
        s = Path(src).resolve()
        if target == s:
            raise UserError(f"{option} {out} is the source itself: choose another directory")
        if target in s.parents:
            raise UserError(f"{option} {out} is a folder above the source {src}: replacing it would delete the "
                            f"source; choose another directory")
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"{option} {out} is a file: choose a directory")
    if not any(out.iterdir()):
        return
    if is_run_dir(out):
        raise UserError(f"{option} {out} is a training run directory: it is never replaced (nothing was touched); "
                        f"choose another directory")
    if not is_kind(out):
        raise UserError(f"{option} {out} exists, is not empty and does not hold a {kind}: nothing was touched; "
                        f"choose a new or empty directory")
    if not overwrite:
        raise UserError(f"{option} {out} already holds a {kind}: pass --overwrite to replace it, or choose "
                        f"another directory")


def check_output_file(out: str | Path, inputs: Iterable = (), option: str = "--out") -> Path:
    """The one rule for a command's output FILE, checked before any work is done: never one of the
    command's inputs (its files, its model's files), never inside a model or run directory (it would
    corrupt the model or be taken for one of its files), never an existing directory, and its folder
    must exist. The caller then writes it atomically (``fileio.atomic_write_text``)."""
    out = Path(out)
    target = out.resolve()
    for src in inputs:
        if src is None:
            continue
        s = Path(src).resolve()
        if target == s:
            raise UserError(f"{option} {out} is the input {src}: writing it would replace what is being read; "
                            f"choose another file (nothing was written)")
    if out.is_dir():
        raise UserError(f"{option} {out} is a directory: give a file path")
    for parent in target.parents:
        if is_model_dir(parent) or is_run_dir(parent):
            raise UserError(f"{option} {out} lies inside the model or run directory {parent}: writing there "
                            f"could corrupt it; choose a file outside it (nothing was written)")
    if not target.parent.is_dir():
        raise UserError(f"{option} {out}: the folder {out.parent} does not exist")
    return out


# ----------------------------------------------------------------------------- one writer per run

class RunDirLocked(UserError):
    """Another live process writes to this run directory."""


class RunLock:
    """An exclusive lock on ``RUN_DIR/.lock`` (``filelock``: ``flock``, freed by the kernel when its
    holder dies, so the lock of a killed run is simply taken over)."""

    def __init__(self, run_dir: str | Path, command: str = "train"):
        self.run_dir, self.command, self._lock, self._created = Path(run_dir), command, None, False

    def holder(self) -> dict:
        try:
            return json.loads((self.run_dir / LOCK_HOLDER).read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "RunLock":
        from filelock import FileLock, Timeout

        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise UserError(f"--out {self.run_dir} is a file: choose a directory")
        self._created = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.run_dir / LOCK), timeout=0, is_singleton=False)
        try:
            lock.acquire()
        except Timeout:
            h = self.holder()
            who = f"process {h['pid']} (scalelm {h.get('command', '?')}, since {h.get('started', '?')})" \
                if "pid" in h else "another process"
            raise RunDirLocked(f"{self.run_dir} is in use by {who}: two writers would overwrite each other's "
                               f"checkpoints; wait for it to finish, stop it, or use another --out") from None
        self._lock = lock
        info = {"pid": os.getpid(), "command": self.command,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (self.run_dir / LOCK_HOLDER).write_text(json.dumps(info) + "\n")
        return self

    def release(self) -> None:
        if self._lock is not None:
            (self.run_dir / LOCK_HOLDER).unlink(missing_ok=True)
            self._lock.release()
            self._lock = None
            if self._created and {p.name for p in self.run_dir.iterdir()} <= {LOCK}:
                # a run that failed before writing anything leaves no directory behind
                (self.run_dir / LOCK).unlink(missing_ok=True)
                try:
                    self.run_dir.rmdir()
                except OSError:
                    pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
