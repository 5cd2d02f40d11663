"""What the ``Trainer`` asks of the objects a training command hands it, as typed protocols.

The trainer is one loop for every objective; what differs comes in as arguments. These say what
each must offer, so a new recipe knows what to write and the trainer branches on declared types,
not on which attributes an object happens to have:

* ``data``: :class:`TrainData` (the tokenizer saved with every model, its size). A prepared
  DATA_DIR (``scalelm.data.loader.TokenData``) is also a :class:`DataDir`: a resumed checkpoint's
  tokenizer is checked against it, and without ``batches`` / ``evaluate_fn`` its splits are read.
* ``batches``: :class:`Batches` (the next micro-batch, and a state that resumes exactly). Batches
  that pad (instruction tuning, translation) are :class:`CountedBatches`: they count the real and
  the supervised tokens served, which every training record then reports.
* ``loss_fn``: ``loss_fn(model, batch) -> loss``; one that is also :class:`ReportsStats` adds its own
  measurements to the training records.
* ``model``: a GPT, an encoder-decoder, or a :class:`WrapsGPT` (a classifier, a distillation
  student) whose ``gpt`` is where LoRA and parallelism apply (:func:`backbone`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol, TypeGuard, runtime_checkable

import torch.nn as nn


class TrainData(Protocol):
    """What the trainer reads of ``data`` whatever the objective."""

    @property
    def tokenizer_json(self) -> Optional[str]: ...  # written next to every saved model (None: none to write)

    @property
    def vocab_size(self) -> int: ...  # the model's vocabulary must hold it


@runtime_checkable
class DataDir(Protocol):
    """Data prepared in a directory (``TokenData``): its tokenizer must be a resumed checkpoint's."""

    dir: Path


class Batches(Protocol):
    """A stream of training micro-batches that resumes where it stopped."""

    def next_batch(self) -> Any: ...  # what ``loss_fn(model, batch)`` takes

    def state_dict(self) -> dict: ...  # JSON-able: saved in every checkpoint's state.json

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class CountedBatches(Batches, Protocol):
    """Padded batches that count what they served, summed over every data-parallel rank."""

    tokens: int  # real (non-padding) tokens
    supervised_tokens: int  # tokens with a loss


@runtime_checkable
class ReportsStats(Protocol):
    """A ``loss_fn`` that also measures something per step (preference tuning's rewards, under TRL's
    names): the Trainer adds ``take_stats()`` to every training record. Every rank calls it at the
    same step, so it may all-reduce."""

    def __call__(self, model: nn.Module, batch: Any) -> Any: ...

    def take_stats(self) -> dict[str, float]: ...


class WrapsGPT(Protocol):
    """A task model around a GPT: the wrapper trains and is saved, its ``gpt`` is the backbone that
    LoRA adapts and parallelism shards (a classifier's head, a distillation student's projection
    stay outside them)."""

    gpt: nn.Module


def wraps_gpt(model: nn.Module) -> TypeGuard[WrapsGPT]:
    """Is ``model`` a :class:`WrapsGPT`? Asked of its child modules, not with ``isinstance``:
    from Python 3.12 a runtime-checkable protocol looks attributes up statically
    (``inspect.getattr_static``), which never finds a submodule (it lives in ``_modules``)."""
    return isinstance(dict(model.named_children()).get("gpt"), nn.Module)


def backbone(model: nn.Module) -> nn.Module:
    """The GPT inside a :class:`WrapsGPT`; any other model is its own backbone."""
    return model.gpt if wraps_gpt(model) else model
