"""Layout-free state dicts for ``torch.distributed.checkpoint`` (DCP), and ``scalelm export``.

Under torchrun every rank writes its shards of a checkpoint at once (the files are listed in
``scalelm.train.sharded_state``, which saves and loads them through these state dicts).

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
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint.dcp import is_sharded_checkpoint, write_shards
from ..checkpoint.model_dir import model_meta, read_config, read_tokenizer_json, write_json
from ..checkpoint.names import CONFIG, DCP_METADATA, TOKENIZER_FILES, staging_name
from ..checkpoint.staging import reset_dir
from ..errors import CheckpointError
from ..model.io import consolidated_model, load_model_dir, save_model_dir
from ..runs import check_output_dir, is_model_dir, is_scalelm_model_dir, latest_checkpoint
from .mesh import ParallelContext
from .parallelize import model_parts

_PART_PREFIX = re.compile(r"^parts\.\d+\.gpt\.")


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
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

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


def set_loaded(model: nn.Module, optimizer, canon: dict, back: dict) -> None:
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(flatten_optimizer_state_dict=True, strict=False)
    msd = {back["model"][c]: v for c, v in canon["model"].items()}
    set_model_state_dict(model, msd, options=opts)
    if optimizer is not None:
        osd = {back["optim"][c]: v for c, v in canon["optim"].items()}
        set_optimizer_state_dict(model, optimizer, osd, options=opts)


# ----------------------------------------------------------------------------- consolidation

def barrier(ctx: ParallelContext) -> None:
    if ctx.distributed:
        dist.barrier()


def save_full_model_dir(model: nn.Module, out_dir: Path, tokenizer_json: Optional[str], extra: dict,
                        ctx: ParallelContext) -> None:
    """A model directory of a sharded/pipelined model (e.g. ``RUN_DIR/best``): every rank saves
    its shards to a staging DCP dir, rank 0 consolidates them. Collective: call on all ranks."""
    out_dir = Path(out_dir)
    staging = out_dir.parent / staging_name(f"{out_dir.name}-dcp")  # a temporary sharded checkpoint, never published
    if ctx.is_main:
        reset_dir(staging)
    barrier(ctx)
    canon, _ = training_state_dicts(model, None)
    write_shards(canon, staging, ctx.distributed)
    barrier(ctx)
    if ctx.is_main:
        import dataclasses

        write_json(staging / CONFIG, model_meta(dataclasses.asdict(model_parts(model)[0].cfg)))
        try:
            save_model_dir(consolidated_model(staging), out_dir, tokenizer_json, extra=extra)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    barrier(ctx)


def add_export_parser(p: argparse.ArgumentParser) -> None:
    from ..cliargs import DTYPES, add_dtype_arg, add_model_arg, add_overwrite_arg

    add_model_arg(p, help="a model directory, a sharded checkpoint (RUN_DIR/ckpt-N) or a RUN_DIR (its latest)")
    p.add_argument("--out", required=True, help="the model directory to write")
    add_dtype_arg(p, default=None, choices=DTYPES, help="cast the weights (default: as saved)")
    add_overwrite_arg(p, "model directory")


def run_export(args: argparse.Namespace) -> int:
    src = Path(args.model)
    if not src.exists():
        raise CheckpointError(f"checkpoint not found: {src}")
    if not is_model_dir(src):  # a RUN_DIR: its latest checkpoint
        latest = latest_checkpoint(src)
        if latest is None:
            raise CheckpointError(f"{src} is neither a checkpoint or model directory ({CONFIG} + weights or "
                                  f"{DCP_METADATA}) nor a run directory holding one")
        src = latest
    out = Path(args.out)
    check_output_dir(out, "scalelm model directory", is_scalelm_model_dir, sources=[args.model, src],
                     overwrite=args.overwrite)
    if not is_sharded_checkpoint(src):  # already a model directory: copy what generate/eval read
        model = load_model_dir(src)
    else:
        model = consolidated_model(src)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype or "")
    if dtype is not None:
        model = model.to(dtype)
    meta = read_config(src)
    # what the model is for goes along: a translation model's task entry, the special ids, a chat template
    files = {n: (src / n).read_text(encoding="utf-8") for n in TOKENIZER_FILES[1:] if (src / n).is_file()}
    extra = {k: meta[k] for k in ("step", "task", "hf") if k in meta}
    save_model_dir(model, out, read_tokenizer_json(src), extra=extra, files=files)
    print(json.dumps({"checkpoint": str(src), "out": str(out), "params": model.num_params(),
                      "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}))
    return 0
