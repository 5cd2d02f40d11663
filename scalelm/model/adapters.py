"""LoRA directories, read in the model layer: merged into a plain ``GPT`` for inference.

A LoRA run's checkpoints and ``best/`` hold only what trained, not the frozen base::

    LORA_DIR/adapter.safetensors   the trainable tensors by the trained module's names
                                   (``blocks.0.attn.q_proj.lora_A`` (r, in), ``...lora_B`` (out, r);
                                   ``gpt.``-prefixed ones and e.g. ``head.weight`` for a classifier)
            config.json            {"format": "scalelm", "model": {...}, "lora": {"r", "alpha", "dropout",
                                   "targets", "prefix", "base", "base_sha256"}, ...}
            tokenizer.json, manifest.json

:func:`scalelm.model.io.load_model_dir` on such a directory loads the base from ``lora.base``
(its weights' sha256 checked) and folds ``W += alpha / r * B @ A`` into it (``read_adapters``,
``load_lora_dir`` there), so generate, eval, serve and convert read a LoRA run like any model.
The adapters themselves (layers, training, ``scalelm merge``, PEFT export) live in
:mod:`scalelm.lora`, above this layer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..fileio import publish_dir, sha256_file
from ..runs import ADAPTER, CONFIG, DCP_METADATA, TOKENIZER, WEIGHTS
from .manifest import read_manifest, write_manifest

LORA_LEAVES = ("lora_A", "lora_B")


# ----------------------------------------------------------------------------- metadata and the base

def lora_entry(ckpt_dir: str | Path) -> Optional[dict]:
    """The ``"lora"`` entry of a directory's ``config.json`` (None: not a LoRA checkpoint)."""
    try:
        meta = json.loads((Path(ckpt_dir) / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    entry = meta.get("lora") if isinstance(meta, dict) else None
    return entry if isinstance(entry, dict) else None


def is_lora_dir(path: str | Path) -> bool:
    """A directory of adapters (not a sharded checkpoint, which holds the base too)."""
    return (Path(path) / ADAPTER).is_file() and lora_entry(path) is not None


def base_sha256(base_dir: str | Path) -> str:
    """The sha256 of a base model directory's weights: its manifest's entry when it has one (loading
    the base checks the file against it), else the file hashed."""
    d = Path(base_dir)
    if not (d / WEIGHTS).is_file():
        if (d / ADAPTER).is_file():
            raise CheckpointError(f"{d} holds LoRA adapters, not a model: fold them into one first "
                                  f"(`scalelm merge {d} --out MERGED`) and use MERGED as the base")
        if (d / DCP_METADATA).is_file():
            raise CheckpointError(f"{d} is a sharded (torchrun) checkpoint: export it to a model directory first "
                                  f"(`scalelm export {d} --out MODEL_DIR`) and use that as the base")
        raise CheckpointError(f"{d} has no {WEIGHTS}: a LoRA base must be a scalelm model directory")
    entry = (read_manifest(d) or {}).get(WEIGHTS)
    if isinstance(entry, dict) and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    return sha256_file(d / WEIGHTS)


def check_base(entry: dict, where: str | Path) -> Path:
    """The base model directory a LoRA checkpoint names, after checking its weights are the ones the
    adapters were trained on (a CheckpointError naming both hashes, or saying where the base went)."""
    base, want = entry.get("base"), entry.get("base_sha256")
    if not isinstance(base, str) or not isinstance(want, str):
        raise CheckpointError(f"{where}/{CONFIG}: the lora entry has no base / base_sha256 (damaged or edited): "
                              f"copy config.json from the run again")
    p = Path(base)
    if not (p / CONFIG).is_file():
        raise CheckpointError(f"{where} holds LoRA adapters for the base model {p}, which is not there: put the base "
                              f"back at {p} (weights sha256 {want}), or set lora.base in {where}/{CONFIG} to "
                              f"where it is now")
    got = base_sha256(p)
    if got != want:
        raise CheckpointError(f"the base model {p} is not the one the adapters in {where} were trained on: its "
                              f"weights have sha256 {got}, the adapters expect {want}. Restore that base (or point "
                              f"lora.base in {where}/{CONFIG} at a copy of it)")
    return p


# ----------------------------------------------------------------------------- writing

def save_adapter_dir(cfg: ModelConfig, tensors: dict[str, torch.Tensor], out_dir: str | Path,
                     tokenizer_json: Optional[str], extra: dict, manifest: bool = True) -> Path:
    """Write a LoRA directory atomically (``extra`` holds the ``"lora"`` entry and any metadata).
    ``manifest=False`` is for a caller that adds files (a training checkpoint's optimizer)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER),
                  metadata={"format": "pt"})
        meta = {"format": "scalelm", "model": dataclasses.asdict(cfg), **extra}
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        if tokenizer_json is not None:
            (tmp / TOKENIZER).write_text(tokenizer_json)
        if manifest:
            write_manifest(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- reading and merging

def dcp_trainable(ckpt: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Empty tensors for what a LoRA run trained, as stored in a sharded checkpoint (which holds the
    frozen base too): the adapters, and everything outside the GPT (a task head)."""
    import torch.distributed.checkpoint as dcp

    try:
        meta = dcp.FileSystemReader(str(ckpt / DCP_METADATA.parent)).read_metadata().state_dict_metadata
    except Exception as e:  # torch raises several types for a damaged .metadata
        raise CheckpointError(f"{ckpt / DCP_METADATA.parent} is corrupt or incomplete: "
                              f"{str(e).splitlines()[0][:300]}") from None
    out = {}
    for fqn, m in meta.items():
        if not fqn.startswith("model.") or not hasattr(m, "size"):
            continue
        key = fqn[len("model."):]
        if key.rsplit(".", 1)[-1] in LORA_LEAVES or (prefix and not key.startswith(prefix)):
            out[key] = torch.empty(tuple(m.size), dtype=m.properties.dtype)
    return out


def _check_entry(entry: dict, source: str) -> tuple[int, float, str]:
    try:
        r, alpha, prefix = int(entry["r"]), float(entry["alpha"]), str(entry.get("prefix", ""))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{source}: the lora entry needs integer r and number alpha (damaged?)") from None
    if r <= 0:
        raise CheckpointError(f"{source}: lora.r={r} is not a positive rank (damaged?)")
    return r, alpha, prefix


@torch.no_grad()
def merge_adapters(gpt: nn.Module, tensors: dict[str, torch.Tensor], entry: dict, source: str) -> list[str]:
    """Fold adapters into ``gpt``'s linear weights in place: ``W += alpha / r * B @ A``.

    ``tensors`` are keyed as stored (``entry["prefix"]`` + the GPT's module name + ``.lora_A|B``);
    keys outside the prefix (a task head) are skipped. Returns the merged modules' names."""
    r, alpha, prefix = _check_entry(entry, source)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not key.startswith(prefix):
            continue
        mod, _, leaf = key[len(prefix):].rpartition(".")
        if leaf not in LORA_LEAVES:
            raise CheckpointError(f"{source}: tensor '{key}' is neither a lora_A nor a lora_B of the GPT")
        pairs.setdefault(mod, {})[leaf] = t
    for mod, ab in pairs.items():
        if set(ab) != set(LORA_LEAVES):
            raise CheckpointError(f"{source}: '{mod}' has {sorted(ab)} but needs both lora_A and lora_B")
        try:
            lin = gpt.get_submodule(mod)
        except AttributeError:
            lin = None
        if not isinstance(lin, nn.Linear):
            raise CheckpointError(f"{source}: adapters for '{mod}', which is not a linear layer of this model")
        a, b, w = ab["lora_A"], ab["lora_B"], lin.weight
        if tuple(a.shape) != (r, w.shape[1]) or tuple(b.shape) != (w.shape[0], r):
            raise CheckpointError(f"{source}: '{mod}' adapters have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                  f"rank {r} on a {tuple(w.shape)} weight needs A {(r, w.shape[1])}, B "
                                  f"{(w.shape[0], r)}")
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = (b.to(w.device, acc) @ a.to(w.device, acc)) * (alpha / r)
        w.copy_((w.to(acc) + delta).to(w.dtype))
    return sorted(pairs)
