"""What generation hands back: ``Event`` (one step of one row), ``Completion`` (a finished row) and
``GenerationError``. Their own module so that every decoding strategy (plain, speculative, beam)
can build them without importing the ``Generator`` that dispatches to it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError


class GenerationError(UserError, ValueError):
    """A generation request that cannot be served as asked (too long, no tokenizer, ...)."""


@dataclass
class Event:
    """One step of one row: ``token`` was generated (None on a row's closing event) and
    ``text`` became printable. ``finish_reason`` is set on the row's last event."""
    index: int
    token: Optional[int]
    text: str
    finish_reason: Optional[str] = None  # "eos", "stop" or "length"


@dataclass
class Completion:
    index: int
    prompt_tokens: list[int]
    tokens: list[int] = field(default_factory=list)  # generated ids (end-of-text not included)
    text: str = ""  # generated text, cut before a stop string
    finish_reason: str = "length"
    # what the context limit did to this row, so that callers can report it rather than hide it
    prompt_cut_tokens: int = 0  # prompt tokens dropped to fit the context (truncate=True)
    stopped_at_context: bool = False  # ended ("length") with a full context, short of max_new_tokens
    context_slides: int = 0  # times the row outgrew the context and its window slid
