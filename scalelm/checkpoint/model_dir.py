"""A plain model directory, files <-> state dicts: ``model.safetensors``, ``config.json``
(``{"format": "scalelm", "model": {...}, ...}``) and, when known, ``tokenizer.json`` (+ other
tokenizer files), hashed by ``manifest.json``. No pickle is involved in weights.

This level knows tensors and JSON, not models: building a ``GPT`` from a directory (and
checking the weights against it) is :mod:`scalelm.model.io`, which calls these.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError
from .manifest import verify_manifest
from .names import CONFIG, FORMAT, TOKENIZER, WEIGHTS
from .staging import staged_dir

# ----------------------------------------------------------------------------- tensors and JSON files


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], pt_format: bool = True) -> None:
    """A safetensors file of contiguous CPU copies (``pt_format``: the ``{"format": "pt"}`` header
    torch's own files carry; RNG states are written without it)."""
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt"} if pt_format else None)


def read_tensors(path: str | Path, finite: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a missing or damaged one is a ``CheckpointError``, and so
    (``finite``) is a NaN or inf in a floating-point tensor."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"weights not found: {p}")
    try:
        sd = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is corrupt or not a safetensors file: {e}") from None
    if finite:
        check_finite(sd, str(p))
    return sd


def check_finite(sd: dict[str, torch.Tensor], source: str) -> None:
    """NaN or inf in a weight means a diverged or damaged file: refuse it, naming the tensor."""
    for k, t in sd.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            n = int((~torch.isfinite(t)).sum())
            raise CheckpointError(f"{source}: tensor '{k}' holds {n} non-finite value(s) (NaN or inf): the "
                                  f"weights are corrupt or come from a diverged run; use an earlier checkpoint")


def tensor_shapes(path: str | Path) -> dict[str, tuple]:
    """``{name: shape}`` from a safetensors header (nothing is read or allocated beyond it)."""
    p = Path(path)
    try:
        with safe_open(str(p), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{p} is corrupt or not a safetensors file: {e}") from None


def write_json(path: str | Path, obj, indent: Optional[int] = 2) -> None:
    Path(path).write_text(json.dumps(obj, indent=indent) + "\n")


# ----------------------------------------------------------------------------- writing

def model_meta(model: dict, extra: Optional[dict] = None) -> dict:
    """A model directory's ``config.json``: the model's config (a dict) and ``extra`` entries."""
    return {"format": FORMAT, "model": model, **(extra or {})}


def stored_weights(state_dict: dict[str, torch.Tensor], tie_embeddings: bool) -> dict[str, torch.Tensor]:
    """What ``model.safetensors`` holds: a tied head is stored once, as the embedding."""
    return {k: v for k, v in state_dict.items() if not (tie_embeddings and k == "lm_head.weight")}


def write_model_files(d: str | Path, model: dict, state_dict: dict[str, torch.Tensor],
                      tokenizer_json: Optional[str] = None, extra: Optional[dict] = None,
                      files: Optional[dict[str, str]] = None) -> None:
    """Write a model directory's files into ``d`` (a stage): weights, config, tokenizer, and
    ``files`` (name -> text, e.g. a chat template)."""
    d = Path(d)
    write_tensors(d / WEIGHTS, stored_weights(state_dict, bool(model.get("tie_embeddings"))))
    write_json(d / CONFIG, model_meta(model, extra))
    if tokenizer_json is not None:
        (d / TOKENIZER).write_text(tokenizer_json)
    write_text_files(d, files or {})


def write_text_files(d: str | Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (Path(d) / name).write_text(text, encoding="utf-8")


def save_model_files(out: str | Path, model: dict, state_dict: dict[str, torch.Tensor],
                     tokenizer_json: Optional[str] = None, extra: Optional[dict] = None,
                     files: Optional[dict[str, str]] = None, manifest: bool = True) -> Path:
    """Write ``out`` as a model directory, atomically (a partial one is never visible).
    ``manifest=False`` is for a caller that stages ``out`` itself and adds files to it."""
    with staged_dir(out, manifest=manifest) as d:
        write_model_files(d, model, state_dict, tokenizer_json, extra, files)
    return Path(out)


def copy_files(src: str | Path, dst: str | Path, names: Iterable[str]) -> list[str]:
    """Copy the files among ``names`` that ``src`` has into ``dst``; returns those copied."""
    copied = []
    for name in names:
        if (Path(src) / name).is_file():
            shutil.copyfile(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


# ----------------------------------------------------------------------------- reading

def read_json(path: str | Path) -> Optional[dict]:
    """A JSON object file, or None when it is missing, damaged or not an object (for the lenient
    readers: the strict ones report those)."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def read_config(d: str | Path) -> dict:
    """A scalelm directory's ``config.json``, checked to hold ``{"format": "scalelm", "model": {...}}``."""
    d = Path(d)
    if not d.exists():
        raise CheckpointError(f"checkpoint not found: {d}")
    p = d / CONFIG
    if not p.is_file():
        raise CheckpointError(f"{d} is not a scalelm checkpoint: {CONFIG} is missing")
    try:
        meta = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is corrupt: {e}") from None
    if not isinstance(meta, dict):  # e.g. [] or 3: valid JSON, but no config
        raise CheckpointError(f"{p} is not a scalelm model config (it holds a JSON {type(meta).__name__}, "
                              f"not an object): copy {CONFIG} from the checkpoint it came from again")
    if meta.get("format") != FORMAT or not isinstance(meta.get("model"), dict):
        hint = " (a Hugging Face model? import it with `scalelm convert --from-hf`)" if "model_type" in meta else ""
        raise CheckpointError(f"{p} is not a scalelm model config{hint}")
    return meta


def read_tokenizer_json(d: str | Path) -> Optional[str]:
    p = Path(d) / TOKENIZER
    return p.read_text() if p.is_file() else None


def verify_model_files(d: str | Path, *more: str) -> None:
    """Check what a model loader reads (config, weights, tokenizer, ``more``) against the manifest;
    not e.g. a training checkpoint's optimizer state, which loading a model does not read."""
    verify_manifest(d, only=(CONFIG, WEIGHTS, TOKENIZER, *more), optional=(TOKENIZER,))
