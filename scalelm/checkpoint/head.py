"""A classifier's model directory: a plain model directory (the GPT, by its plain names, so
generate/eval/convert read it as a language model) plus ``head.safetensors`` (the head's
``weight``, keys without ``head.``); config.json carries the ``"task"`` entry. A LoRA run's
directories hold the head as the ``head.*`` tensors of ``adapter.safetensors`` instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import CheckpointError
from .model_dir import read_tensors, write_model_files, write_tensors
from .names import ADAPTER, HEAD

HEAD_PREFIX = "head."  # the head's keys in a classifier's state dict (and in a LoRA run's adapters)


def head_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``head.*`` entries of a state dict, prefix removed."""
    return {k[len(HEAD_PREFIX):]: v for k, v in sd.items() if k.startswith(HEAD_PREFIX)}


def write_head(d: str | Path, head: dict[str, torch.Tensor]) -> None:
    write_tensors(Path(d) / HEAD, head)


def write_classifier_files(d: str | Path, model: dict, gpt_sd: dict[str, torch.Tensor],
                           head: dict[str, torch.Tensor], tokenizer_json: Optional[str], extra: dict) -> None:
    """A classifier's files into ``d`` (a stage): the GPT's model files and the head."""
    write_model_files(d, model, gpt_sd, tokenizer_json, extra)
    write_head(d, head)


def read_head(d: str | Path) -> dict[str, torch.Tensor]:
    """The head's tensors: ``head.safetensors``, or the ``head.*`` entries of a LoRA ``adapter.safetensors``."""
    d = Path(d)
    if (d / HEAD).is_file():
        return read_tensors(d / HEAD)
    if (d / ADAPTER).is_file():
        return head_tensors(read_tensors(d / ADAPTER))
    raise CheckpointError(f"{d} has no {HEAD} (nor a LoRA {ADAPTER}): it is not a classifier's model directory")
