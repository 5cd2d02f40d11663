"""Line-aligned parallel text (line i of the source file translates to line i of the target file).

Files are split into lines by :func:`scalelm.data.lines.read_lines`, as every line input is."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

from ...data.lines import read_lines
from ...errors import UserError


class TranslateDataError(UserError):
    """Parallel files that cannot be read as sentence pairs."""


def read_pairs(source: str | Path, target: str | Path) -> list[tuple[str, tuple[str, str]]]:
    """``[(where, (source, target)), ...]``; pairs with an empty side are skipped (and counted on stderr)."""
    src, tgt = read_lines(source, "source"), read_lines(target, "target")
    if len(src) != len(tgt):
        raise TranslateDataError(f"{source} has {len(src)} lines but {target} has {len(tgt)}: parallel files must "
                                 f"be line-aligned (line i of one translates line i of the other)")
    out = [(f"{source}:{i + 1}", (s.strip(), t.strip())) for i, (s, t) in enumerate(zip(src, tgt))
           if s.strip() and t.strip()]
    if len(out) < len(src):
        print(f"warning: {len(src) - len(out)} of {len(src)} pairs in {source} / {target} have an empty side and "
              f"are skipped", file=sys.stderr)
    if not out:
        raise TranslateDataError(f"{source} / {target} hold no sentence pair")
    return out


def corpus(*paths) -> Iterator[str]:
    for p in paths:
        yield from read_lines(p, "file")
