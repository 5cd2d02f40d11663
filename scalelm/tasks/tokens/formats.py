"""Word-tagged sentences: CoNLL columns, CoNLL-U and JSONL readers, and the layout ``tag`` writes back.

    conll    one word per line, columns split by tabs (when the first word line has one) or runs of
             spaces; the word is column 1, the tag ``--tag-column N`` (1-based; default the last);
             a blank line ends a sentence; ``-DOCSTART-`` lines are document breaks, not words
    conllu   10 tab-separated fields; the tag is ``--tag-field upos`` (default) or ``xpos`` (any
             field name works); ``#`` comments, multiword ranges ``1-2`` and empty nodes ``1.1``
             are skipped (the words are the syntactic words, as UD's own scoring counts them)
    jsonl    one object per line, ``{"tokens": [...], "tags": [...]}`` (``--word-field``/``--tag-field``)

The format comes from ``--format``, else the extension (``.conllu``, ``.jsonl``/``.json``), else
the content (a first line ``{`` is JSONL; 10 tab-separated fields with a numeric first one is
CoNLL-U). Every bad input is a :class:`TokensDataError` naming ``FILE:LINE``. A reader also
returns the file's layout, one entry per input line, so that ``scalelm tag`` writes one output
line per input line (blank lines, ``-DOCSTART-`` and comments kept where they were).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ...data.lines import STDIN, split_lines
from ...errors import UserError

FORMATS = ("conll", "conllu", "jsonl")
EXTENSIONS = {".conllu": "conllu", ".jsonl": "jsonl", ".json": "jsonl"}
CONLLU_FIELDS = ("id", "form", "lemma", "upos", "xpos", "feats", "head", "deprel", "deps", "misc")
DOCSTART = "-DOCSTART-"
_CONLLU_ID = re.compile(r"\d+(?:[-.]\d+)?")


class TokensDataError(UserError):
    """A file that cannot be read as word-tagged (or plain word) sentences."""


@dataclass
class Sentence:
    words: list[str]
    tags: Optional[list[str]]  # None: words only (``scalelm tag``'s input)
    lines: list[int]  # each word's line number (JSONL: the record's, for every word)
    path: str

    def where(self, i: int = 0) -> str:
        return f"{self.path}:{self.lines[i] if self.lines else '?'}"


@dataclass
class Layout:
    """One entry per input line: ``None`` (kept as it is) or ``(sentence, word)``; ``lines`` the text."""

    lines: list[str] = field(default_factory=list)
    slots: list[Optional[tuple[int, int]]] = field(default_factory=list)


def detect_format(path: str | Path, fmt: Optional[str] = None, text: Optional[str] = None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise TokensDataError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
        return fmt
    ext = EXTENSIONS.get(Path(path).suffix.lower()) if str(path) != STDIN else None
    if ext or text is None:
        return ext or "conll"
    for line in split_lines(text):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.startswith("{"):
            return "jsonl"
        cols = line.split("\t")
        return "conllu" if len(cols) == 10 and _CONLLU_ID.fullmatch(cols[0]) else "conll"
    return "conll"


def read_text(path: str | Path) -> str:
    """A file's UTF-8 text (``-``: standard input), refused when empty."""
    from ...data.lines import read_text as read_utf8

    text = read_utf8(path, "the file")
    if not text.strip():
        raise TokensDataError(f"{path} is empty: it needs sentences, one word per line (CoNLL) or one JSON "
                              f"object per line")
    return text


# ----------------------------------------------------------------------------- CoNLL columns

def _read_conll(path: str, text: str, labelled: bool, tag_column: Optional[int]) -> tuple[list[Sentence], Layout]:
    sents: list[Sentence] = []
    layout = Layout()
    words, tags, lines = [], [], []
    sep, width = "", None  # decided by the first word line: tabs if it has one, else runs of spaces

    def end():
        if words:
            sents.append(Sentence(list(words), list(tags) if labelled else None, list(lines), path))
            words.clear(), tags.clear(), lines.clear()

    for n, line in enumerate(split_lines(text), 1):
        layout.lines.append(line)
        if not line.strip() or line.split(None, 1)[0] == DOCSTART:
            end()
            layout.slots.append(None)
            continue
        if width is None:
            sep = "\t" if "\t" in line else ""
        cols = line.split("\t") if sep else line.split()
        cols = [c.strip() for c in cols]
        if width is None:
            width = len(cols)
            if labelled and width < 2:
                raise TokensDataError(f"{path}:{n}: one column ({line.strip()!r}): a labelled CoNLL file has "
                                      f"the word and its tag on each line")
            if labelled and tag_column is not None and not 2 <= tag_column <= width:
                raise TokensDataError(f"{path}:{n}: --tag-column {tag_column} is not a tag column of this file "
                                      f"(its lines have {width} columns; the word is column 1)")
        if len(cols) != width:
            raise TokensDataError(f"{path}:{n}: {len(cols)} columns, but the file's first word line has {width} "
                                  f"({'tab' if sep else 'space'}-separated): {line.strip()!r}")
        if not cols[0]:
            raise TokensDataError(f"{path}:{n}: the word (column 1) is empty")
        layout.slots.append((len(sents), len(words)))
        words.append(cols[0])
        lines.append(n)
        if labelled:
            tag = cols[(tag_column or width) - 1]
            if not tag:
                raise TokensDataError(f"{path}:{n}: the tag (column {tag_column or width}) is empty")
            tags.append(tag)
    end()
    return sents, layout


# ----------------------------------------------------------------------------- CoNLL-U

def _read_conllu(path: str, text: str, labelled: bool, tag_field: str) -> tuple[list[Sentence], Layout]:
    if tag_field not in CONLLU_FIELDS[1:]:
        raise TokensDataError(f"--tag-field {tag_field!r} is not a CoNLL-U field: one of "
                              f"{', '.join(CONLLU_FIELDS[2:])}")
    col = CONLLU_FIELDS.index(tag_field)
    sents: list[Sentence] = []
    layout = Layout()
    words, tags, lines = [], [], []
    for n, line in enumerate(split_lines(text), 1):
        layout.lines.append(line)
        if not line.strip():
            if words:
                sents.append(Sentence(list(words), list(tags) if labelled else None, list(lines), path))
                words.clear(), tags.clear(), lines.clear()
            layout.slots.append(None)
            continue
        if line.startswith("#"):
            layout.slots.append(None)
            continue
        cols = line.split("\t")
        if len(cols) != 10:
            raise TokensDataError(f"{path}:{n}: {len(cols)} tab-separated fields, CoNLL-U has 10: {line.strip()!r}")
        if not _CONLLU_ID.fullmatch(cols[0]):
            raise TokensDataError(f"{path}:{n}: the ID field {cols[0]!r} is not a word index, a range N-M or an "
                                  f"empty node N.M")
        if not cols[0].isdigit():  # a multiword range or an empty node: not a syntactic word
            layout.slots.append(None)
            continue
        layout.slots.append((len(sents), len(words)))
        words.append(cols[1])
        lines.append(n)
        if labelled:
            if cols[col] in ("", "_"):
                raise TokensDataError(f"{path}:{n}: no {tag_field.upper()} ({cols[col]!r}) for {cols[1]!r}")
            tags.append(cols[col])
    if words:
        sents.append(Sentence(words, tags if labelled else None, lines, path))
    return sents, layout


# ----------------------------------------------------------------------------- JSONL

def _read_jsonl(path: str, text: str, labelled: bool, word_field: str, tag_field: str) -> tuple[list[Sentence], Layout]:
    sents: list[Sentence] = []
    layout = Layout()
    for n, line in enumerate(split_lines(text), 1):
        layout.lines.append(line)
        if not line.strip():
            layout.slots.append(None)
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TokensDataError(f"{where}: not valid JSON ({e.msg}); JSONL holds one object per line") from None
        if not isinstance(obj, dict):
            raise TokensDataError(f"{where}: expected a JSON object with {word_field!r} and {tag_field!r}, got a "
                                  f"{type(obj).__name__}")
        need = (word_field, tag_field) if labelled else (word_field,)
        for f, opt in zip(need, ("--word-field", "--tag-field")):
            if f not in obj:
                raise TokensDataError(f"{where}: no field {f!r} (the object has {sorted(obj)}; {opt} names it)")
        words = obj[word_field]
        if not isinstance(words, list) or not all(isinstance(w, str) and w.strip() for w in words):
            raise TokensDataError(f"{where}: {word_field!r} must be a list of non-empty strings")
        if labelled and not words:
            raise TokensDataError(f"{where}: {word_field!r} is empty: a training sentence needs words")
        tags = None
        if labelled:
            tags = obj[tag_field]
            if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
                raise TokensDataError(f"{where}: {tag_field!r} must be a list of non-empty strings")
            if len(tags) != len(words):
                raise TokensDataError(f"{where}: {len(words)} {word_field} but {len(tags)} {tag_field}: one tag per "
                                      f"word")
            tags = [t.strip() for t in tags]
        layout.slots.append((len(sents), 0))  # the record: tag writes one output record per input record
        sents.append(Sentence([w.strip() for w in words], tags, [n] * len(words), path))
    return sents, layout


# ----------------------------------------------------------------------------- one entry point

def read_sentences(path: str | Path, fmt: Optional[str] = None, *, labelled: bool = True,
                   tag_column: Optional[int] = None, tag_field: Optional[str] = None,
                   word_field: str = "tokens") -> tuple[list[Sentence], Layout, str]:
    """``(sentences, layout, format)`` of a file. ``labelled=False``: words only (a tag column, if
    any, is ignored). ``tag_field``: the CoNLL-U field (default ``upos``) or the JSONL key (default
    ``tags``)."""
    text = read_text(path)
    fmt = detect_format(path, fmt, text)
    p = str(path)
    if fmt == "conll":
        sents, layout = _read_conll(p, text, labelled, tag_column)
    elif fmt == "conllu":
        sents, layout = _read_conllu(p, text, labelled, (tag_field or "upos").lower())
    else:
        sents, layout = _read_jsonl(p, text, labelled, word_field, tag_field or "tags")
    if not sents:
        raise TokensDataError(f"{path} holds no sentences (only blank lines, comments or -DOCSTART-)")
    return sents, layout, fmt
