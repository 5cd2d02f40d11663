"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), and ``scalelm export``.

Under torchrun a checkpoint is written by every rank at once::

    RUN_DIR/ckpt-<step>/config.json      model config (as in a model directory) + "sharded": true
                        tokenizer.json
                        state.json        step, loader, scheduler, ... (the trainer's state)
                        dcp/              .metadata + one __<rank>_0.distcp per rank:
                                          {"model": weights, "optim": AdamW state}
                        rng/rank-<r>.safetensors + rank-<r>.json   each rank's RNG states

Keys are the plain model's parameter names (a pipeline stage's prefix is removed, a tied head
is stored once as the embedding) and the optimizer state is flattened per parameter, so a
checkpoint loads into any layout: another world size, FSDP <-> TP <-> PP, or one process.
``scalelm export`` (or simply ``generate``/``eval``, which consolidate on the fly) turns one
into a model directory.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from ..checkpoint import (CONFIG, LATEST, TOKENIZER, CheckpointError, atomic_write_text, ckpt_name, publish_dir,
                          read_model_config, save_model_dir)
from .mesh import ParallelContext
from .parallelize import model_parts

DCP_DIR = "dcp"
RNG_DIR = "rng"
STATE = "state.json"
_PART_PREFIX = re.compile(r"^parts\.\d+\.gpt\.")


def is_sharded_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and (p / DCP_DIR / ".metadata").is_file()


# ----------------------------------------------------------------------------- state dicts

def _tied(model: nn.Module) -> bool:
    return bool(model_parts(model)[0].cfg.tie_embeddings)


def _canonical(key: str, model: nn.Module, tied_copy_parts: set[int]) -> Optional[str]:
    """The plain model's name for a state-dict key of ``model`` (None: stored under another key)."""
    m = _PART_PREFIX.match(key)
    if m:
        part = int(key.split(".")[1])
        key = key[m.end():]
        if key == "lm_head.weight" and part in tied_copy_parts:
            return "tok_emb.weight"  # the last stage's copy of the tied embedding
    if key == "lm_head.weight" and _tied(model) and not m:
        return None  # the same tensor as tok_emb.weight
    return key


def _tied_copy_parts(model: nn.Module) -> set[int]:
    parts = model.gpt_parts() if hasattr(model, "gpt_parts") else []
    return {i for i, g in enumerate(parts) if g.cfg.tie_embeddings and g.tok_emb is None and g.lm_head is not None}


def training_state_dicts(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]):
    """``(canonical, to_local)``: ``{"model": ..., "optim": ...}`` keyed by the plain model's names,
    and the map back to this model's own keys (needed to load)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(flatten_optimizer_state_dict=True)
    copies = _tied_copy_parts(model)
    msd = get_model_state_dict(model, options=opts)
    canon, back = {"model": {}, "optim": {}}, {"model": {}, "optim": {}}
    for k, v in msd.items():
        c = _canonical(k, model, copies)
        if c is not None:
            canon["model"][c], back["model"][c] = v, k
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        for k, v in osd.items():  # "state.<fqn>.<key>" and "param_groups.<fqn>.<key>"
            head, rest = k.split(".", 1)
            fqn, leaf = rest.rsplit(".", 1)
            c = f"{head}.{_canonical(fqn, model, copies) or fqn}.{leaf}"
            canon["optim"][c], back["optim"][c] = v, k
    else:
        del canon["optim"]
    return canon, back


def _set_loaded(model: nn.Module, optimizer, canon: dict, back: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
    msd = {back["model"][c]: v for c, v in canon["model"].items()}
    set_model_state_dict(model, msd, options=opts)
    if optimizer is not None:
        osd = {back["optim"][c]: v for c, v in canon["optim"].items()}
        set_optimizer_state_dict(model, optimizer, osd, options=opts)


# ----------------------------------------------------------------------------- RNG per rank

def _save_rng(dir_: Path, rank: int) -> None:
    from ..train_state import rng_state

    tensors, js = rng_state()
    dir_.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dir_ / f"rank-{rank:05d}.safetensors"))
    (dir_ / f"rank-{rank:05d}.json").write_text(json.dumps(js))


def _load_rng(dir_: Path, rank: int) -> bool:
    from ..train_state import set_rng_state

    st, js = dir_ / f"rank-{rank:05d}.safetensors", dir_ / f"rank-{rank:05d}.json"
    if not (st.is_file() and js.is_file()):
        return False  # saved with fewer ranks: this rank keeps its seeded generators
    set_rng_state(load_file(str(st)), json.loads(js.read_text()))
    return True


# ----------------------------------------------------------------------------- save / load

def _barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        dist.barrier()


def save_sharded_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer, tokenizer_json: Optional[str],
                            state: dict, ctx: ParallelContext, keep_last: int = 3) -> Path:
    """Every rank writes its shards into a staging directory; rank 0 publishes it atomically
    as ``ckpt-<step>``, then points ``latest`` at it. A kill leaves the last one intact."""
    import torch.distributed.checkpoint as dcp

    from ..train_state import prune_checkpoints

    run_dir = Path(run_dir)
    name = ckpt_name(step)
    staging = run_dir / f".staging-{name}"
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier(ctx)
    canon, _ = training_state_dicts(model, optimizer)
    dcp.save(canon, checkpoint_id=str(staging / DCP_DIR), no_dist=not ctx.distributed)
    _save_rng(staging / RNG_DIR, ctx.rank)
    _barrier(ctx)
    if ctx.is_main:
        import dataclasses

        cfg = model_parts(model)[0].cfg

        meta = {"format": "scalelm", "model": dataclasses.asdict(cfg), "step": step, "sharded": True,
                "world_size": ctx.world_size, "layout": ctx.layout.describe()}
        (staging / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_json is not None:
            (staging / TOKENIZER).write_text(tokenizer_json)
        (staging / STATE).write_text(json.dumps(dict(state, step=step), indent=1) + "\n")
        publish_dir(staging, run_dir / name)
        atomic_write_text(run_dir / LATEST, name + "\n")
        prune_checkpoints(run_dir, keep_last, protect=name)
    _barrier(ctx)
    return run_dir / name


def load_sharded_checkpoint(ckpt: Path, model: nn.Module, optimizer, ctx: ParallelContext) -> dict:
    """Load a DCP checkpoint into this layout (any world size); returns ``state.json``."""
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt)
    if not is_sharded_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is not a sharded checkpoint ({DCP_DIR}/.metadata is missing)")
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE} is missing or corrupt: {e}") from None
    canon, back = training_state_dicts(model, optimizer)
    try:
        dcp.load(canon, checkpoint_id=str(ckpt / DCP_DIR), no_dist=not ctx.distributed)
    except Exception as e:  # DCP wraps per-rank failures (missing keys, bad files) in CheckpointException
        raise CheckpointError(f"could not load {ckpt / DCP_DIR}: {str(e).splitlines()[0][:400]}") from None
    _set_loaded(model, optimizer, canon, back)
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


def load_full_training_checkpoint(ckpt: Path, model: nn.Module, optimizer) -> dict:
    """A single-process checkpoint (``model.safetensors`` + ``optimizer.safetensors``, see
    ``scalelm.train_state``) into any layout: every rank reads the full tensors, keeps its shard."""
    from ..checkpoint import load_weights
    from ..train_state import OPTIMIZER

    from ..train_state import is_training_checkpoint

    ckpt = Path(ckpt)
    if not is_training_checkpoint(ckpt):
        raise CheckpointError(f"{ckpt} is not a training checkpoint (optimizer/RNG/state files missing): to start "
                              f"a new run from its weights, use --init-from instead of resuming")
    try:
        state = json.loads((ckpt / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / STATE} is missing or corrupt: {e}") from None
    canon, back = training_state_dicts(model, optimizer)
    weights = load_weights(ckpt / "model.safetensors")
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
    _set_loaded(model, optimizer, canon, back)
    return state


# ----------------------------------------------------------------------------- consolidation

def consolidated_model(ckpt: str | Path, device="cpu", dtype: Optional[torch.dtype] = None):
    """Build the plain ``GPT`` of a sharded checkpoint in this process (no process group needed)."""
    import torch.distributed.checkpoint as dcp

    from ..model import GPT

    ckpt = Path(ckpt)
    cfg = read_model_config(ckpt)
    try:
        meta = dcp.FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata
        saved_dtype = meta["model.tok_emb.weight"].properties.dtype  # build the model as it was saved
    except Exception as e:
        raise CheckpointError(f"{ckpt / DCP_DIR} is corrupt or incomplete: {str(e).splitlines()[0][:300]}") from None
    with torch.device("meta"):
        model = GPT(cfg).to(saved_dtype)
    model.to_empty(device="cpu")
    with torch.no_grad():
        model.reset_parameters()  # recomputes the non-persistent RoPE tables; weights are loaded next
    if cfg.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    sd = {k: v for k, v in model.state_dict().items() if not (cfg.tie_embeddings and k == "lm_head.weight")}
    try:
        dcp.load({"model": sd}, checkpoint_id=str(ckpt / DCP_DIR), no_dist=True)
    except Exception as e:
        raise CheckpointError(f"could not read the weights in {ckpt / DCP_DIR}: {str(e).splitlines()[0][:400]}") from None
    return model.to(device=device, dtype=dtype) if dtype else model.to(device)


def save_full_model_dir(model: nn.Module, out_dir: Path, tokenizer_json: Optional[str], extra: dict,
                        ctx: ParallelContext) -> None:
    """A model directory of a sharded/pipelined model (e.g. ``RUN_DIR/best``): every rank saves
    its shards to a staging DCP dir, rank 0 consolidates them. Collective: call on all ranks."""
    import torch.distributed.checkpoint as dcp

    out_dir = Path(out_dir)
    staging = out_dir.parent / f".staging-{out_dir.name}-dcp"
    if ctx.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    _barrier(ctx)
    canon, _ = training_state_dicts(model, None)
    dcp.save(canon, checkpoint_id=str(staging / DCP_DIR), no_dist=not ctx.distributed)
    _barrier(ctx)
    if ctx.is_main:
        import dataclasses

        cfg = model_parts(model)[0].cfg
        (staging / CONFIG).write_text(json.dumps({"format": "scalelm", "model": dataclasses.asdict(cfg)}))
        try:
            save_model_dir(consolidated_model(staging), out_dir, tokenizer_json, extra=extra)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _barrier(ctx)


def add_export_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a sharded checkpoint (RUN_DIR/ckpt-N) or a RUN_DIR (its latest)")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the weights (default: as saved)")


def run_export(args: argparse.Namespace) -> int:
    from ..checkpoint import latest_checkpoint

    src = Path(args.checkpoint)
    if not src.exists():
        raise CheckpointError(f"checkpoint not found: {src}")
    if not is_sharded_checkpoint(src):
        latest = latest_checkpoint(src)
        if latest is None:
            raise CheckpointError(f"{src} is neither a sharded checkpoint ({DCP_DIR}/.metadata + {CONFIG}) "
                                  f"nor a run directory holding one")
        src = latest
    out = Path(args.out)
    if out.resolve() == src.resolve():
        raise CheckpointError("--out must differ from the checkpoint directory")
    if not is_sharded_checkpoint(src):  # already a model directory: copy what generate/eval read
        from ..checkpoint import load_model_dir

        model = load_model_dir(src)
    else:
        model = consolidated_model(src)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype or "")
    if dtype is not None:
        model = model.to(dtype)
    tok = src / TOKENIZER
    meta = json.loads((src / CONFIG).read_text())
    save_model_dir(model, out, tok.read_text() if tok.is_file() else None,
                   extra={k: meta[k] for k in ("step",) if k in meta})
    print(json.dumps({"checkpoint": str(src), "out": str(out), "params": model.num_params(),
                      "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}))
    return 0
