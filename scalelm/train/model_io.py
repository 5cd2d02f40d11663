"""How a training objective's model is written to a directory and read back.

The trainer writes a model in two places: the model files of every checkpoint
(``RUN_DIR/ckpt-N``) and ``RUN_DIR/best``. A plain ``GPT`` is a model directory
(:class:`GPTFiles`). A recipe whose model is something else (a classifier around a GPT,
LoRA adapters on a frozen base) passes its own :class:`ModelIO` to the ``Trainer``; the
loop, resume, the time budget and the parallel layouts stay the same.

Every method works on the *plain* model's full state dict (``model.state_dict()`` in one
process; under torchrun rank 0 receives it gathered), so one implementation serves every
layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn

from ..checkpoint.names import WEIGHTS
from ..model.io import load_state_dict_into, load_weights, save_state_dir


class ModelIO:
    """The interface (and the default for a ``GPT``)."""

    #: True when a checkpoint holds only some tensors (e.g. adapters): the others keep the
    #: values the model was built with, and resuming loads just the stored ones.
    partial = False

    #: True when the files are exactly a GPT model directory, so that under torchrun ``best/`` can be
    #: written straight from the shards or pipeline stages (``distributed.dcp.save_full_model_dir``)
    #: rather than through :meth:`save`. Only this class: a subclass writes other files (a task's
    #: labels, adapters, templates) unless it declares ``plain_lm = True`` itself.
    plain_lm = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.plain_lm = bool(cls.__dict__.get("plain_lm", False))

    def metadata(self, model: nn.Module) -> dict:
        """Extra ``config.json`` entries that describe the model (e.g. ``{"task": {...}}``)."""
        return {}

    def save(self, model: nn.Module, state_dict: dict[str, torch.Tensor], out_dir: Path,
             tokenizer_json: Optional[str], extra: dict, manifest: bool = True) -> None:
        """Write ``out_dir`` atomically. ``model`` gives the metadata (config, labels, ...),
        ``state_dict`` the values (the full tensors, on CPU)."""
        save_state_dir(model.cfg, state_dict, out_dir, tokenizer_json, extra={**self.metadata(model), **extra},
                       manifest=manifest)

    def weights(self, ckpt: Path) -> dict[str, torch.Tensor]:
        """The tensors stored in ``ckpt``, keyed like ``model.state_dict()``."""
        return load_weights(Path(ckpt) / WEIGHTS)

    def load(self, model: nn.Module, ckpt: Path) -> None:
        """Load ``ckpt`` into a plain model, strictly (every mismatch named)."""
        load_state_dict_into(model, self.weights(ckpt), source=str(ckpt))


GPTFiles = ModelIO  # the default, by the name a reader looks for
