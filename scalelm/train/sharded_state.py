"""Sharded training checkpoints (torchrun): every rank writes and reads its own shards with DCP.

    RUN_DIR/ckpt-<step>/config.json      model config (as in a model directory) + "sharded": true
                        tokenizer.json
                        state.json        step, loader, scheduler, ... (the trainer's state)
                        dcp/              .metadata + one __<rank>_0.distcp per rank:
                                          {"model": weights, "optim": AdamW state}
                        rng/rank-<r>.safetensors + rank-<r>.json   each rank's RNG states

Keys are the plain model's names (``scalelm.distributed.dcp.training_state_dicts``), so a
checkpoint loads into any layout; a single-process checkpoint (``state.py``) loads into any
layout too (:func:`load_full_training_checkpoint`).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..distributed.dcp import (
    DCP_DIR,
    barrier,
    is_sharded_checkpoint,
    set_loaded,
    training_state_dicts,
)
from ..distributed.mesh import ParallelContext
from ..distributed.parallelize import model_parts
from ..errors import CheckpointError
from ..fileio import atomic_write_text, publish_dir
from ..model.manifest import verify_manifest, write_manifest
from ..runs import CONFIG, LATEST, TOKENIZER, ckpt_name
from .state import (
    OPTIMIZER,
    STATE,
    check_state,
    is_training_checkpoint,
    prune_checkpoints,
    rng_state,
    set_rng_state,
)

RNG_DIR = "rng"


# ----------------------------------------------------------------------------- RNG per rank

def _save_rng(dir_: Path, rank: int) -> None:
    tensors, js = rng_state()
    dir_.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dir_ / f"rank-{rank:05d}.safetensors"))
    (dir_ / f"rank-{rank:05d}.json").write_text(json.dumps(js))


def _load_rng(dir_: Path, rank: int) -> bool:
    st, js = dir_ / f"rank-{rank:05d}.safetensors", dir_ / f"rank-{rank:05d}.json"
    if not (st.is_file() and js.is_file()):
        return False  # saved with fewer ranks: this rank keeps its seeded generators
    set_rng_state(load_file(str(st)), json.loads(js.read_text()))
    return True


# ----------------------------------------------------------------------------- save / load

def save_sharded_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, tokenizer_json: Optional[str],
                            state: dict, ctx: ParallelContext, keep_last: int = 3,
                            extra: Optional[dict] = None) -> Path:
    """Every rank writes its shards into a staging directory; rank 0 publishes it atomically
    as ``ckpt-<step>``, then points ``latest`` at it. A kill leaves the last one intact.
    ``extra``: config.json entries describing the model (``model_io.metadata``, e.g. LoRA's base)."""
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    name = ckpt_name(step)
    staging = run_dir / f".staging-{name}"
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    barrier(ctx)
    canon, _ = training_state_dicts(model, optimizer)
    dcp.save(canon, checkpoint_id=str(staging / DCP_DIR), no_dist=not ctx.distributed)
    _save_rng(staging / RNG_DIR, ctx.rank)
    barrier(ctx)
    if ctx.is_main:
        cfg = model_parts(model)[0].cfg
        meta = {"format": "scalelm", "model": dataclasses.asdict(cfg), **(extra or {}), "step": step, "sharded": True,
                "world_size": ctx.world_size, "layout": ctx.layout.describe()}
        (staging / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_json is not None:
            (staging / TOKENIZER).write_text(tokenizer_json)
        (staging / STATE).write_text(json.dumps(dict(state, step=step), indent=1) + "\n")
        write_manifest(staging)  # last: covers every rank's shards and RNG files
        publish_dir(staging, run_dir / name)
        atomic_write_text(run_dir / LATEST, name + "\n")
        prune_checkpoints(run_dir, keep_last, protect=name)
    barrier(ctx)
    return run_dir / name


def load_sharded_checkpoint(ckpt: Path, model: nn.Module, optimizer, ctx: ParallelContext,
                            verify: bool = True) -> dict:
    """Load a DCP checkpoint into this layout (any world size); returns ``state.json``."""
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt)
    if not is_sharded_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is not a sharded checkpoint ({DCP_DIR}/.metadata is missing)")
    if verify:  # every rank checks the same files, so all ranks fail alike
        verify_manifest(ckpt, how=_RESUME_EARLIER.format(ckpt=ckpt))
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE} is missing or corrupt: {e}") from None
    canon, back = training_state_dicts(model, optimizer)
    try:
        dcp.load(canon, checkpoint_id=str(ckpt / DCP_DIR), no_dist=not ctx.distributed)
    except Exception as e:  # DCP wraps per-rank failures (missing keys, bad files) in CheckpointException
        raise CheckpointError(f"could not load {ckpt / DCP_DIR}: {str(e).splitlines()[0][:400]}") from None
    set_loaded(model, optimizer, canon, back)
    if not _load_rng(ckpt / RNG_DIR, ctx.rank) and ctx.is_main:
        print(f"note: {ckpt} was saved by {state.get('world_size', '?')} ranks; ranks beyond those keep "
              f"freshly seeded random generators (only dropout draws from them)", file=sys.stderr)
    return state


def _shard_like(local, full):
    """This rank's piece of ``full`` laid out like ``local`` (a DTensor, a tensor or a value)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(local, DTensor):  # every rank holds ``full``: each keeps its chunk, no communication
        return distribute_tensor(full.to(local.dtype), local.device_mesh, local.placements, src_data_rank=None)
    if isinstance(local, torch.Tensor):
        return full.to(device=local.device, dtype=local.dtype)
    return full


_RESUME_EARLIER = "resume from an earlier checkpoint (--resume RUN_DIR/ckpt-N), or move {ckpt} out of the run"


def load_full_training_checkpoint(ckpt: Path, model: nn.Module, optimizer, verify: bool = True,
                                  model_io=None) -> dict:
    """A single-process checkpoint (``model.safetensors`` + ``optimizer.safetensors``, see
    ``scalelm.train.state``) into any layout: every rank reads the full tensors, keeps its shard."""
    ckpt = Path(ckpt)
    if not is_training_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is not a training checkpoint (optimizer/RNG/state files missing): to start "
                              f"a new run from its weights, use --init-from instead of resuming")
    if verify:
        verify_manifest(ckpt, how=_RESUME_EARLIER.format(ckpt=ckpt))
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE} is missing or corrupt: {e}") from None
    check_state(state, ckpt / STATE, ("optimizer_param_groups",) if optimizer is not None else ())
    canon, back = training_state_dicts(model, optimizer)
    from .model_io import ModelIO

    model_io = model_io or ModelIO()
    weights = model_io.weights(ckpt)
    if model_io.partial:  # e.g. adapters only: the rest keeps the values the model was built with
        canon["model"] = {c: v for c, v in canon["model"].items() if c in weights}
    missing = sorted(set(canon["model"]) - set(weights))
    if missing:
        raise CheckpointError(f"{ckpt} lacks tensors this model needs: {missing[:5]}")
    canon["model"] = {c: _shard_like(v, weights[c]) for c, v in canon["model"].items()}
    if optimizer is not None:
        try:
            opt_tensors = load_file(str(ckpt / OPTIMIZER))
        except Exception as e:  # safetensors raises several types for a damaged file
            raise CheckpointError(f"{ckpt / OPTIMIZER} is missing or corrupt: {e}") from None
        groups = {fqn: g for g in state["optimizer_param_groups"] for fqn in g["params"]}
        for c, v in list(canon["optim"].items()):
            head, rest = c.split(".", 1)
            fqn, leaf = rest.rsplit(".", 1)
            if head == "state":
                if f"{fqn}/{leaf}" not in opt_tensors:
                    raise CheckpointError(f"{ckpt / OPTIMIZER} has no '{fqn}/{leaf}'")
                canon["optim"][c] = _shard_like(v, opt_tensors[f"{fqn}/{leaf}"])
            elif fqn in groups and leaf in groups[fqn]:
                g = groups[fqn][leaf]
                canon["optim"][c] = tuple(g) if isinstance(v, tuple) else g
    set_loaded(model, optimizer, canon, back)
    return state
