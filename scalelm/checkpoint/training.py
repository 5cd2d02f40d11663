"""A training checkpoint, files <-> state dicts: everything needed to continue a run bit for bit.

One process (``scalelm.train.state``)::

    RUN_DIR/ckpt-<step>/  a model directory (model.safetensors, or a LoRA run's adapter.safetensors;
                          config.json, tokenizer.json) + optimizer.safetensors (AdamW moments keyed
                          "<param fqn>/<key>"), rng.safetensors (torch generator states), state.json
                          (step, loader position, Python/NumPy RNG states, optimizer param groups, ...)

Sharded (torchrun, ``scalelm.train.sharded_state``; files in :mod:`scalelm.checkpoint.dcp`)::

    RUN_DIR/ckpt-<step>/  config.json (+ "sharded": true), tokenizer.json, state.json, dcp/, rng/rank-<r>.*

Both are staged in ``RUN_DIR/.staging-ckpt-<step>``, hashed by ``manifest.json`` (checked before
resuming), published atomically, then ``RUN_DIR/latest`` is rewritten: a kill at any moment
leaves the previous checkpoint intact. No pickle anywhere.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from .model_dir import write_tensors
from .names import CONFIG, OPTIMIZER, RNG, STATE, ckpt_name, staging_name
from .rundir import prune_checkpoints, set_latest
from .staging import staged_dir


@contextmanager
def checkpoint_stage(run_dir: str | Path, step: int, keep_last: int = 3, adopt: bool = False) -> Iterator[Path]:
    """Stage ``RUN_DIR/ckpt-<step>``; when the block ends normally, write the manifest (last: it
    covers every file), publish it, point ``latest`` at it and prune old checkpoints. ``adopt``:
    the stage is already there, filled by every rank (a sharded save)."""
    run_dir = Path(run_dir)
    name = ckpt_name(step)
    with staged_dir(run_dir / name, stage=run_dir / staging_name(name), adopt=adopt) as d:
        yield d
    set_latest(run_dir, name)
    prune_checkpoints(run_dir, keep_last, protect=name)


def write_state(d: str | Path, state: dict) -> None:
    (Path(d) / STATE).write_text(json.dumps(state, indent=1) + "\n")


def write_training_files(d: str | Path, optimizer: dict[str, torch.Tensor], rng: dict[str, torch.Tensor],
                         state: dict) -> None:
    """A one-process checkpoint's files beside its model files: optimizer, RNG, ``state.json``."""
    write_tensors(Path(d) / OPTIMIZER, optimizer)
    write_tensors(Path(d) / RNG, rng, pt_format=False)
    write_state(d, state)


def is_training_checkpoint(path: str | Path) -> bool:
    return all((Path(path) / f).is_file() for f in (CONFIG, OPTIMIZER, RNG, STATE))


def missing_training_files(path: str | Path) -> list[str]:
    return [f for f in (OPTIMIZER, RNG, STATE) if not (Path(path) / f).is_file()]


def read_state(ckpt: str | Path) -> dict:
    """``state.json`` as JSON (its keys are checked by the trainer, which knows what it reads)."""
    p = Path(ckpt) / STATE
    try:
        return json.loads(p.read_text())
    except OSError:
        raise CheckpointError(f"{p} is missing or unreadable") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is corrupt: {e}") from None


def read_optimizer(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """``optimizer.safetensors``: AdamW state keyed ``"<param fqn>/<key>"``."""
    p = Path(ckpt) / OPTIMIZER
    try:
        return load_file(str(p))
    except Exception as e:  # safetensors raises several types for a damaged or missing file
        raise CheckpointError(f"{p} is missing or corrupt: {e}") from None


def read_rng(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """``rng.safetensors`` (torch generator states); the caller reports a damaged one with the
    ``state.json`` entry it goes with."""
    return load_file(str(Path(ckpt) / RNG))
