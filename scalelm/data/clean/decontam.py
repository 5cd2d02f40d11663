"""``--decontaminate FILE...``: drop the training documents that share a 13-gram with an evaluation
file (the GPT-3 paper's appendix C, Dolma's decontamination), and say which files were hit.

Text on both sides is normalised the same way: case-folded words of letters and digits
(:func:`.text.words`), so punctuation, case and line breaks do not hide an overlap. An evaluation
file is read line by line as one stream of words (any UTF-8 text: plain text, JSON lines, TSV).

Memory: the evaluation side only. Each distinct evaluation word gets a number, and each 13-gram of
numbers is kept as a 64-bit hash with the index of its file: 12 bytes per evaluation 13-gram (in
sorted arrays) and about 100 bytes per distinct evaluation word. The training side is streamed: a
document is checked piece by piece, with its last 12 words carried over.
"""

from __future__ import annotations

from collections import Counter
from itertools import repeat
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ...errors import UserError
from .text import words as split_words

NGRAM = 13
_P = 0x100000001B3  # odd, so it has an inverse modulo 2^64
_POWERS: dict[int, np.ndarray] = {}


def _powers(base: int, m: int) -> np.ndarray:
    """``base ** j`` modulo 2^64 for j < m (kept, grown by doubling)."""
    have = _POWERS.get(base)
    if have is None or len(have) < m:
        size = max(m, 2 * len(have) if have is not None else 1024)
        have = np.cumprod(np.concatenate((np.ones(1, np.uint64), np.full(size - 1, base, np.uint64))), dtype=np.uint64)
        _POWERS[base] = have
    return have[:m]


def _keys(ids: np.ndarray, n: int = NGRAM) -> np.ndarray:
    """A 64-bit key per n-gram of ``ids`` (``len(ids) >= n``): the polynomial hash
    sum_j (id_j + 1) P^(n-1-j) modulo 2^64, for every window at once from one prefix sum (weights
    P^-j make a window's sum a difference of two prefix sums; P^(i+n-1) then removes the offset)."""
    v = ids.astype(np.uint64) + np.uint64(1)
    m = len(v)
    prefix = np.concatenate((np.zeros(1, np.uint64), np.cumsum(v * _powers(pow(_P, -1, 1 << 64), m), dtype=np.uint64)))
    return (prefix[n:] - prefix[:-n]) * _powers(_P, m)[n - 1:]


class EvalIndex:
    """The 13-grams of the evaluation files, as hashes, with the file each came from."""

    def __init__(self, files: Sequence[str | Path], n: int = NGRAM, chunk_lines: int = 10_000):
        self.files = [str(f) for f in files]
        self.n = n
        self.vocab: dict[str, int] = {}
        self.ngrams = [0] * len(self.files)  # distinct n-grams per file
        keys, owner = [], []
        for i, f in enumerate(self.files):
            k = np.unique(np.concatenate(list(self._file_keys(f, chunk_lines)) or [np.zeros(0, np.uint64)]))
            self.ngrams[i] = len(k)
            keys.append(k)
            owner.append(np.full(len(k), i, np.int32))
        keys_a, owner_a = np.concatenate(keys), np.concatenate(owner)
        order = np.lexsort((owner_a, keys_a))
        self.keys, self.owner = keys_a[order], owner_a[order]

    def _file_keys(self, path: str, chunk_lines: int):
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--decontaminate {path}: no such file")
        carry = np.zeros(0, np.int64)
        try:
            with open(p, encoding="utf-8") as f:
                while True:
                    lines = [line for _, line in zip(range(chunk_lines), f)]
                    if not lines:
                        break
                    ws = split_words("".join(lines))
                    ids = np.fromiter((self.vocab.setdefault(w, len(self.vocab)) for w in ws), np.int64, len(ws))
                    ids = np.concatenate((carry, ids))
                    if len(ids) >= self.n:
                        yield _keys(ids, self.n)
                    carry = ids[-(self.n - 1):] if self.n > 1 else ids[:0]
        except UnicodeDecodeError as e:
            raise UserError(f"--decontaminate {path} is not UTF-8 text (byte {e.start} of a line cannot be "
                            f"decoded): convert it (e.g. iconv -f latin1 -t utf-8)") from None
        except OSError as e:
            raise UserError(f"--decontaminate {path}: cannot read it ({e.strerror or e})") from None

    def memory_bytes(self) -> int:
        return self.keys.nbytes + self.owner.nbytes

    def files_of(self, keys: np.ndarray) -> set[int]:
        """The files that hold any of ``keys`` (keys known to be in the index)."""
        lo = np.searchsorted(self.keys, keys, "left")
        hi = np.searchsorted(self.keys, keys, "right")
        return {int(o) for a, b in zip(lo, hi) for o in self.owner[a:b]}


class Decontaminator:
    """Per document: does any 13-gram of it appear in an evaluation file?"""

    name = "decontaminate"
    uses_words = True

    def __init__(self, index: EvalIndex):
        self.index = index
        self.docs_hit = Counter()  # file index -> training documents that overlap it
        self.reset()

    def reset(self) -> None:
        self.carry: list[str] = []
        self.hit: set[int] = set()
        self.example: Optional[str] = None

    def feed(self, text: str, words: list[str]) -> None:
        n, vocab = self.index.n, self.index.vocab
        ws = self.carry + words
        self.carry = ws[-(n - 1):] if n > 1 else []
        if len(ws) < n or not len(self.index.keys):
            return
        ids = np.array(list(map(vocab.get, ws, repeat(-1))), np.int64)
        unknown = np.concatenate(([0], np.cumsum(ids < 0)))
        ok = (unknown[n:] - unknown[:-n]) == 0  # n-grams of evaluation words only
        if not ok.any():
            return
        starts = np.flatnonzero(ok)
        keys = _keys(np.where(ids < 0, 0, ids), n)[starts]
        pos = np.searchsorted(self.index.keys, keys)
        found = (pos < len(self.index.keys)) & (self.index.keys[np.minimum(pos, len(self.index.keys) - 1)] == keys)
        if found.any():
            self.hit |= self.index.files_of(keys[found])
            if self.example is None:
                s = int(starts[np.flatnonzero(found)[0]])
                self.example = " ".join(ws[s:s + n])

    def verdict(self) -> Optional[dict]:
        if not self.hit:
            return None
        files = sorted(self.hit)
        for i in files:
            self.docs_hit[i] += 1
        return {"files": [self.index.files[i] for i in files], "ngram": self.example}

    def summary(self) -> list[dict]:
        return [{"file": f, "ngrams": self.index.ngrams[i], "documents_hit": self.docs_hit[i]}
                for i, f in enumerate(self.index.files)]
