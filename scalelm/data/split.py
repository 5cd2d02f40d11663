"""Train/val split of a piece stream: by whole documents (seeded), or the corpus's tail.

``documents``: exactly ``k = max(1, round(n_docs * val_fraction))`` documents go to val, a
uniformly random set for the seed, chosen in one streaming pass with O(1) memory (Knuth's
selection sampling: document ``i`` is picked with probability (k - picked) / (n_docs - i)).

``tail`` (nanoGPT style, for a corpus of few documents, e.g. one book): the last
``val_fraction`` of the text's bytes, starting at the first line after the cut, is val.

``auto`` picks ``documents`` when that gives val at least one document out of two or more
(``n_docs * val_fraction >= 1``), else ``tail``.
"""

from __future__ import annotations

import random

from ..errors import UserError

MODES = ("auto", "documents", "tail")


class SplitPlan:
    def __init__(self, n_docs: int, n_bytes: int, val_fraction: float = 0.1, seed: int = 0, mode: str = "auto"):
        if not 0.0 < val_fraction < 1.0:
            raise UserError(f"--val-fraction must be between 0 and 1 (exclusive), got {val_fraction}")
        if mode not in MODES:
            raise UserError(f"--split-by must be one of {', '.join(MODES)}, got {mode!r}")
        if mode == "auto":
            mode = "documents" if n_docs >= 2 and n_docs * val_fraction >= 1 else "tail"
        if mode == "documents" and n_docs < 2:
            raise UserError(f"the corpus has {n_docs} document(s): it cannot be split by document; "
                            f"use --split-by tail (or auto)")
        if n_bytes < 2:
            raise UserError(f"the corpus has {n_bytes} byte(s) of text: too little to split into train and val")
        self.mode, self.n_docs, self.n_bytes = mode, n_docs, n_bytes
        self.val_fraction, self.seed = val_fraction, seed
        self.k = min(n_docs - 1, max(1, round(n_docs * val_fraction))) if mode == "documents" else 0
        self.cut = min(n_bytes - 1, max(1, round(n_bytes * (1.0 - val_fraction))))  # tail: bytes before go to train
        self.reset()

    def reset(self) -> None:
        """Start a new pass: the same stream gets the same assignment every time."""
        self._rng = random.Random(self.seed)
        self._doc, self._picked, self._current, self._pos = 0, 0, None, 0

    def describe(self) -> dict:
        d = {"by": self.mode, "val_fraction": self.val_fraction, "seed": self.seed}
        if self.mode == "documents":
            d["val_documents"] = self.k
        return d

    def assign(self, text: str, end: bool, nbytes: int) -> list[tuple[str, str, bool]]:
        """``[(split, text, doc_end), ...]`` for one piece (two items when the tail cut is inside it)."""
        out = self._by_documents(text, end) if self.mode == "documents" else self._by_tail(text, end, nbytes)
        self._pos += nbytes
        return out

    def _by_documents(self, text: str, end: bool) -> list[tuple[str, str, bool]]:
        if self._current is None:
            left = self.n_docs - self._doc
            val = left > 0 and self._rng.random() * left < self.k - self._picked
            self._picked += val
            self._current = "val" if val else "train"
        split = self._current
        if end:
            self._doc, self._current = self._doc + 1, None
        return [(split, text, end)]

    def _by_tail(self, text: str, end: bool, nbytes: int) -> list[tuple[str, str, bool]]:
        pos, cut = self._pos, self.cut
        if pos >= cut:
            return [("val", text, end)]
        if pos + nbytes <= cut:
            return [("train", text, end)]
        b = text.encode("utf-8")
        j = b.find(b"\n", cut - pos)
        last_piece = pos + nbytes >= self.n_bytes
        if j != -1 and j + 1 < len(b):
            j += 1  # val starts on the line after the cut
        elif not last_piece:
            return [("train", text, end)]  # no line start after the cut here: val starts with the next piece
        else:  # the corpus ends without another line: cut mid-line so val is not empty
            j = cut - pos
            while j > 0 and (b[j] & 0xC0) == 0x80:  # not inside a UTF-8 sequence
                j -= 1
        return [("train", b[:j].decode("utf-8"), False), ("val", b[j:].decode("utf-8"), end)]
