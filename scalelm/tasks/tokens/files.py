"""A tagger's model directory, and loading one: a classifier's files with a ``"tokens"`` task entry.

    MODEL_DIR/model.safetensors   the backbone (a GPT or an encoder, by its plain names)
              head.safetensors    the head (``weight``, ``bias``)
              config.json         {"model": {...}, "task": {"name": "tokens", "labels": [...], "spans",
                                   "scheme", "fallback", "max_length", "special_tokens", "format", ...}}
              tokenizer.json, manifest.json

A LoRA run's directories hold ``adapter.safetensors`` (the head as its ``head.*`` tensors), as a
LoRA classifier's do; ``scalelm merge`` folds them the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from ..classify.files import ClassifierFiles, load_task_model, read_task, resolve_model_dir
from .model import Tagger

TASK = "tokens"
WHAT = "a token tagger"


class TaggerFiles(ClassifierFiles):
    """The Trainer's ``model_io`` for a :class:`Tagger` (the classifier's files, this task's entry)."""

    def __init__(self, task: dict):
        self.task = {"name": TASK, **task}

    def metadata(self, model: nn.Module) -> dict:
        return {"task": {**self.task, "n_labels": model.n_labels}}


def is_tagger_dir(path) -> bool:
    """Does ``path`` (a model directory or RUN_DIR) hold a tagger?"""
    from ...errors import UserError

    try:
        read_task(resolve_model_dir(path), TASK, WHAT)
    except UserError:
        return False
    return True


def load_tagger(path: str | Path, device="cpu", verify: bool = True) -> tuple[Tagger, dict, Path]:
    """``(tagger in eval mode, its task entry, the directory)`` of a tagger's model directory, a LoRA
    one, or a RUN_DIR (its latest)."""
    return load_task_model(path, lambda b, task: Tagger(b, len(task["labels"])), device, verify, TASK, WHAT)
