"""A classifier's model directory, and loading one for inference.

    MODEL_DIR/model.safetensors   the GPT (plain GPT names: generate/eval/convert read it as an LM)
              head.safetensors    the head (``weight``)
              config.json         {"format": "scalelm", "model": {...}, "task": {"name": "classify",
                                   "labels": [...], "pooling", "append_eos", "eos_id", "pad_id", ...}}
              tokenizer.json, manifest.json

A LoRA run's directories hold ``adapter.safetensors`` instead (the LoRA helper's ``LoRAFiles``
wraps :class:`ClassifierFiles`; the head is its ``head.*`` tensors) and still carry ``"task"``.
The files are :mod:`scalelm.checkpoint.head`'s; this module builds the ``Classifier``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from ...checkpoint import staged_dir
from ...checkpoint.head import HEAD_PREFIX, head_tensors, read_head, write_classifier_files
from ...checkpoint.manifest import verify_manifest
from ...checkpoint.model_dir import read_config, read_tensors
from ...checkpoint.names import ADAPTER, CONFIG, DCP_METADATA, HEAD, WEIGHTS
from ...errors import CheckpointError
from ...model.io import load_model_dir, load_state_dict_into
from ...runs import resolve_checkpoint
from ...train.model_io import ModelIO
from .model import Classifier

TASK = "classify"


def split_state_dict(sd: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """``gpt.*`` / ``head.*`` keys of a Classifier's state dict -> (GPT's, head's), prefixes removed."""
    gpt = {k[4:]: v for k, v in sd.items() if k.startswith("gpt.")}
    return gpt, head_tensors(sd)


class ClassifierFiles(ModelIO):
    """The Trainer's ``model_io`` for a :class:`Classifier`; ``task`` is config.json's "task" entry
    (labels, pooling, tokenization), written into every checkpoint and ``best/``."""

    def __init__(self, task: dict):
        self.task = {"name": TASK, **task}

    def metadata(self, model: nn.Module) -> dict:
        return {"task": {**self.task, "pooling": model.pooling, "n_labels": model.n_labels}}

    def save(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path,
             tokenizer_json: Optional[str], extra: dict, manifest: bool = True) -> None:
        gpt_sd, head_sd = split_state_dict(state_dict)
        with staged_dir(out_dir, manifest=manifest) as d:
            write_classifier_files(d, dataclasses.asdict(model.cfg), gpt_sd, head_sd, tokenizer_json,
                                   {**self.metadata(model), **extra})

    def weights(self, ckpt: Path) -> dict[str, torch.Tensor]:
        ckpt = Path(ckpt)
        gpt = read_tensors(ckpt / WEIGHTS)
        if read_config(ckpt)["model"].get("tie_embeddings") and "tok_emb.weight" in gpt:
            gpt["lm_head.weight"] = gpt["tok_emb.weight"]  # stored once; the model's state dict has both
        return {**{f"gpt.{k}": v for k, v in gpt.items()},
                **{f"{HEAD_PREFIX}{k}": v for k, v in read_head(ckpt).items()}}

    def load(self, model: nn.Module, ckpt: Path) -> None:
        ckpt = Path(ckpt)
        load_state_dict_into(model.gpt, read_tensors(ckpt / WEIGHTS), source=str(ckpt / WEIGHTS))
        load_head(model, read_head(ckpt), str(ckpt / HEAD))


def load_head(model: Classifier, sd: dict[str, torch.Tensor], source: str) -> None:
    want = {k: tuple(v.shape) for k, v in model.head.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in sd.items()}
    if want != got:
        raise CheckpointError(f"{source} does not match the task model's head: it holds {got}, the model "
                              f"({model.n_labels} labels) needs {want}")
    model.head.load_state_dict(sd)


def read_task(d: Path, name: str = TASK, what: str = "a classifier") -> dict:
    """config.json's "task" entry, or an error saying this is not ``what`` (a model of task ``name``)."""
    p = Path(d) / CONFIG
    try:
        meta = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p} is missing or corrupt ({e})") from None
    task = meta.get("task") if isinstance(meta, dict) else None
    if not isinstance(task, dict) or task.get("name") != name or not isinstance(task.get("labels"), list):
        raise CheckpointError(f"{d} is not {what} (its config.json has no {name} task): train one with "
                              f"`scalelm finetune {name}`")
    return task


def resolve_model_dir(path: str | Path) -> Path:
    """A classifier's model directory (a LoRA one too), or a RUN_DIR's latest checkpoint."""
    p = Path(path)
    if (p / CONFIG).is_file() and ((p / HEAD).is_file() or (p / ADAPTER).is_file()):
        return p
    return resolve_checkpoint(p)


def _consolidated(d: Path, make: Callable[[nn.Module], nn.Module], device, verify: bool) -> nn.Module:
    """A task model from a sharded (torchrun) checkpoint: DCP read in this process, no process group."""
    from ...checkpoint.adapters import lora_entry, read_adapters
    from ...checkpoint.dcp import read_model_shards
    from ...model.build import build_model
    from ...model.io import read_model_config

    if lora_entry(d) is not None:  # a LoRA run's: the base with the adapters merged, and the head
        model = make(load_model_dir(d, verify=verify))
        load_head(model, head_tensors(read_adapters(d, verify=False)[1]), str(d))
        return model.to(device)
    if verify:
        verify_manifest(d)
    model = make(build_model(read_model_config(d)))
    sd = model.state_dict()
    read_model_shards(d, sd, what="the task model")
    model.load_state_dict(sd)
    return model.to(device)


def load_task_model(path: str | Path, make: Callable[[nn.Module, dict], nn.Module], device="cpu",
                    verify: bool = True, name: str = TASK, what: str = "a classifier") -> tuple[nn.Module, dict, Path]:
    """``(model in eval mode, its task entry, the directory)`` of a task model directory (a backbone
    and a head: a classifier, a tagger), a LoRA one (the backbone comes merged from
    ``load_model_dir``) or a RUN_DIR; ``make(backbone, task)`` builds the model around its backbone."""
    d = resolve_model_dir(path)
    task = read_task(d, name, what)
    if not (d / WEIGHTS).is_file() and (d / DCP_METADATA).is_file():
        return _consolidated(d, lambda b: make(b, task), device, verify).eval(), task, d
    if verify and (d / HEAD).is_file():
        verify_manifest(d, only=(HEAD,))
    model = make(load_model_dir(d, device=device, verify=verify), task)
    load_head(model, read_head(d), str(d))
    return model.to(device).eval(), task, d


def load_classifier(path: str | Path, device="cpu", verify: bool = True) -> tuple[Classifier, dict, Path]:
    """``(classifier in eval mode, its task entry, the directory)`` of a classifier model directory,
    a LoRA classifier directory or a RUN_DIR."""
    return load_task_model(path, lambda b, task: Classifier(b, len(task["labels"]), task.get("pooling", "last")),
                           device, verify)
