"""Cleaning inside ``prepare``'s passes: decided once, in the scan pass; applied in the others.

The scan pass feeds every piece of every document to the steps that are on, in this order:

1. ``--decontaminate``: drop a document sharing a 13-gram with an evaluation file;
2. ``--quality-filter``: drop a document failing a Gopher rule;
3. ``--dedup``: drop a document repeating an earlier *kept* one;
4. ``--scrub-pii``: replace PII in the documents kept.

A document's fate is known at its end; it is recorded as one bit (:class:`DocMask`). The tokenizer
and encode passes read the corpus again, skip the dropped documents and scrub the kept ones the
same way (scrubbing is a pure function of the piece), so no cleaned copy of the corpus is stored
and no pass is added. Filters see the text as read; PII is scrubbed last, as datatrove does.

Memory: one bit per document, one piece at a time, plus each step's own (see their modules): the
exact-dedup hashes, the MinHash LSH index, the evaluation 13-grams, and the quality filter's one
document of at most ``max_words`` words.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator, Optional

from ..readers import utf8_len
from . import report as rep
from .decontam import Decontaminator, EvalIndex
from .dedup import DEFAULT_THRESHOLD, ExactDedup, MinHashDedup
from .options import CleanOptions
from .pii import PLACEHOLDERS, scrub_counted
from .quality import QualityFilter, parse_thresholds
from .text import snippet, words


class DocMask:
    """One bit per document: kept or not (1.25 MB for ten million documents)."""

    def __init__(self):
        self.bits, self.n = bytearray(), 0

    def append(self, keep: bool) -> None:
        if self.n % 8 == 0:
            self.bits.append(0)
        if keep:
            self.bits[-1] |= 1 << (self.n % 8)
        self.n += 1

    def __getitem__(self, i: int) -> bool:
        return bool(self.bits[i >> 3] >> (i & 7) & 1)

    def __len__(self) -> int:
        return self.n


class Cleaner:
    """Build with checked options; :meth:`feed` the scan pass; then :meth:`apply` to the other passes."""

    def __init__(self, options: CleanOptions, collect_chars: bool = False):
        self.options = options
        self.filters: list = []
        self.logs: dict[str, rep.StepLog] = {}
        if options.decontaminate:
            self.index = EvalIndex(options.decontaminate)
            self._add(Decontaminator(self.index))
        if options.quality_filter:
            self.thresholds = parse_thresholds(options.quality_thresholds)
            self._add(QualityFilter(self.thresholds), thresholds=self.thresholds)
        if options.dedup == "exact":
            self._add(ExactDedup(), method="exact")
        elif options.dedup == "minhash":
            d = MinHashDedup(options.dedup_threshold or DEFAULT_THRESHOLD)
            self._add(d, method="minhash", threshold=d.threshold, num_perm=d.m.num_perm, shingle_words=d.n,
                      bands=d.bands[0], rows=d.bands[1])
        self.words = any(f.uses_words for f in self.filters)
        self.scrub = options.scrub_pii
        self.pii, self.pii_docs, self.pii_examples = Counter(), 0, []
        self.chars: Optional[set] = set() if collect_chars else None
        self.mask = DocMask()
        self.docs_in = self.bytes_in = self.docs_out = self.bytes_out = 0
        self._new_doc()

    def _add(self, step, **settings) -> None:
        step.uses_words = getattr(step, "uses_words", False)
        self.filters.append(step)
        self.logs[step.name] = rep.StepLog(step.name, **settings)

    def _new_doc(self) -> None:
        self.raw = self.clean = 0
        self.head: Optional[str] = None
        self.found: Counter = Counter()
        self.examples: list[dict] = []
        self.doc_chars: set = set()
        for f in self.filters:
            f.reset()

    # ------------------------------------------------------------------ the scan pass
    def feed(self, text: str, end: bool, nbytes: int) -> None:
        """One piece of the stream (``sources.stream``'s ``(text, doc_end, utf8_bytes)``)."""
        ws = words(text) if self.words else None
        for f in self.filters:
            f.feed(text, ws)
        self.raw += nbytes
        if self.scrub:
            clean, found = scrub_counted(text)
            if found:
                self.found += found
                if len(self.pii_examples) + len(self.examples) < rep.EXAMPLES:
                    self.examples += _contexts(clean, found, self.docs_in)
            self.clean += utf8_len(clean)
        else:
            clean = text
            self.clean += nbytes
        if self.head is None or len(self.head) < 200:
            self.head = (self.head or "") + clean[:200]
        if self.chars is not None:
            self.doc_chars.update(clean)
        if end:
            self._finish()

    def _finish(self) -> None:
        doc = self.docs_in
        why = None
        for f in self.filters:
            why = f.verdict(doc) if f.name == "dedup" else f.verdict()
            if why is not None:
                self.logs[f.name].removed(doc, self.raw, why, snippet(self.head or ""))
                break
        keep = why is None
        self.mask.append(keep)
        self.docs_in += 1
        self.bytes_in += self.raw
        if keep:
            self.docs_out += 1
            self.bytes_out += self.clean
            if self.found:
                self.pii += self.found
                self.pii_docs += 1
                self.pii_examples += self.examples[:rep.EXAMPLES - len(self.pii_examples)]
            if self.chars is not None:
                self.chars |= self.doc_chars
        self._new_doc()

    def finish(self) -> dict:
        """The report (after the scan pass)."""
        steps = []
        for f in self.filters:
            log = self.logs[f.name]
            if f.name == "decontaminate":
                steps.append(log.to_dict(ngram=self.index.n, files=f.summary()))
            elif f.name == "quality":
                steps.append(log.to_dict(by_rule=dict(sorted(f.removed.items()))))
            elif f.name == "dedup" and isinstance(f, MinHashDedup):
                steps.append(log.to_dict(indexed_documents=f.indexed))
            else:
                steps.append(log.to_dict())
        if self.scrub:
            steps.append({"step": "scrub_pii", "documents_changed": self.pii_docs,
                          "replaced": {k: self.pii[k] for k in PLACEHOLDERS}, "placeholders": PLACEHOLDERS,
                          "examples": self.pii_examples})
        return rep.build(self.docs_in, self.bytes_in, self.docs_out, self.bytes_out, steps)

    # ------------------------------------------------------------------ the other passes
    def apply(self, pieces: Iterator[tuple[str, bool, int]]) -> Iterator[tuple[str, bool, int]]:
        """The kept documents of the same stream, scrubbed: ``(text, doc_end, utf8_bytes)``."""
        doc, mask = 0, self.mask
        for text, end, n in pieces:
            if doc < len(mask) and mask[doc]:
                if self.scrub:
                    text = scrub_counted(text)[0]
                    n = utf8_len(text)
                yield text, end, n
            doc += end


def _contexts(text: str, found: Counter, doc: int, context: int = 40) -> list[dict]:
    """The text around the first placeholder of each kind found in a piece (never the value)."""
    out = []
    for kind in found:
        i = text.find(PLACEHOLDERS[kind])
        if i >= 0:
            a, b = max(0, i - context), i + len(PLACEHOLDERS[kind]) + context
            out.append({"document": doc, "kind": kind, "context": " ".join(text[a:b].split())})
    return out
