"""The cleaning options of ``scalelm prepare``, checked before the corpus is read."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from ...errors import UserError
from .dedup import DEFAULT_THRESHOLD, check_threshold
from .quality import THRESHOLDS, parse_thresholds

DEDUP = ("exact", "minhash")


@dataclass
class CleanOptions:
    dedup: Optional[str] = None  # None, "exact" or "minhash"
    dedup_threshold: Optional[float] = None  # minhash's Jaccard threshold (default 0.8)
    scrub_pii: bool = False
    quality_filter: bool = False
    quality_thresholds: Optional[dict | list[str]] = None  # {name: value} or ["name=value", ...]
    decontaminate: Sequence[str] = field(default_factory=tuple)

    @property
    def active(self) -> bool:
        return bool(self.dedup or self.scrub_pii or self.quality_filter or self.decontaminate)

    def check(self) -> "CleanOptions":
        """Refuse what cannot work, naming the option; returns self."""
        if self.dedup is not None and self.dedup not in DEDUP:
            raise UserError(f"--dedup must be one of {', '.join(DEDUP)}, got {self.dedup!r}")
        if self.dedup_threshold is not None:
            if self.dedup != "minhash":
                raise UserError("--dedup-threshold applies to --dedup minhash only (exact dedup has no threshold)")
            check_threshold(self.dedup_threshold)
        if self.dedup == "minhash":
            try:
                import datasketch  # noqa: F401
            except ImportError:
                raise UserError("--dedup minhash needs datasketch: pip install 'scalelm[data]'") from None
        if self.quality_thresholds and not self.quality_filter:
            raise UserError("--quality-threshold sets a rule of --quality-filter: add --quality-filter")
        parse_thresholds(self.quality_thresholds)
        for f in self.decontaminate:
            if not Path(f).is_file():
                raise UserError(f"--decontaminate {f}: no such file" if not Path(f).exists() else
                                f"--decontaminate {f}: not a file (give the evaluation files themselves)")
        return self

    def describe(self) -> dict:
        """The options as meta.json records them."""
        d: dict = {}
        if self.decontaminate:
            d["decontaminate"] = [str(f) for f in self.decontaminate]
        if self.quality_filter:
            d["quality_thresholds"] = parse_thresholds(self.quality_thresholds)
        if self.dedup:
            d["dedup"] = self.dedup
            if self.dedup == "minhash":
                d["dedup_threshold"] = self.dedup_threshold or DEFAULT_THRESHOLD
        if self.scrub_pii:
            d["scrub_pii"] = True
        return d


def add_clean_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cleaning (in the scan pass; a report goes to clean_report.json beside meta.json)")
    g.add_argument("--dedup", choices=DEDUP, default=None,
                   help="drop repeated documents: exact (hash of the normalised text) or minhash (near-duplicates, "
                        "MinHash LSH; needs scalelm[data]); the first copy stays")
    g.add_argument("--dedup-threshold", type=float, default=None, metavar="J",
                   help=f"--dedup minhash: Jaccard similarity of word 5-grams above which a document is a "
                        f"near-duplicate ({DEFAULT_THRESHOLD})")
    g.add_argument("--scrub-pii", action="store_true",
                   help="replace e-mail addresses, phone numbers, public IP addresses and card numbers (Luhn-"
                        "checked) with <EMAIL_ADDRESS>, <PHONE_NUMBER>, <IP_ADDRESS>, <CREDIT_CARD>")
    g.add_argument("--quality-filter", action="store_true",
                   help="drop documents failing a Gopher quality or repetition rule (thresholds below)")
    names = ", ".join(f"{k}={v:g}" for k, v in THRESHOLDS.items())
    g.add_argument("--quality-threshold", action="append", default=None, metavar="NAME=VALUE",
                   help=f"set one rule's threshold, or NAME=off to skip it (repeat for several). The rules and "
                        f"Gopher's values: {names}")
    g.add_argument("--decontaminate", nargs="+", default=(), metavar="FILE",
                   help="drop documents sharing a 13-gram (case-folded words) with any of these evaluation files; "
                        "the report says which files were hit")


def options_from_args(args: argparse.Namespace) -> CleanOptions:
    return CleanOptions(dedup=args.dedup, dedup_threshold=args.dedup_threshold, scrub_pii=args.scrub_pii,
                        quality_filter=args.quality_filter, quality_thresholds=args.quality_threshold,
                        decontaminate=tuple(args.decontaminate or ()))

