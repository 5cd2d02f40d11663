"""Training checkpoints (single process): everything needed to continue a run bit for bit.

``RUN_DIR/ckpt-<step>/`` is a model directory (``model.safetensors``, ``config.json``,
``tokenizer.json``) plus ``optimizer.safetensors`` (AdamW moments keyed by parameter name),
``rng.safetensors`` (torch generator states) and ``state.json`` (step, loader position,
best validation loss, Python/NumPy RNG states, optimizer hyper-parameters), with a
``manifest.json`` hashing all of them (checked before resuming). The files, staging and
publishing are :mod:`scalelm.checkpoint.training`'s; this module turns a model, its optimizer
and the random generators into those state dicts and back, and decides what ``--out`` means.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..checkpoint.manifest import verify_manifest
from ..checkpoint.names import BEST, CONFIG, METRICS, RUN_INFO, STATE, ckpt_name  # noqa: F401 (re-exported)
from ..checkpoint.rundir import clean_staging, latest_checkpoint, list_checkpoints
from ..checkpoint.training import (
    checkpoint_stage,
    is_training_checkpoint,
    missing_training_files,
    read_optimizer,
    read_rng,
    read_state,
    write_training_files,
)
from ..config import ModelConfig
from ..errors import CheckpointError
from ..fileio import atomic_write_text
from ..model.io import read_model_config


# ----------------------------------------------------------------------------- RNG states

def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, json) snapshots of every generator a training step may draw from."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss = random.getstate()
    return tensors, {"numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                     "python": [version, list(py_state), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], js: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, keys, pos, has_gauss, cached = js["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, py_state, gauss = js["python"]
    random.setstate((version, tuple(py_state), gauss))


# ----------------------------------------------------------------------------- optimizer

def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    """AdamW state as flat ``"<param fqn>/<key>"`` tensors plus JSON param groups.

    ``get_optimizer_state_dict`` keys the state by parameter name, so it survives wrappers
    (compile, activation checkpointing) and a changed parameter order.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    osd = get_optimizer_state_dict(model, optimizer)
    tensors = {}
    for fqn, st in osd["state"].items():
        for k, v in st.items():
            t = v if isinstance(v, torch.Tensor) else torch.tensor(v)
            tensors[f"{fqn}/{k}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    return tensors, groups


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict, groups: list) -> None:
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state: dict[str, dict] = {}
    for key, t in tensors.items():
        fqn, k = key.rsplit("/", 1)
        state.setdefault(fqn, {})[k] = t
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    expected = {fqn for g in groups for fqn in g["params"]}
    # activation checkpointing's wrapper shows in named_parameters, not in the state dicts' names
    current = {n.replace("_checkpoint_wrapped_module.", "") for n, _ in model.named_parameters()}
    if not expected <= current:
        raise CheckpointError(f"optimizer state names parameters the model lacks: {sorted(expected - current)[:5]}")
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- save / load

def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    tokenizer_json: Optional[str], state: dict, keep_last: int = 3, model_io=None) -> Path:
    """Write ``RUN_DIR/ckpt-<step>`` atomically, point ``latest`` at it, prune old ones.

    ``model_io`` (:class:`~scalelm.train.model_io.ModelIO`) writes the model files (default: a GPT)."""
    from .model_io import ModelIO

    model_io = model_io or ModelIO()
    with checkpoint_stage(run_dir, step, keep_last) as d:
        model_io.save(model, model.state_dict(), d, tokenizer_json, {"step": step}, manifest=False)
        opt_tensors, groups = optimizer_state(model, optimizer)
        rng_tensors, rng_js = rng_state()
        write_training_files(d, opt_tensors, rng_tensors, dict(state, step=step, optimizer_param_groups=groups,
                                                                 rng=rng_js))
    return Path(run_dir) / ckpt_name(step)


def check_model_config(ckpt: Path, expected: ModelConfig) -> None:
    """A checkpoint of another shape is an error naming every differing field."""
    saved = read_model_config(ckpt)
    diffs = [f"{k}: checkpoint {getattr(saved, k)!r}, this run {getattr(expected, k)!r}"
             for k in vars(expected) if getattr(saved, k) != getattr(expected, k)]
    if diffs:
        raise CheckpointError(f"{ckpt} holds a model of another shape ({'; '.join(diffs)}): resume with "
                              f"the checkpoint's model settings, or start a new run with another --out")


def check_tokenizer(ckpt: Path, data_dir: Path) -> None:
    """The data must be tokenized with the checkpoint's tokenizer (else ids mean other text)."""
    from ..checkpoint.model_dir import read_tokenizer_json
    from ..data.tokenizer import check_same_tokenizer

    check_same_tokenizer(data_dir, read_tokenizer_json(ckpt), what=f"the checkpoint {ckpt}")


# what resuming reads from state.json, and the JSON type each must have
STATE_KEYS = {"step": int, "tokens_seen": int, "loader": dict, "optimizer_param_groups": list, "rng": dict}


def check_state(state, path: Path, keys=tuple(STATE_KEYS)) -> dict:
    """Refuse a ``state.json`` that lacks what resuming reads (damaged or hand-edited)."""
    path = Path(path)
    if not isinstance(state, dict):
        problems = [f"it holds a JSON {type(state).__name__}, not an object"]
    else:
        problems = [f"'{k}' is missing" if k not in state else f"'{k}' is not a {STATE_KEYS[k].__name__}"
                    for k in keys if not isinstance(state.get(k), STATE_KEYS[k]) or isinstance(state.get(k), bool)]
        subkeys = {"loader": ("step", "micro"), "rng": ("numpy", "python")}
        problems += [f"'{k}.{sub}' is missing" for k, subs in subkeys.items() if k in keys
                     and isinstance(state.get(k), dict) for sub in subs if sub not in state[k]]
    if problems:
        raise CheckpointError(f"{path} is damaged: {'; '.join(problems)}. Resume from an earlier checkpoint "
                              f"(--resume {path.parent.parent}/ckpt-N), or start a new run from its weights "
                              f"(--init-from {path.parent} with another --out)")
    return state


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer],
                    verify: bool = True, model_io=None) -> dict:
    """Load weights (strictly), optimizer moments and RNG states; return ``state.json``.

    ``verify`` first checks every file against ``manifest.json`` (when there is one)."""
    ckpt = Path(ckpt)
    if not is_training_checkpoint(ckpt):
        missing = missing_training_files(ckpt)
        raise CheckpointError(f"{ckpt} is not a training checkpoint ({', '.join(missing)} missing): to start "
                              f"a new run from its weights, use it as an initial model instead of resuming")
    if verify:
        verify_manifest(ckpt, how=f"resume from an earlier checkpoint (--resume {ckpt.parent}/ckpt-N), or "
                                  f"move {ckpt.name} out of the run to resume from the one before it")
    state = read_state(ckpt)
    check_state(state, ckpt / STATE, ("step", "rng") + (("optimizer_param_groups",) if optimizer is not None else ()))
    from .model_io import ModelIO

    (model_io or ModelIO()).load(model, ckpt)
    if optimizer is not None:
        load_optimizer_state(model, optimizer, read_optimizer(ckpt), state["optimizer_param_groups"])
    try:
        set_rng_state(read_rng(ckpt), state["rng"])
    except Exception as e:  # a damaged rng.safetensors or a malformed state.json "rng" entry
        raise CheckpointError(f"the RNG state of {ckpt} is damaged ({type(e).__name__}: {e}): resume from an "
                              f"earlier checkpoint with --resume, or start anew with --init-from {ckpt}") from None
    print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
    return state


# ----------------------------------------------------------------------------- the run directory


def read_run_config(run_dir: Path):
    """The resolved config a previous run saved in ``RUN_DIR/config.json`` (None if no run)."""
    from ..config import load_config_json

    p = Path(run_dir) / CONFIG
    if not p.is_file():
        return None
    try:
        raw = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is corrupt ({e}): delete it, or use another --out") from None
    if "format" in raw:
        raise CheckpointError(f"{run_dir} is a model directory, not a run directory: choose another --out")
    cfg = load_config_json(p)
    cfg.checkpoint.resume = "auto"  # a launch option, not a property of the run
    return cfg


def write_run_config(run_dir: Path, cfg, data) -> None:
    import copy
    import datetime

    from ..config import save_config

    run_dir = Path(run_dir)
    keep = copy.deepcopy(cfg)
    keep.checkpoint.resume = "auto"
    save_config(keep, run_dir / CONFIG)
    info_path = run_dir / RUN_INFO
    created = None
    if info_path.is_file():
        created = json.loads(info_path.read_text()).get("created")
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    info = {"data": {"path": str(Path(data.dir).resolve()), "tokenizer_sha256": data.tokenizer_sha256,
                     "vocab_size": data.vocab_size, "inputs_sha256": data.meta.get("inputs_sha256")},
            "created": created or now, "updated": now}
    atomic_write_text(info_path, json.dumps(info, indent=2) + "\n")


def _config_diffs(saved, cfg) -> list[str]:
    return [f"model.{k}: {getattr(saved.model, k)!r} there, {getattr(cfg.model, k)!r} now"
            for k in vars(cfg.model) if getattr(saved.model, k) != getattr(cfg.model, k)]


def prepare_run_dir(run_dir: Path, cfg, data, saved, write: bool = True) -> Optional[Path]:
    """Decide what ``--out`` means: a new run, or the continuation of the run it holds.

    Returns the checkpoint to resume from (None: start at step 0). A directory holding another
    run (other model shape or data) is refused rather than overwritten. Only the process with
    ``write`` removes leftovers (half-written checkpoints, metrics of a run killed before its
    first checkpoint).
    """
    from ..runs import resolve_checkpoint

    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"--out {run_dir} is a file: choose a directory")
    holds_run = saved is not None or bool(run_dir.is_dir() and list_checkpoints(run_dir))
    mode = cfg.checkpoint.resume
    if not holds_run and run_dir.is_dir() and any(not p.name.startswith(".") for p in run_dir.iterdir()):
        raise CheckpointError(f"--out {run_dir} exists and is not a scalelm run directory: choose a new or "
                              f"empty directory (nothing there was touched)")
    if holds_run:
        how = f"use another --out, or delete {run_dir} to start over"
        if mode == "never":
            raise CheckpointError(f"{run_dir} already holds a run and checkpoint.resume=never: {how}, "
                                  f"or drop --checkpoint.resume=never to continue it")
        diffs = _config_diffs(saved, cfg) if saved is not None else []
        if diffs:
            raise CheckpointError(f"{run_dir} holds another run ({'; '.join(diffs)}): {how}, or resume it "
                                  f"with its own settings (`scalelm train --out {run_dir}` reuses them)")
        info_path = run_dir / RUN_INFO
        if info_path.is_file():
            info = json.loads(info_path.read_text()).get("data", {})
            if info.get("tokenizer_sha256") not in (None, data.tokenizer_sha256):
                raise CheckpointError(f"{run_dir} holds a run trained on other data ({info.get('path')}, another "
                                      f"tokenizer) than {data.dir}: {how}")
            if info.get("path") and Path(info["path"]) != Path(data.dir).resolve():
                print(f"warning: {run_dir} was trained on {info['path']}; continuing on {data.dir} "
                      f"(same tokenizer)", file=sys.stderr)
    if mode not in ("auto", "never"):
        src = resolve_checkpoint(mode)
        if holds_run and run_dir.resolve() not in src.resolve().parents:
            latest = latest_checkpoint(run_dir)
            at = f" (at {latest.name})" if latest is not None else ""
            raise CheckpointError(f"--out {run_dir} already holds another run{at}: resuming {mode} there would "
                                  f"replace its checkpoints, best/ and config. Resume into a new --out, or resume "
                                  f"{run_dir} itself (drop --resume); nothing was touched")
    if run_dir.is_dir() and write:
        clean_staging(run_dir)
    if mode not in ("auto", "never"):
        return src
    ckpt = latest_checkpoint(run_dir) if holds_run else None
    if ckpt is None and run_dir.is_dir() and write:  # nothing to resume: leftovers of a run killed early go
        (run_dir / METRICS).unlink(missing_ok=True)
        shutil.rmtree(run_dir / BEST, ignore_errors=True)
    return ckpt
