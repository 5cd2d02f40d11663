"""``--quality-filter``: the Gopher quality and repetition rules (Rae et al. 2021, appendix A1.1;
the thresholds are the paper's, as in datatrove's ``GopherQualityFilter`` and
``GopherRepetitionFilter``). A document failing any rule is dropped; the report names the rule.

Words are the whitespace-separated tokens of the text (Gopher does not fix a tokenizer; datatrove
uses a language's word tokenizer). Each threshold can be set (``--quality-threshold NAME=VALUE``)
or switched off (``NAME=off``). The rules, in the order they are checked (cheap ones first):

- ``min_words``/``max_words``: words holding a letter or digit (symbol-only tokens such as ``-``
  do not count);
- ``min_mean_word_length``/``max_mean_word_length``: the mean length of those words;
- ``max_symbol_ratio``: ``#`` per word, and ``...``/``…`` per word;
- ``max_bullet_lines``: share of non-blank lines starting with a bullet (``• - * ‣ ◦ ▪ ●``);
- ``max_ellipsis_lines``: share of non-blank lines ending with ``...`` or ``…``;
- ``min_alpha_words``: share of words holding a letter;
- ``min_stop_words``: how many of *the, be, to, of, and, that, have, with* occur;
- ``max_dup_paragraphs``/``max_dup_lines``: share of paragraphs (blocks between blank lines) and
  of non-blank lines that repeat an earlier one; ``max_dup_paragraph_chars``/``max_dup_line_chars``:
  the characters in those repeats, over the document's characters;
- ``max_top_{2,3,4}gram``: the characters of the most frequent word n-gram (counted only when it
  occurs more than once) times its count, over the document's characters;
- ``max_dup_{5..10}gram``: characters of the words covered by repeated occurrences of word n-grams
  (each word counted once), over the document's characters.

Memory: a document is held until it has more than ``max_words`` words, when it already fails
(100,000 words, about 600 KB of text); ``max_words=off`` holds any document whole.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Optional

import numpy as np

from ...errors import UserError

# name -> default (Gopher's values); the order is the order of the checks
THRESHOLDS: dict[str, float] = {
    "min_words": 50, "max_words": 100_000,
    "min_mean_word_length": 3, "max_mean_word_length": 10,
    "max_symbol_ratio": 0.1, "max_bullet_lines": 0.9, "max_ellipsis_lines": 0.3,
    "min_alpha_words": 0.8, "min_stop_words": 2,
    "max_dup_paragraphs": 0.30, "max_dup_paragraph_chars": 0.20, "max_dup_lines": 0.30, "max_dup_line_chars": 0.20,
    "max_top_2gram": 0.20, "max_top_3gram": 0.18, "max_top_4gram": 0.16,
    "max_dup_5gram": 0.15, "max_dup_6gram": 0.14, "max_dup_7gram": 0.13, "max_dup_8gram": 0.12,
    "max_dup_9gram": 0.11, "max_dup_10gram": 0.10,
}
INTEGER = ("min_words", "max_words", "min_stop_words")
OFF = ("off", "none")
BULLETS = ("•", "-", "*", "‣", "◦", "▪", "●")
STOP_WORDS = re.compile(r"(?i)\b(?:the|be|to|of|and|that|have|with)\b")
# a token of punctuation and symbols only (written to start with a character class, which the regex
# engine finds fast, and then to look behind it)
SYMBOL_TOKEN = re.compile(r"[^\w\s](?<!\S[^\w\s])[^\w\s]*(?!\S)")
ALPHA_TOKEN = re.compile(r"\S*?[^\W\d_]\S*")  # a token holding a letter
PARAGRAPH = re.compile(r"\n[ \t\r\f\v]*\n\s*")


def parse_thresholds(items: Optional[dict | list[str]]) -> dict[str, Optional[float]]:
    """The defaults with ``NAME=VALUE`` settings (or a dict) applied; ``None`` switches a rule off."""
    out: dict[str, Optional[float]] = dict(THRESHOLDS)
    pairs = items.items() if isinstance(items, dict) else [_split(s) for s in items or ()]
    for name, value in pairs:
        if name not in THRESHOLDS:
            raise UserError(f"--quality-threshold {name}: no such threshold; the thresholds are: "
                            f"{', '.join(THRESHOLDS)}")
        out[name] = _value(name, value)
    return out


def _split(s: str) -> tuple[str, str]:
    name, eq, value = s.partition("=")
    if not eq or not name.strip() or not value.strip():
        raise UserError(f"--quality-threshold {s!r}: write NAME=VALUE (e.g. min_words=20, or max_words=off)")
    return name.strip(), value.strip()


def _value(name: str, value) -> Optional[float]:
    if value is None or (isinstance(value, str) and value.lower() in OFF):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    share = name not in INTEGER and "mean_word" not in name
    if not math.isfinite(v) or v < 0 or (share and v > 1):
        what = "a share between 0 and 1" if share else "a non-negative number"
        raise UserError(f"--quality-threshold {name}={value}: must be {what} (or off)")
    return v


def describe(thresholds: dict[str, Optional[float]]) -> str:
    return " ".join(f"{k}={'off' if v is None else f'{v:g}'}" for k, v in thresholds.items())


# ----------------------------------------------------------------------------- the rules

class Counts:
    """What the per-word and per-line rules need, added up piece by piece (pieces end at a line end
    or a space, so the sums are those of the whole document)."""

    __slots__ = ("tokens", "token_chars", "symbols", "symbol_chars", "alpha", "hashes", "ellipses", "stops",
                 "lines", "bullets", "ellipsis_lines", "chars")

    def __init__(self):
        for k in self.__slots__:
            setattr(self, k, 0)

    def add(self, text: str, stop_cap: float = math.inf) -> "Counts":
        toks = text.split()
        sym = SYMBOL_TOKEN.findall(text)
        self.tokens += len(toks)
        self.token_chars += sum(map(len, toks))
        self.symbols += len(sym)
        self.symbol_chars += sum(map(len, sym))
        self.alpha += len(ALPHA_TOKEN.findall(text))
        self.hashes += text.count("#")
        self.ellipses += text.count("...") + text.count("\u2026")
        if self.stops < stop_cap:
            for _ in STOP_WORDS.finditer(text):  # stops counting once there are enough
                self.stops += 1
                if self.stops >= stop_cap:
                    break
        lines = [ln for ln in map(str.strip, text.splitlines()) if ln]
        self.lines += len(lines)
        self.bullets += sum(ln.startswith(BULLETS) for ln in lines)
        self.ellipsis_lines += sum(ln.endswith(("...", "\u2026")) for ln in lines)
        self.chars += len(text)
        return self

    @property
    def words(self) -> int:
        return self.tokens - self.symbols


def counted_verdict(c: Counts, t: dict[str, Optional[float]]) -> Optional[tuple[str, float]]:
    """The rules on words and lines, from the counts alone."""
    def low(name, v):
        return t[name] is not None and v < t[name]

    def high(name, v):
        return t[name] is not None and v > t[name]

    n = c.words
    if low("min_words", n) or (n == 0 and t["min_words"] is not None):
        return "min_words", n
    if high("max_words", n):
        return "max_words", n
    if n == 0:
        return None  # nothing else can be measured (min_words is off)
    mean = (c.token_chars - c.symbol_chars) / n
    for name, v, bad in (("min_mean_word_length", mean, low), ("max_mean_word_length", mean, high),
                         ("max_symbol_ratio", max(c.hashes, c.ellipses) / c.tokens, high),
                         ("max_bullet_lines", c.bullets / max(1, c.lines), high),
                         ("max_ellipsis_lines", c.ellipsis_lines / max(1, c.lines), high),
                         ("min_alpha_words", c.alpha / c.tokens, low)):
        if bad(name, v):
            return name, round(v, 4)
    if low("min_stop_words", c.stops):
        return "min_stop_words", c.stops
    return None


def _duplicates(items: list[str]) -> tuple[int, int]:
    """(repeats of an earlier item, their characters)."""
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n, chars = n + 1, chars + len(x)
        else:
            seen.add(x)
    return n, chars


def _groups(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(order, starts)``: a stable sort of ``keys`` and where each run of equal keys starts in it
    (so ``order[starts]`` is each distinct key's first position)."""
    order = np.argsort(keys, kind="stable")
    k = keys[order]
    return order, np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))


_MUL = np.uint64(0x100000001B3)


def repetition_verdict(text: str, t: dict[str, Optional[float]]) -> Optional[tuple[str, float]]:
    """The rules on repeated lines, paragraphs and word n-grams (they need the whole text)."""
    n_chars = len(text)
    if not n_chars:
        return None
    # paragraphs first, as datatrove: a repeated paragraph repeats its lines too
    paragraphs = [p.strip() for p in PARAGRAPH.split(text) if p.strip()]
    n, chars = _duplicates(paragraphs)
    for name, v in (("max_dup_paragraphs", n / max(1, len(paragraphs))), ("max_dup_paragraph_chars", chars / n_chars)):
        if t[name] is not None and v > t[name]:
            return name, round(v, 4)
    lines = [ln for ln in map(str.strip, text.splitlines()) if ln]
    n, chars = _duplicates(lines)
    for name, v in (("max_dup_lines", n / max(1, len(lines))), ("max_dup_line_chars", chars / n_chars)):
        if t[name] is not None and v > t[name]:
            return name, round(v, 4)
    words = text.split()
    first = dict.fromkeys(words)  # the distinct words in order of first use
    number = {w: i for i, w in enumerate(first)}
    ids = np.array(list(map(number.__getitem__, words)), np.uint64)
    lens = np.array(list(map(len, words)), np.int64)
    csum = np.concatenate(([0], np.cumsum(lens)))
    keys = ids.copy()
    dup_limits = [t[f"max_dup_{m}gram"] for m in range(5, 11)]
    for n in range(2, 11):
        if len(ids) < n:
            break
        # the keys of the n-grams from those of the (n-1)-grams: a 64-bit polynomial hash
        keys = keys[:-1] * _MUL + ids[n - 1:] + np.uint64(1)
        if n <= 4:
            name = f"max_top_{n}gram"
            if t[name] is None:
                continue
            order, starts = _groups(keys)
            counts = np.diff(np.append(starts, len(keys)))
            top = int(counts.max())
            if top < 2:
                break  # no n-gram repeats, so no longer one does
            at = int(order[starts[counts == top]].min())  # the first of the most frequent (Counter.most_common)
            share = float((csum[at + n] - csum[at] + n - 1) * top / n_chars)
            if share > t[name]:
                return name, round(share, 4)
            continue
        name = f"max_dup_{n}gram"
        order, starts = _groups(keys)
        repeat = np.ones(len(keys), bool)
        repeat[starts] = False
        if not repeat.any():
            break  # no n-gram repeats, so no longer one does
        cover = np.zeros(len(ids) + 1, np.int64)  # +1 where a repeated n-gram starts, -1 n words on
        at = order[repeat]
        np.add.at(cover, at, 1)
        np.add.at(cover, at + n, -1)
        share = float(lens[np.cumsum(cover[:-1]) > 0].sum() / n_chars)
        if t[name] is not None and share > t[name]:
            return name, round(share, 4)
        # the words a repeated (n+1)-gram covers, a repeated n-gram covers too: the share only
        # shrinks with n, so once it is under every later threshold, no later rule can fail
        later = [x for x in dup_limits[n - 4:] if x is not None]
        if not later or share <= min(later):
            break
    return None


def gopher_verdict(text: str, t: dict[str, Optional[float]]) -> Optional[tuple[str, float]]:
    """``None`` if ``text`` passes every rule that is on, else ``(rule, the document's value)``."""
    return counted_verdict(Counts().add(text, t["min_stop_words"] or math.inf), t) or repetition_verdict(text, t)


class QualityFilter:
    """The Gopher rules on a document that arrives in pieces (see the module doc for its memory)."""

    name = "quality"
    uses_words = False

    def __init__(self, thresholds: dict[str, Optional[float]]):
        self.t = thresholds
        self.stop_cap = thresholds["min_stop_words"] or math.inf
        self.removed: Counter = Counter()
        self.reset()

    def reset(self) -> None:
        self.parts: list[str] = []
        self.counts = Counts()

    def feed(self, text: str, words=None) -> None:
        self.counts.add(text, self.stop_cap)
        cap = self.t["max_words"]
        if cap is not None and self.counts.words > cap:
            self.parts = []  # fails max_words whatever follows: stop holding it
        else:
            self.parts.append(text)

    def verdict(self) -> Optional[dict]:
        found = counted_verdict(self.counts, self.t) or repetition_verdict("".join(self.parts), self.t)
        if found is None:
            return None
        self.removed[found[0]] += 1
        return {"rule": found[0], "value": found[1], "threshold": self.t[found[0]]}
