"""Corpus sources: every input becomes the same deterministic stream of text pieces.

A :class:`Source` (a file, a folder, the stdlib, a Hugging Face dataset on disk or on the Hub)
yields the pieces of :mod:`.readers`. Sources can be iterated several times (prepare reads the
corpus in up to three passes) and always yield the same pieces in the same order: files are
sorted, nothing is random.
"""

from __future__ import annotations

import random
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

from .readers import (
    BAD_GZIP,
    ON_INVALID,
    DataWarning,
    SourceError,
    Stats,
    bad_gzip,
    file_format,
    read_json_array,
    read_jsonl,
    read_parquet,
    read_text,
    rows_pieces,
    separator_regex,
    utf8_len,
)
from ..fileio import sha256_file

__all__ = ["DataWarning", "ON_INVALID", "STDLIB_MAX_BYTES", "Source", "SourceError", "Stats", "open_source",
           "stdlib_files", "stream", "utf8_len"]

STDLIB_MAX_BYTES = 8 << 20  # default cap of the stdlib corpus
STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ----------------------------------------------------------------------------- sources

class Source:
    kind = "?"
    size_hint = 0  # input bytes, for progress bars

    def pieces(self, stats: Stats) -> Iterator[tuple[str, bool]]:
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class FilesSource(Source):
    """One file, a folder of files, or the stdlib: read in sorted order, each by its format."""

    def __init__(self, kind: str, root: Path, files: list[Path], fields: list[str], doc_sep: Optional[str],
                 on_invalid: str, extra: Optional[dict] = None):
        self.kind, self.root, self.files = kind, root, files
        self.fields, self.doc_sep, self.on_invalid = fields, doc_sep, on_invalid
        self.extra = extra or {}
        self.size_hint = sum(p.stat().st_size for p in files)
        self._sha: dict[Path, str] = {}  # Parquet files are hashed once, not on every pass

    def _rel(self, p: Path) -> str:
        return p.name if p == self.root else p.relative_to(self.root).as_posix()

    def pieces(self, stats: Stats) -> Iterator[tuple[str, bool]]:
        sep = separator_regex(self.doc_sep)
        for p in self.files:
            rel, fmt = self._rel(p), file_format(p)
            try:
                if fmt == "text":
                    yield from read_text(p, rel, stats, sep, self.on_invalid)
                elif fmt == "jsonl":
                    yield from read_jsonl(p, rel, stats, self.fields, self.on_invalid)
                elif fmt == "json":
                    yield from read_json_array(p, rel, stats, self.fields, self.on_invalid)
                else:
                    if p not in self._sha:
                        self._sha[p] = sha256_file(p)
                    yield from read_parquet(p, rel, stats, self.fields, self._sha[p])
            except BAD_GZIP as e:
                if p.suffix != ".gz":
                    raise
                raise bad_gzip(rel, e) from None

    def describe(self) -> dict:
        d = {"type": self.kind, "path": str(self.root), "files": len(self.files), "input_bytes": self.size_hint}
        formats = {file_format(p) for p in self.files[:1000]}
        if self.doc_sep is not None and "text" in formats:
            d["doc_sep"] = self.doc_sep
        if formats - {"text"}:
            d["text_field"] = ",".join(self.fields)
        return {**d, **self.extra}


class DatasetSource(Source):
    """A Hugging Face ``datasets.Dataset`` (memory-mapped Arrow), read in column batches."""

    def __init__(self, kind: str, ds, name: str, split: str, fields: list[str]):
        missing = [f for f in fields if f not in ds.column_names]
        if missing:
            raise SourceError(f"{name} has no column {missing[0]!r} (it has: {', '.join(ds.column_names)}); "
                              f"choose the text with --text-field NAME")
        self.kind, self.ds, self.name, self.split, self.fields = kind, ds, name, split, fields
        self.cache_files = [Path(c["filename"]) for c in getattr(ds, "cache_files", []) or []]
        self.size_hint = sum(p.stat().st_size for p in self.cache_files if p.is_file())
        self._hashes: Optional[list[tuple[str, str]]] = None

    def pieces(self, stats: Stats) -> Iterator[tuple[str, bool]]:
        if self._hashes is None:  # the Arrow files, hashed once
            self._hashes = [(p.name, sha256_file(p)) for p in self.cache_files if p.is_file()]
        for rel, sha in self._hashes:
            stats.add_hash(rel, sha)
        cols = self.ds.select_columns(self.fields)
        yield from rows_pieces(cols.iter(batch_size=1000), self.fields, self.name, stats)

    def describe(self) -> dict:
        return {"type": self.kind, "path": self.name, "split": self.split, "rows": len(self.ds),
                "text_field": ",".join(self.fields), "fingerprint": getattr(self.ds, "_fingerprint", None)}


def stdlib_files(max_bytes: Optional[int] = STDLIB_MAX_BYTES) -> tuple[Path, list[Path]]:
    """The ``.py`` files of this Python's standard library, without tests and site-packages.
    Over ``max_bytes``, a fixed-seed sample of whole files (so the corpus covers all modules,
    not just the alphabetically first), in sorted order: the same files on every run."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise SourceError(f"the standard library was not found at {root}")
    files = sorted((p for p in root.rglob("*.py")
                    if not STDLIB_SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]) and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    if max_bytes is not None and sum(p.stat().st_size for p in files) > max_bytes:
        order = files[:]
        random.Random(0).shuffle(order)
        chosen, total = set(), 0
        for p in order:
            s = p.stat().st_size
            if total + s <= max_bytes:
                chosen.add(p)
                total += s
        files = [p for p in files if p in chosen]
    return root, files


def _is_saved_dataset(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or ((p / "state.json").is_file() and (p / "dataset_info.json").is_file())


def _load_from_disk(p: Path, split: str):
    try:
        import datasets
    except ImportError:
        raise SourceError(f"{p} is a Hugging Face dataset; reading it needs: pip install 'scalelm[hf]'") from None
    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:
        raise SourceError(f"could not load the dataset saved in {p}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split in ds:
            return ds[split], split
        if len(ds) == 1:
            return next(iter(ds.values())), next(iter(ds))
        raise SourceError(f"{p} has splits {', '.join(ds)} but no '{split}': choose one with --split NAME")
    return ds, split


def open_source(spec: str, *, text_field: str = "text", glob: Optional[str] = None, doc_sep: Optional[str] = "eot",
                split: str = "train", on_invalid: str = "replace", stdlib_max_bytes: Optional[int] = STDLIB_MAX_BYTES,
                exclude: Optional[Path] = None) -> Source:
    """Turn ``--input`` into a :class:`Source` (see README "Data" for what each form means)."""
    if on_invalid not in ON_INVALID:
        raise SourceError(f"--on-invalid-utf8 must be one of {', '.join(ON_INVALID)}, got {on_invalid!r}")
    fields = [f.strip() for f in text_field.split(",") if f.strip()]
    if not fields:
        raise SourceError("--text-field is empty")
    if spec == "stdlib":
        root, files = stdlib_files(stdlib_max_bytes)
        return FilesSource("stdlib", root, files, fields, None, on_invalid,
                           {"python": sys.version.split()[0], "max_bytes": stdlib_max_bytes})
    if spec.startswith("hf:"):
        from .hub import load_hub_dataset

        return DatasetSource("hf-hub", load_hub_dataset(spec[3:], split), spec, split, fields)
    p = Path(spec).expanduser().resolve()
    if not p.exists():
        raise SourceError(f"input not found: {spec} (expected a text, JSONL, JSON or Parquet file, a folder, "
                          f"a dataset saved with datasets' save_to_disk, hf:owner/name[:config], or stdlib)")
    if p.is_file():
        return FilesSource("file", p, [p], fields, doc_sep, on_invalid)
    if _is_saved_dataset(p):
        ds, split = _load_from_disk(p, split)
        return DatasetSource("hf-disk", ds, str(p), split, fields)
    pattern = glob or "**/*"
    ex = exclude.resolve() if exclude is not None else None
    files = sorted((f for f in p.glob(pattern) if f.is_file()
                    and not any(part.startswith(".") for part in f.relative_to(p).parts)
                    and not (ex is not None and (f == ex or ex in f.parents))),
                   key=lambda f: f.relative_to(p).as_posix())
    if not files:
        raise SourceError(f"no files match {pattern!r} in {p} (hidden files are skipped; set --glob)")
    return FilesSource("folder", p, files, fields, doc_sep, on_invalid, {"glob": pattern})


def stream(source: Source, stats: Stats, max_bytes: Optional[int] = None) -> Iterator[tuple[str, bool, int]]:
    """``(text, doc_end, utf8_bytes)`` of every piece, counting documents, bytes (and characters,
    when ``stats.chars`` is a set); stops after ``max_bytes`` bytes of text, ending that document."""
    total, doc_open = 0, False
    for text, end in source.pieces(stats):
        n = utf8_len(text)
        if max_bytes is not None and total + n > max_bytes:
            room = max_bytes - total
            text = text[:room] if text.isascii() else text.encode("utf-8")[:room].decode("utf-8", "ignore")
            n, end = utf8_len(text), True
            stats.truncated = True
        if text or end:
            if end and not (text or doc_open):
                break  # the cut left nothing of a new document
            total += n
            stats.bytes += n
            stats.documents += end
            doc_open = not end
            if stats.chars is not None:
                stats.chars.update(text)
            yield text, end, n
        if stats.truncated:
            break
