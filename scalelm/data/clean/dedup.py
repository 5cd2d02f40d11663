"""``--dedup exact|minhash``: drop documents that repeat an earlier kept one.

- ``exact``: a 128-bit BLAKE2 hash of the normalised text (case-folded, whitespace runs made one
  space, ends stripped). Memory: one hash and a document number per kept document (about 150
  bytes in a Python dict).
- ``minhash``: near-duplicates by MinHash LSH (``datasketch``, extra ``scalelm[data]``): the
  signature (128 permutations) of a document's set of word 5-grams (:func:`.text.words`; a
  document of fewer words is one shingle) is looked up in an LSH index whose bands datasketch
  tunes for the Jaccard ``threshold`` (0.8: 9 bands of 13 rows); a document that shares a band
  with a kept one is a duplicate (no second check of the estimate, as datatrove). Memory: the
  index, about 4 KB per kept document (datasketch's in-memory storage keeps a set per bucket: 190 MB
  for 48k documents in benchmarks/bench_clean.py), and datasketch itself, which loads scipy (40 MB).

The first copy in corpus order is kept, so the output is the same on every run.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Optional

import numpy as np

from ...errors import UserError

SHINGLE = 5
NUM_PERM = 128
DEFAULT_THRESHOLD = 0.8
_MUL = np.uint64(0x100000001B3)


def check_threshold(threshold: float) -> float:
    if not 0.0 < threshold < 1.0:
        raise UserError(f"--dedup-threshold is a Jaccard similarity between 0 and 1 (exclusive), got {threshold}")
    return float(threshold)


class ExactDedup:
    name = "dedup"
    uses_words = False

    def __init__(self):
        self.seen: dict[bytes, int] = {}
        self.reset()

    def reset(self) -> None:
        self.h = hashlib.blake2b(digest_size=16)
        self.started = self.space = False

    def feed(self, text: str, words=None) -> None:
        # whitespace is normalised across piece boundaries: the hash does not depend on where the
        # reader cut the document
        s = " ".join(text.casefold().split())
        lead = text[:1].isspace()
        if s:
            if self.started and (self.space or lead):
                self.h.update(b" ")
            self.h.update(s.encode("utf-8"))
            self.started = True
            self.space = text[-1:].isspace()
        elif text:
            self.space = True

    def verdict(self, doc: int) -> Optional[dict]:
        key = self.h.digest()
        first = self.seen.get(key)
        if first is not None:
            return {"duplicate_of": first}
        self.seen[key] = doc
        return None


def _word_hashes(words: list[str]) -> np.ndarray:
    return np.array(list(map(zlib.crc32, map(str.encode, words))), np.uint64)


def _shingle_hashes(h: np.ndarray, n: int) -> np.ndarray:
    """32-bit hashes of the word n-grams (``len(h) >= n``) from the words' hashes."""
    k = np.zeros(len(h) - n + 1, np.uint64)
    for j in range(n):
        k = k * _MUL + h[j:len(h) - n + 1 + j]
    return (k ^ (k >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


def _identity(x):
    return x  # the shingles arrive hashed


def _band_key(b: bytes) -> bytes:
    return hashlib.blake2b(b, digest_size=8).digest()  # 8 bytes per band key instead of 52


class MinHashDedup:
    name = "dedup"
    uses_words = True

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, num_perm: int = NUM_PERM, shingle: int = SHINGLE):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError:
            raise UserError("--dedup minhash needs datasketch: pip install 'scalelm[data]'") from None
        self.threshold, self.n = check_threshold(threshold), shingle
        self.lsh = MinHashLSH(threshold=self.threshold, num_perm=num_perm, hashfunc=_band_key)
        self.m = MinHash(num_perm=num_perm, seed=1, hashfunc=_identity)  # one sketch, cleared per document
        self.indexed = 0
        self.reset()

    @property
    def bands(self) -> tuple[int, int]:
        return self.lsh.b, self.lsh.r

    def reset(self) -> None:
        self.m.clear()
        self.carry = np.zeros(0, np.uint64)
        self.shingles = 0

    def feed(self, text: str, words: list[str]) -> None:
        h = np.concatenate((self.carry, _word_hashes(words)))
        if len(h) >= self.n:
            self.m.update_batch(_shingle_hashes(h, self.n).tolist())  # Python ints: 2.5x faster than numpy's
            self.shingles += len(h) - self.n + 1
        self.carry = h[-(self.n - 1):] if len(h) >= self.n - 1 else h

    def verdict(self, doc: int) -> Optional[dict]:
        if not self.shingles:
            if not len(self.carry):
                return None  # no words: nothing to compare (exact dedup still catches copies)
            self.m.update_batch(_shingle_hashes(self.carry, len(self.carry)).tolist())  # a short document: one shingle
        found = self.lsh.query(self.m)
        if found:
            return {"duplicate_of": min(found)}
        self.lsh.insert(doc, self.m, check_duplication=False)
        self.indexed += 1
        return None
