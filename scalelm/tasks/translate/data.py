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


# ----------------------------------------------------------------------------- JSONL records

def is_jsonl(path: str | Path) -> bool:
    """A ``.jsonl`` file holds one JSON object per line (a record with named fields); any other is
    one text per line."""
    return str(path).endswith(".jsonl")


def read_records(path: str | Path, fields: tuple[str, ...], what: str = "--data") -> list[tuple[str, dict]]:
    """``[(where, object), ...]`` of a JSONL file, each object checked to carry ``fields`` (strings).
    A blank line is no record."""
    import json

    from ...data.lines import read_text, split_lines

    out = []
    for n, line in enumerate(split_lines(read_text(path, what)), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TranslateDataError(f"{where}: not valid JSON ({e.msg}); JSONL holds one object per line") from None
        if not isinstance(obj, dict):
            raise TranslateDataError(f"{where}: expected a JSON object, got a {type(obj).__name__}")
        for f in fields:
            if not isinstance(obj.get(f), str):
                got = "no field" if f not in obj else f"a {type(obj[f]).__name__} in field"
                raise TranslateDataError(f"{where}: {got} {f!r} (the object has {sorted(obj)}); --source-field and "
                                         f"--target-field name the fields of the source and target texts")
        out.append((where, obj))
    return out


def read_jsonl_pairs(paths, source_field: str, target_field: str) -> list[tuple[str, tuple[str, str]]]:
    """:func:`read_pairs` of JSONL files: ``(source, target)`` from two fields of each record (the
    files concatenated in order); records with an empty side are skipped (and counted on stderr)."""
    recs = [r for p in ([paths] if isinstance(paths, (str, Path)) else paths)
            for r in read_records(p, (source_field, target_field), "training/validation file")]
    out = [(w, (o[source_field].strip(), o[target_field].strip())) for w, o in recs
           if o[source_field].strip() and o[target_field].strip()]
    if len(out) < len(recs):
        print(f"warning: {len(recs) - len(out)} of {len(recs)} records have an empty {source_field!r} or "
              f"{target_field!r} and are skipped", file=sys.stderr)
    if not out:
        raise TranslateDataError(f"{', '.join(map(str, [paths] if isinstance(paths, (str, Path)) else paths))} "
                                 f"hold no ({source_field}, {target_field}) pair")
    return out


def cut_source(tokenizer, text: str, n: int | None) -> tuple[str, bool]:
    """The first ``n`` tokens of ``text`` as text (cut at the end offset of token ``n``, so that it
    tokenizes as those tokens), and whether it was cut; ``n=None``: no limit."""
    if n is None:
        return text, False
    enc = tokenizer.encode(text, add_special_tokens=False)
    if len(enc.ids) <= n:
        return text, False
    return text[:enc.offsets[n - 1][1]], True
