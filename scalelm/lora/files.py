"""A LoRA run's model files: only the trained tensors, plus the base they adapt (path and hash).

:class:`LoRAFiles` is the trainer's ``model_io`` when ``lora.r > 0`` (it wraps the objective's
own, whose metadata, e.g. a classifier's ``"task"``, it keeps). :func:`lora_base_dir` says which
base model a run starts from or resumes on. The directory format is in
:mod:`scalelm.checkpoint.adapters` (``scalelm.model.io`` reads it back for inference).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..config import ConfigError, LoRAConfig
from ..errors import CheckpointError
from ..checkpoint.adapters import base_sha256, check_base, lora_entry, save_adapter_dir
from ..checkpoint.model_dir import read_tensors
from ..checkpoint.names import ADAPTER, WEIGHTS
from ..model.io import read_model_config
from ..runs import resolve_checkpoint
from .layer import lora_layers, parse_targets, targets_of

NEEDS_BASE = ("LoRA adapts a trained model: pass --init-from MODEL_DIR (train) or --base MODEL_DIR (finetune)")


class LoRAFiles:
    """``ModelIO`` of a model with adapters: ``adapter.safetensors`` holds the parameters that
    train (adapters, and e.g. a task head), keyed by ``model``'s own names; config.json's
    ``"lora"`` entry names the base model directory and its weights' sha256."""

    partial = True  # checkpoints hold only the trained tensors; the base comes from the base dir

    def __init__(self, inner, model: nn.Module, base_dir: Optional[str | Path]):
        if base_dir is None:
            raise ConfigError(NEEDS_BASE)
        gpt = getattr(model, "gpt", model)
        layers = lora_layers(gpt)
        if not layers:
            raise ConfigError("LoRAFiles needs a model with adapters: call scalelm.lora.apply_lora first")
        self.inner = inner
        self.base_dir = resolve_checkpoint(base_dir).resolve()
        self.base_sha256 = base_sha256(self.base_dir)
        # names now, before wrappers (activation checkpointing) change what named_parameters says
        self.keys = [n for n, p in model.named_parameters() if p.requires_grad]
        first = next(iter(layers.values()))
        self.entry = {"r": first.r, "alpha": first.alpha, "dropout": first.dropout_p, "targets": targets_of(gpt),
                      "prefix": "" if gpt is model else "gpt.", "base": str(self.base_dir),
                      "base_sha256": self.base_sha256}

    def metadata(self, model: nn.Module) -> dict:
        return {**self.inner.metadata(model), "lora": dict(self.entry)}

    def save(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path,
             tokenizer_json: Optional[str], extra: dict, manifest: bool = True) -> None:
        missing = [k for k in self.keys if k not in state_dict]
        if missing:
            raise CheckpointError(f"internal error: the state dict lacks the trained tensors {missing[:5]}")
        save_adapter_dir(dataclasses.asdict(model.cfg), {k: state_dict[k] for k in self.keys}, out_dir,
                         tokenizer_json, {**self.metadata(model), **extra}, manifest=manifest)

    def weights(self, ckpt: Path) -> dict[str, torch.Tensor]:
        ckpt = Path(ckpt)
        entry = lora_entry(ckpt)
        if entry is None or not (ckpt / ADAPTER).is_file():
            if (ckpt / WEIGHTS).is_file():
                raise CheckpointError(f"{ckpt} holds full weights, not LoRA adapters: resume it with --lora.r=0, "
                                      f"or start a LoRA run from it (--init-from {ckpt}, another --out)")
            raise CheckpointError(f"{ckpt} is not a LoRA checkpoint ({ADAPTER} and the config's lora entry)")
        if entry.get("base_sha256") != self.base_sha256:
            raise CheckpointError(f"{ckpt}'s adapters were trained on a base whose weights have sha256 "
                                  f"{entry.get('base_sha256')}, but this model's base {self.base_dir} has "
                                  f"{self.base_sha256}: resume on the run's own base ({entry.get('base')})")
        return read_tensors(ckpt / ADAPTER)

    def load(self, model: nn.Module, ckpt: Path) -> None:
        sd = self.weights(ckpt)
        own = model.state_dict()
        problems = [f"missing tensor '{k}'" for k in self.keys if k not in sd]
        problems += [f"unexpected tensor '{k}'" for k in sd if k not in self.keys]
        problems += [f"'{k}' is {tuple(sd[k].shape)} there, {tuple(own[k].shape)} here" for k in self.keys
                     if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if problems:
            raise CheckpointError(f"{ckpt / ADAPTER} does not match this model's adapters (other lora.r or "
                                  f"lora.targets?): " + "; ".join(problems[:5]))
        model.load_state_dict(sd, strict=False)  # the base keeps the values it was built with


def lora_base_dir(lora: LoRAConfig, resume_from: Optional[str | Path], base: Optional[str | Path]) -> Optional[Path]:
    """The base model directory of a run: the one a resumed LoRA checkpoint recorded (its hash
    checked; ``base``, e.g. ``--base``, must then be the same model), else ``base`` (None if none).

    Also refuses to switch LoRA on or off, or to change its rank, scale or targets, when resuming."""
    rec = lora_entry(resume_from) if resume_from is not None else None
    if lora.r <= 0:
        if rec is not None:
            raise ConfigError(f"{resume_from} was trained with LoRA (r={rec.get('r')}): resume it with its LoRA "
                              f"settings (drop --lora.r=0), or fold the adapters into a model with "
                              f"`scalelm merge`")
        return None if base is None else resolve_checkpoint(base)
    if resume_from is None:
        return None if base is None else resolve_checkpoint(base)
    ckpt = Path(resume_from)
    if rec is None:
        raise CheckpointError(f"{ckpt} holds full weights, not LoRA adapters: resume it with --lora.r=0, or start "
                              f"a LoRA run from it (--init-from {ckpt}, another --out)")
    targets = ",".join(parse_targets(lora.targets, read_model_config(ckpt)))
    now = {"r": lora.r, "alpha": float(lora.alpha), "targets": targets}
    was = {"r": rec.get("r"), "alpha": float(rec.get("alpha", "nan")), "targets": rec.get("targets")}
    diffs = [f"lora.{k}: {was[k]!r} there, {now[k]!r} now" for k in now if was[k] != now[k]]
    if diffs:
        raise ConfigError(f"{ckpt} was trained with other LoRA settings ({'; '.join(diffs)}): resume it with its "
                          f"own (`scalelm train --out RUN` reuses them), or start a new run")
    recorded = check_base(rec, ckpt)
    if base is not None:
        given = resolve_checkpoint(base).resolve()
        if given != recorded.resolve() and base_sha256(given) != rec["base_sha256"]:
            raise CheckpointError(f"{ckpt} adapts the base {recorded}, not {given}: drop the base option to "
                                  f"resume on the run's own base, or start a new run")
    return recorded
