"""LoRA directories, files <-> state dicts, and the one LoRA merge (``W += alpha / r * B @ A``).

A LoRA run's checkpoints and ``best/`` hold only what trained, not the frozen base::

    LORA_DIR/adapter.safetensors   the trainable tensors by the trained module's names
                                   (``blocks.0.attn.q_proj.lora_A`` (r, in), ``...lora_B`` (out, r);
                                   ``gpt.``-prefixed ones and e.g. ``head.weight`` for a classifier)
            config.json            {"format": "scalelm", "model": {...}, "lora": {"r", "alpha", "dropout",
                                   "targets", "prefix", "base", "base_sha256"}, ...}
            tokenizer.json, manifest.json

A sharded LoRA checkpoint holds the base too (in ``dcp/``); :func:`read_adapters` picks the
trained tensors out of it. :func:`scalelm.model.io.load_model_dir` loads the base named by
``lora.base`` (its weights' sha256 checked by :func:`check_base`) and folds the adapters in
with :func:`merge_adapters`; :func:`scalelm.lora.merge_lora` folds live adapter layers with the
same :func:`fold_lora`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from ..fileio import sha256_file
from .dcp import model_entries, read_model_shards
from .manifest import read_manifest, verify_manifest
from .model_dir import model_meta, read_json, read_tensors, write_json, write_tensors
from .names import ADAPTER, CONFIG, DCP_METADATA, TOKENIZER, WEIGHTS
from .staging import staged_dir

LORA_LEAVES = ("lora_A", "lora_B")


# ----------------------------------------------------------------------------- metadata and the base

def lora_entry(ckpt_dir: str | Path) -> Optional[dict]:
    """The ``"lora"`` entry of a directory's ``config.json`` (None: not a LoRA checkpoint)."""
    meta = read_json(Path(ckpt_dir) / CONFIG)
    entry = meta.get("lora") if meta is not None else None
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
                              f"copy {CONFIG} from the run again")
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

def write_adapter_files(d: str | Path, model: dict, tensors: dict[str, torch.Tensor],
                        tokenizer_json: Optional[str], extra: dict) -> None:
    """A LoRA directory's files into ``d`` (a stage); ``extra`` holds the ``"lora"`` entry."""
    d = Path(d)
    write_tensors(d / ADAPTER, tensors)
    write_json(d / CONFIG, model_meta(model, extra))
    if tokenizer_json is not None:
        (d / TOKENIZER).write_text(tokenizer_json)


def save_adapter_dir(model: dict, tensors: dict[str, torch.Tensor], out_dir: str | Path,
                     tokenizer_json: Optional[str], extra: dict, manifest: bool = True) -> Path:
    """Write a LoRA directory atomically (``model``: the model config as a dict).
    ``manifest=False`` is for a caller that adds files (a training checkpoint's optimizer)."""
    with staged_dir(out_dir, manifest=manifest) as d:
        write_adapter_files(d, model, tensors, tokenizer_json, extra)
    return Path(out_dir)


# ----------------------------------------------------------------------------- reading

def dcp_trainable(ckpt: str | Path, prefix: str) -> dict[str, torch.Tensor]:
    """Empty tensors for what a LoRA run trained, as stored in a sharded checkpoint (which holds the
    frozen base too): the adapters, and everything outside the GPT (a task head)."""
    return {key: torch.empty(shape, dtype=dtype) for key, (shape, dtype) in model_entries(ckpt).items()
            if key.rsplit(".", 1)[-1] in LORA_LEAVES or (prefix and not key.startswith(prefix))}


def read_adapters(ckpt_dir: str | Path, verify: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(lora entry, trained tensors)`` of a LoRA directory or of a LoRA run's sharded checkpoint."""
    d = Path(ckpt_dir)
    entry = lora_entry(d)
    if entry is None:
        raise CheckpointError(f"{d} is not a LoRA checkpoint ({CONFIG} has no lora entry)")
    if (d / ADAPTER).is_file():
        if verify:
            verify_manifest(d, only=(CONFIG, ADAPTER, TOKENIZER), optional=(TOKENIZER,))
        return entry, read_tensors(d / ADAPTER)
    if not (d / DCP_METADATA).is_file():
        raise CheckpointError(f"{d} has neither {ADAPTER} nor a sharded checkpoint ({DCP_METADATA})")
    if verify:
        verify_manifest(d)
    tensors = dcp_trainable(d, str(entry.get("prefix", "")))
    read_model_shards(d, tensors, what="the adapters")
    return entry, tensors


# ----------------------------------------------------------------------------- merging

def check_entry(entry: dict, source: str) -> tuple[int, float, str]:
    """``(r, alpha, prefix)`` of a lora entry, or a CheckpointError for a damaged one."""
    try:
        r, alpha, prefix = int(entry["r"]), float(entry["alpha"]), str(entry.get("prefix", ""))
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{source}: the lora entry needs integer r and number alpha (damaged?)") from None
    if r <= 0:
        raise CheckpointError(f"{source}: lora.r={r} is not a positive rank (damaged?)")
    return r, alpha, prefix


@torch.no_grad()
def fold_lora(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
    """``weight += scale * b @ a`` in place, accumulated in fp32 (fp64 for an fp64 weight) so a
    bf16 weight is rounded once, not at every step of the product."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = (b.to(weight.device, acc) @ a.to(weight.device, acc)) * scale
    weight.copy_((weight.to(acc) + delta).to(weight.dtype))


@torch.no_grad()
def merge_adapters(state_dict: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], entry: dict,
                   source: str) -> list[str]:
    """Fold stored adapters into a model's weights in place: ``W += alpha / r * B @ A``.

    ``state_dict`` is the GPT's (``model.state_dict()``: its tensors share the parameters'
    storage, so the model changes too). ``tensors`` are keyed as stored (``entry["prefix"]`` + the
    GPT's module name + ``.lora_A|B``); keys outside the prefix (a task head) are skipped.
    Returns the merged modules' names."""
    r, alpha, prefix = check_entry(entry, source)
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
        w = state_dict.get(f"{mod}.weight")
        if w is None or w.dim() != 2 or not mod:
            raise CheckpointError(f"{source}: adapters for '{mod}', which is not a linear layer of this model")
        a, b = ab["lora_A"], ab["lora_B"]
        if tuple(a.shape) != (r, w.shape[1]) or tuple(b.shape) != (w.shape[0], r):
            raise CheckpointError(f"{source}: '{mod}' adapters have shapes A {tuple(a.shape)}, B {tuple(b.shape)}; "
                                  f"rank {r} on a {tuple(w.shape)} weight needs A {(r, w.shape[1])}, B "
                                  f"{(w.shape[0], r)}")
        fold_lora(w, a, b, alpha / r)
    return sorted(pairs)
