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
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint.dcp import (
    is_sharded_checkpoint,
    read_rank_rng,
    read_shards,
    sharded_meta,
    write_rank_rng,
    write_shards,
    write_sharded_files,
)
from ..checkpoint.manifest import verify_manifest
from ..checkpoint.names import DCP_METADATA, OPTIMIZER, RNG_DIR, STATE, ckpt_name, staging_name
from ..checkpoint.staging import reset_dir
from ..checkpoint.training import checkpoint_stage, is_training_checkpoint, read_optimizer, read_state
from ..distributed.dcp import barrier, set_loaded, training_state_dicts
from ..distributed.mesh import ParallelContext
from ..distributed.parallelize import model_parts
from ..errors import CheckpointError
from .state import check_state, rng_state, set_rng_state

# ----------------------------------------------------------------------------- save / load


def save_sharded_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, tokenizer_json: Optional[str],
                            state: dict, ctx: ParallelContext, keep_last: int = 3,
                            extra: Optional[dict] = None) -> Path:
    """Every rank writes its shards into a staging directory; rank 0 publishes it atomically
    as ``ckpt-<step>``, then points ``latest`` at it. A kill leaves the last one intact.
    ``extra``: config.json entries describing the model (``model_io.metadata``, e.g. LoRA's base)."""
    run_dir = Path(run_dir)
    name = ckpt_name(step)
    staging = run_dir / staging_name(name)
    if ctx.is_main:
        reset_dir(staging)
    barrier(ctx)
    canon, _ = training_state_dicts(model, optimizer)
    write_shards(canon, staging, ctx.distributed)
    write_rank_rng(staging / RNG_DIR, ctx.rank, *rng_state())
    barrier(ctx)
    if ctx.is_main:
        cfg = model_parts(model)[0].cfg
        meta = sharded_meta(dataclasses.asdict(cfg), extra, step, ctx.world_size, ctx.layout.describe())
        with checkpoint_stage(run_dir, step, keep_last, adopt=True) as d:  # the manifest covers every rank's files
            write_sharded_files(d, meta, tokenizer_json, dict(state, step=step))
    barrier(ctx)
    return run_dir / name


def load_sharded_checkpoint(ckpt: Path, model: nn.Module, optimizer, ctx: ParallelContext,
                            verify: bool = True) -> dict:
    """Load a DCP checkpoint into this layout (any world size); returns ``state.json``."""
    ckpt = Path(ckpt)
    if not is_sharded_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is not a sharded checkpoint ({DCP_METADATA} is missing)")
    if verify:  # every rank checks the same files, so all ranks fail alike
        verify_manifest(ckpt, how=_RESUME_EARLIER.format(ckpt=ckpt))
    state = read_state(ckpt)
    canon, back = training_state_dicts(model, optimizer)
    read_shards(canon, ckpt, ctx.distributed)
    set_loaded(model, optimizer, canon, back)
    rng = read_rank_rng(ckpt / RNG_DIR, ctx.rank)
    if rng is not None:
        set_rng_state(*rng)
    elif ctx.is_main:  # saved with fewer ranks: this rank keeps its seeded generators
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
    state = read_state(ckpt)
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
        opt_tensors = read_optimizer(ckpt)
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
