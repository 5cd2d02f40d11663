"""Tagging schemes: which one a file uses, and the one the model learns and is scored in (IOB2).

    IOB2    every entity starts with ``B-X``, continues with ``I-X`` (CoNLL-2003 as HF ships it)
    IOB1    an entity starts with ``I-X``; ``B-X`` only starts an entity right after another X
            (the original CoNLL-2003 ``eng.*`` files)
    BIOES   ``B-X`` ... ``E-X`` for longer entities, ``S-X`` for one word (BILOU's ``L-``/``U-`` too)

A tagset *has spans* when every tag is ``O`` or ``P-TYPE`` with a scheme prefix; it is then
scored per entity (seqeval, strict IOB2), otherwise (POS tags) per token. All of a file's span
tags are converted to IOB2 for training and scoring, so that one tagset (and one model) serves
every input scheme.

An ``I-X`` with no entity to continue (after ``O``, after another type, or first in the sentence)
in a file detected as IOB2 is repaired to ``B-X``: what seqeval's default (conlleval) mode reads it
as, and what its strict mode would otherwise drop silently. The repairs are counted and printed in
one line naming the first one; nothing is refused, since such tags are common in real data.
"""

from __future__ import annotations

import re
from typing import Iterable

SCHEMES = ("IOB1", "IOB2", "BIOES")
_SPAN = re.compile(r"([BIESLU])-(.+)")


def split_tag(tag: str) -> tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``."""
    m = _SPAN.fullmatch(tag)
    return (m.group(1), m.group(2)) if m else ("O", "")


def has_spans(tags: Iterable[str]) -> bool:
    """Do the tags look like entity spans (every one ``O`` or ``B-/I-/E-/S-/L-/U-TYPE``, some not ``O``)?"""
    seen = False
    for t in tags:
        if t == "O":
            continue
        if not _SPAN.fullmatch(t):
            return False
        seen = True
    return seen


def _continues(prev: str, tag: str) -> bool:
    """Does ``tag`` (an I-X) continue the entity ``prev`` belongs to?"""
    p, pt = split_tag(prev)
    return p in ("B", "I") and pt == split_tag(tag)[1]


def detect_scheme(sequences: Iterable[list[str]]) -> str:
    """IOB1, IOB2 or BIOES, from the tags alone (see the module docstring)."""
    orphans, b_starts = 0, 0
    for tags in sequences:
        prev = "O"
        for t in tags:
            p, typ = split_tag(t)
            if p in ("E", "S", "L", "U"):
                return "BIOES"
            if p == "I" and not _continues(prev, t):
                orphans += 1
            if p == "B" and split_tag(prev)[1] != typ:  # a B- that starts an entity after O / another type
                b_starts += 1
            prev = t
    # IOB1 starts entities with I- and uses B- only between two adjacent entities of one type
    return "IOB1" if orphans and not b_starts else "IOB2"


def to_iob2(tags: list[str], scheme: str) -> tuple[list[str], list[int]]:
    """``(tags in IOB2, positions of repaired orphan I- tags)``. IOB1's entity-starting I- and a
    stray I- in IOB2 both become B- (only the latter counts as a repair)."""
    out, repaired = [], []
    prev = "O"
    for i, t in enumerate(tags):
        p, typ = split_tag(t)
        if scheme == "BIOES":
            p = {"S": "B", "U": "B", "E": "I", "L": "I"}.get(p, p)
            t = f"{p}-{typ}" if typ else "O"
        if p == "I" and not _continues(prev, t):
            if scheme != "IOB1":  # IOB1 starts entities this way; elsewhere it is an error, repaired
                repaired.append(i)
            t = f"B-{typ}"
        out.append(t)
        prev = t
    return out, repaired


def normalise(sequences: list[list[str]], spans: bool | None = None) -> tuple[list[list[str]], str, list]:
    """A file's tag sequences in IOB2 when they have spans (else unchanged): ``(tags, scheme,
    [(sentence, word) of each repaired orphan I-])``; scheme is ``"none"`` for a tagset without spans.
    ``spans``: decided already (by the training file: its validation file follows it)."""
    if spans is None:
        spans = has_spans(t for s in sequences for t in s)
    if not spans:
        return sequences, "none", []
    scheme = detect_scheme(sequences)
    out, repairs = [], []
    for si, tags in enumerate(sequences):
        new, fixed = to_iob2(tags, scheme)
        out.append(new)
        repairs += [(si, i) for i in fixed]
    return out, scheme, repairs
