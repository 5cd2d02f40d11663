"""Sharded (torchrun) checkpoints on disk, through ``torch.distributed.checkpoint`` (DCP)::

    CKPT/config.json                 a model directory's, + "sharded": true, world_size, layout
         tokenizer.json, state.json
         dcp/.metadata + __<rank>_0.distcp   {"model": weights, "optim": AdamW state}, keyed by the
                                     plain model's names (any layout can load them)
         rng/rank-<r>.safetensors + rank-<r>.json   each rank's RNG states

Writing is collective (every rank writes its shards into one stage); reading works in any
layout, or in one process without a process group (:func:`read_model_shards`: consolidation).
The state dicts themselves (which keys, the map to a parallel model's own) are built by
:mod:`scalelm.distributed.dcp`, above this layer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from ..errors import CheckpointError
from .model_dir import model_meta, write_json, write_tensors
from .names import CONFIG, DCP_DIR, DCP_METADATA, TOKENIZER, rank_rng_files
from .training import write_state


def is_sharded_checkpoint(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and (p / DCP_METADATA).is_file()


def _first_line(e: BaseException, n: int) -> str:
    failures = getattr(e, "failures", None)  # a CheckpointException: {rank: (exception, traceback)}
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        e = first[0] if isinstance(first, tuple) and first and isinstance(first[0], BaseException) else e
    return str(e).splitlines()[0][:n] if str(e) else type(e).__name__


def _dcp_errors() -> tuple:
    """What a DCP read raises for a damaged or mismatched checkpoint: its ``CheckpointException``
    (which wraps each rank's failure) derives from BaseException, not Exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return Exception, CheckpointException


# ----------------------------------------------------------------------------- writing

def write_shards(state: dict, d: str | Path, distributed: bool) -> None:
    """This rank's shards of ``state`` into ``d/dcp`` (collective when ``distributed``)."""
    import torch.distributed.checkpoint as dcp

    dcp.save(state, checkpoint_id=str(Path(d) / DCP_DIR), no_dist=not distributed)


def write_rank_rng(d: str | Path, rank: int, tensors: dict[str, torch.Tensor], js: dict) -> None:
    """One rank's RNG states into ``d`` (the checkpoint's ``rng/``)."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    st, js_name = rank_rng_files(rank)
    write_tensors(d / st, tensors, pt_format=False)
    (d / js_name).write_text(json.dumps(js))


def sharded_meta(model: dict, extra: Optional[dict], step: int, world_size: int, layout: str) -> dict:
    return model_meta(model, {**(extra or {}), "step": step, "sharded": True, "world_size": world_size,
                              "layout": layout})


def write_sharded_files(d: str | Path, meta: dict, tokenizer_json: Optional[str], state: dict) -> None:
    """Rank 0's files of a sharded checkpoint beside the shards: config, tokenizer, ``state.json``."""
    d = Path(d)
    write_json(d / CONFIG, meta)
    if tokenizer_json is not None:
        (d / TOKENIZER).write_text(tokenizer_json)
    write_state(d, state)


# ----------------------------------------------------------------------------- reading

def read_shards(state: dict, ckpt: str | Path, distributed: bool) -> None:
    """Fill ``state`` (this layout's tensors) from ``ckpt/dcp``, in place."""
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt)
    try:
        dcp.load(state, checkpoint_id=str(ckpt / DCP_DIR), no_dist=not distributed)
    except _dcp_errors() as e:  # missing keys, bad files
        raise CheckpointError(f"could not load {ckpt / DCP_DIR}: {_first_line(e, 400)}") from None


def read_rank_rng(d: str | Path, rank: int) -> Optional[tuple[dict[str, torch.Tensor], dict]]:
    """One rank's RNG states, or None when the checkpoint was saved by fewer ranks."""
    st, js = (Path(d) / n for n in rank_rng_files(rank))
    if not (st.is_file() and js.is_file()):
        return None
    return load_file(str(st)), json.loads(js.read_text())


def model_entries(ckpt: str | Path) -> dict[str, tuple[tuple, torch.dtype]]:
    """``{key: (shape, dtype)}`` of every model tensor in ``ckpt/dcp`` (keys without ``model.``),
    from the metadata alone (nothing is read or allocated)."""
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt)
    try:
        meta = dcp.FileSystemReader(str(ckpt / DCP_DIR)).read_metadata().state_dict_metadata
    except _dcp_errors() as e:  # torch raises several types for a damaged .metadata
        raise CheckpointError(f"{ckpt / DCP_DIR} is corrupt or incomplete: {_first_line(e, 300)}") from None
    return {fqn[len("model."):]: (tuple(m.size), m.properties.dtype) for fqn, m in meta.items()
            if fqn.startswith("model.") and hasattr(m, "size")}


def read_model_shards(ckpt: str | Path, tensors: dict[str, torch.Tensor], what: str = "the weights") -> None:
    """Consolidation: fill ``tensors`` (full tensors, keyed like :func:`model_entries`) from the
    shards of ``ckpt``, in this process, with no process group."""
    import torch.distributed.checkpoint as dcp

    ckpt = Path(ckpt)
    try:
        dcp.load({"model": tensors}, checkpoint_id=str(ckpt / DCP_DIR), no_dist=True)
    except _dcp_errors() as e:
        raise CheckpointError(f"could not read {what} in {ckpt / DCP_DIR}: {_first_line(e, 400)}") from None
