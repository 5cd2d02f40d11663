"""Labelled sentences for training and scoring: read, schemes normalised, tags checked, windows, batches.

The training file decides the task: its tags (normalised to IOB2 when they are spans, see
:mod:`.schemes`) are the model's label set, sorted (``O`` first when present), and whether it is
scored per entity or per token. A validation or evaluation file is normalised the same way; a tag
that the training file never had is an error naming its ``FILE:LINE`` (the model cannot predict
it, and scoring it would quietly count as misses). Orphan ``I-`` tags are repaired (one note line
per file, naming the first).
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Optional

import numpy as np
import torch

from ...model.loss import IGNORE_INDEX
from ..classify.data import ClassifyBatches
from .formats import Sentence, TokensDataError, read_sentences
from .schemes import has_spans, normalise


def read_labelled(paths, s: dict, spans: Optional[bool] = None) -> tuple[list[Sentence], str]:
    """The sentences of one or more files, tags normalised; ``(sentences, scheme)``."""
    paths = paths if isinstance(paths, (list, tuple)) else [paths]
    sents: list[Sentence] = []
    for p in paths:
        sents += read_sentences(p, s.get("format"), labelled=True, tag_column=s.get("tag_column"),
                                tag_field=s.get("tag_field"), word_field=s.get("word_field") or "tokens")[0]
    tags, scheme, repairs = normalise([x.tags for x in sents], spans)
    for x, t in zip(sents, tags):
        x.tags = t
    if repairs:
        si, wi = repairs[0]
        print(f"note: repaired {len(repairs)} I- tag(s) that continue no entity to B- (as seqeval's default mode "
              f"reads them), first at {sents[si].where(wi)}", file=sys.stderr)
    return sents, scheme


def label_names(sents: list[Sentence], path) -> list[str]:
    """The training file's tags, sorted (``O`` first); at least two."""
    names = sorted({t for x in sents for t in x.tags}, key=lambda t: (t != "O", t))
    if len(names) < 2:
        raise TokensDataError(f"{path} has only the tag {names}: a tagger needs at least two")
    return names


def label_ids(sents: list[Sentence], names: list[str], what: str) -> list[list[int]]:
    """Tags as indices into ``names``; an unknown tag is an error naming its line."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for x in sents:
        for i, t in enumerate(x.tags):
            if t not in index:
                raise TokensDataError(f"{x.where(i)}: unknown tag {t!r}: the model knows {names} (the tags of "
                                      f"{what}); fix the tag, or train on examples of it")
        out.append([index[t] for t in x.tags])
    return out


def fallback_tag(sents: list[Sentence]) -> str:
    """The tag of a word with no subword: ``O``, else the most frequent training tag."""
    counts = Counter(t for x in sents for t in x.tags)
    return "O" if "O" in counts else counts.most_common(1)[0][0]


def spans_of(sents: list[Sentence]) -> bool:
    return has_spans(t for x in sents for t in x.tags)


class TokenBatches(ClassifyBatches):
    """The classifier's shuffled, resumable epochs over windows; the labels are one per position
    (``IGNORE_INDEX`` at padding, non-first subwords and special tokens)."""

    kind = "tokens"

    def label_batch(self, sel: np.ndarray) -> torch.Tensor:
        T = max(len(self.labels[i]) for i in sel)
        y = torch.full((len(sel), T), IGNORE_INDEX, dtype=torch.long)
        for r, i in enumerate(sel):
            y[r, :len(self.labels[i])] = torch.tensor(self.labels[i], dtype=torch.long)
        return y
