"""Words to subword windows: the first subword of each word carries its label, the others are ignored.

A sentence is encoded as one text, its words joined by single spaces, so every word after the
first is read with the leading space a byte-level BPE (GPT-2) gives a word inside running text,
and a WordPiece tokenizer sees the words it splits on anyway; each subword is mapped back to its
word by its character offsets. Subwords of one word after the first get ``IGNORE_INDEX``.

A sentence longer than the window (``max_length`` less the special tokens) is split at word
boundaries into consecutive windows that each fit, every word in exactly one window, and the
windows are tagged separately (a word near a cut sees less context; nothing is dropped). A single
word longer than a whole window keeps its first ``max_length`` subwords (only the first is read).
A word that encodes to no subword at all (characters the tokenizer's normalizer removes) has no
position: it is not scored in training and is tagged with the fallback tag (``O``, else the most
frequent training tag).

Encoders (``model.arch == "encoder"``) read each window with the tokenizer's own special tokens
around it (BERT's ``[CLS] ... [SEP]``); a GPT reads the bare words, as ``finetune classify`` does.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional

from ...model.loss import IGNORE_INDEX
from ..classify.data import special_wrap
from .formats import TokensDataError


@dataclass
class Window:
    ids: list[int]
    first: list[int]  # each word's first-subword position in ``ids`` (-1: the word has none)
    sent: int  # the sentence it belongs to
    word0: int  # the sentence index of its first word
    labels: Optional[list[int]] = None  # one per position: the word's label at first subwords, else IGNORE


def _word_of_tokens(words: list[str], offsets: list[tuple[int, int]], text: str) -> list[tuple[int, bool]]:
    """``(word, lead)`` of each subword: the word of the first non-space character of its span (-1:
    none); ``lead``: the span is only the space before that word (a BPE may emit it alone), so the
    subword belongs to the word but cannot carry its label (a causal model has not seen the word)."""
    starts, ends, pos = [], [], 0
    for w in words:
        starts.append(pos)
        ends.append(pos + len(w))
        pos += len(w) + 1
    out = []
    for s, e in offsets:
        c = s
        while c < len(text) and text[c].isspace():
            c += 1
        if c >= len(text):  # trailing space: no word
            out.append((-1, True))
            continue
        wi = bisect.bisect_right(starts, c) - 1
        out.append((wi if wi >= 0 and c < ends[wi] else -1, e > s and c >= e))
    return out


class WordEncoder:
    """Subword windows of word sequences for one tokenizer, window length and model kind."""

    def __init__(self, tokenizer_json: str, max_length: int, special_tokens: bool = False):
        from tokenizers import Tokenizer

        from ...data.tokenizer import special_ids, vocab_size_of

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.vocab_size = vocab_size_of(self.tokenizer)
        self.eos_id, self.pad_id = special_ids(self.tokenizer)
        self.max_length, self.special_tokens = max_length, special_tokens
        self.prefix, self.suffix = special_wrap(self.tokenizer) if special_tokens else ([], [])
        self.room = max_length - len(self.prefix) - len(self.suffix)
        if self.room < 1:
            raise TokensDataError(f"--max-length {max_length} leaves no room for words")

    @property
    def fill_id(self) -> int:
        """What padding positions hold (masked: any id; the pad token when there is one)."""
        return self.pad_id if self.pad_id is not None else 0

    def subwords(self, sentences: list[list[str]]) -> list[list[tuple[list[int], int]]]:
        """Each sentence's words as ``(subword ids, index of the first one that carries the label)``;
        the index is -1 for a word with no subword of its own (its ids may then be a lone space)."""
        texts = [" ".join(ws) for ws in sentences]
        encs = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        out = []
        for ws, text, enc in zip(sentences, texts, encs):
            per: list[tuple[list[int], int]] = [([], -1) for _ in ws]
            for tid, (wi, lead) in zip(enc.ids, _word_of_tokens(ws, enc.offsets, text)):
                if wi >= 0:
                    ids, first = per[wi]
                    per[wi] = (ids + [tid], len(ids) if first < 0 and not lead else first)
            out.append(per)
        return out

    def windows(self, sentences: list[list[str]], labels: Optional[list[list[int]]] = None) -> list[Window]:
        """The windows of every sentence, in order (a sentence fills one or more consecutive windows)."""
        out = []
        for si, per in enumerate(self.subwords(sentences)):
            start = 0
            while start < len(per) or (start == 0 and not per):
                ids, first, j = list(self.prefix), [], start
                while j < len(per) and (j == start or len(ids) - len(self.prefix) + len(per[j][0]) <= self.room):
                    toks, at = per[j][0][:self.room], per[j][1]
                    first.append(len(ids) + at if 0 <= at < len(toks) else -1)
                    ids += toks
                    j += 1
                ids += self.suffix
                lab = None
                if labels is not None:
                    lab = [IGNORE_INDEX] * len(ids)
                    for k, pos in enumerate(first):
                        if pos >= 0:
                            lab[pos] = labels[si][start + k]
                if len(ids) == 0:  # an empty sentence (words only, tag's input): one filler position
                    ids, lab = [self.fill_id], (None if lab is None else [IGNORE_INDEX])
                out.append(Window(ids, first, si, start, lab))
                if j == start:
                    break
                start = j
        return out
