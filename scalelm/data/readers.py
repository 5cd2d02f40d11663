"""Reading raw inputs into text pieces: text files cut into documents, JSON lines, JSON
arrays, Parquet and dataset rows; bad input (binary files, invalid UTF-8, broken records) is
counted in :class:`Stats`, never silently dropped.

A reader yields ``(text, doc_end)`` pieces: a document is one or more pieces, the last with
``doc_end=True``. Long documents are cut into pieces of about ``PIECE_CHARS`` characters (at a
line end, see :func:`cut_point`), so memory stays bounded by the piece size whatever the file size.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError
from .tokenizer import EOT

PIECE_CHARS = 1 << 16  # characters per piece of a long document
READ_BYTES = 1 << 20  # bytes read from a file at a time
BINARY_PROBE = 1 << 16  # a NUL byte in a file's first 64 KiB marks it binary (as git and grep do)
DOC_SEPARATORS = {"eot": re.escape(EOT), "blank": r"\n(?:[ \t\r\f\v]*\n)+", "line": r"\r?\n", "none": None}
ON_INVALID = ("replace", "skip", "error")


class SourceError(UserError):
    """An input that cannot be read: missing, empty, unknown format, missing text field."""


class DataWarning(UserWarning):
    """Input that was read with a fix-up (skipped, replaced) or a DATA_DIR too small for some uses."""


# ----------------------------------------------------------------------------- bookkeeping

_BAD_UTF8 = [0]  # invalid sequences seen by the error handlers below (prepare is single-threaded)


def _count_and(replacement: str):
    def handler(err: UnicodeDecodeError):
        _BAD_UTF8[0] += 1
        return replacement, err.end
    return handler


codecs.register_error("scalelm-replace", _count_and("\ufffd"))
codecs.register_error("scalelm-skip", _count_and(""))
_HANDLERS = {"replace": "scalelm-replace", "skip": "scalelm-skip", "error": "strict"}


@dataclass
class Stats:
    """What a pass over a source saw; prepare turns the counts into warnings and meta.json."""
    documents: int = 0
    bytes: int = 0
    files: int = 0
    empty_documents: int = 0
    invalid_utf8: int = 0
    invalid_utf8_first: str = ""
    nul_bytes: int = 0
    crlf_lines: int = 0  # Windows line ends in text files, written as "\n"
    binary_files: list = field(default_factory=list)
    bad_records: int = 0
    bad_records_first: str = ""
    missing_text: int = 0
    missing_text_first: str = ""
    truncated: bool = False
    chars: Optional[set] = None  # the character set, collected only when asked for (char tokenizer)
    _hashes: list = field(default_factory=list)

    def add_hash(self, rel: str, sha: str) -> None:
        self._hashes.append((rel, sha))
        self.files += 1

    def inputs_sha256(self) -> str:
        """sha256 of the single input file, else of a ``sha256sum``-style manifest of the files."""
        if len(self._hashes) == 1:
            return self._hashes[0][1]
        return hashlib.sha256("".join(f"{sha}  {rel}\n" for rel, sha in self._hashes).encode()).hexdigest()

    def count_invalid(self, before: int, where: str) -> None:
        n = _BAD_UTF8[0] - before
        if n:
            self.invalid_utf8 += n
            self.invalid_utf8_first = self.invalid_utf8_first or where

    def bad_record(self, where: str) -> None:
        self.bad_records += 1
        self.bad_records_first = self.bad_records_first or where

    def to_dict(self) -> dict:
        return {"documents": self.documents, "bytes": self.bytes, "files": self.files,
                "empty_documents": self.empty_documents, "invalid_utf8": self.invalid_utf8,
                "nul_bytes": self.nul_bytes, "crlf_lines": self.crlf_lines, "binary_files_skipped": len(self.binary_files),
                "bad_records": self.bad_records, "missing_text": self.missing_text, "truncated": self.truncated}


def utf8_len(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8"))


# ----------------------------------------------------------------------------- pieces

def cut_point(s: str, limit: int) -> int:
    """Where to cut ``s`` within ``s[:limit]``: just before a newline that follows a letter or
    digit. Byte-level BPE pre-tokenizers (GPT-2's, Llama 3's) always have a token boundary
    there and look only forward, so encoding the pieces gives the same ids as the whole text."""
    i = first = s.rfind("\n", 0, limit)
    while i > limit // 2 and not s[i - 1].isalnum():
        i = s.rfind("\n", 0, i)
    if i > limit // 2:
        return i
    if first > 0:
        return first
    j = s.rfind(" ", 0, limit)
    return j if j > limit // 2 else limit


def separator_regex(doc_sep: Optional[str]) -> Optional[str]:
    """``eot``/``blank``/``line``/``none`` or a literal separator (backslash escapes allowed)."""
    if not doc_sep:
        return None
    if doc_sep in DOC_SEPARATORS:
        return DOC_SEPARATORS[doc_sep]
    return re.escape(doc_sep.encode("latin-1", "backslashreplace").decode("unicode_escape"))


class DocSplitter:
    """Cut a stream of text into documents (at a separator regex) and pieces (at line ends)."""

    def __init__(self, sep: Optional[str], stats: Stats):
        self.sep = re.compile(sep) if sep else None
        self.stats, self.buf = stats, ""
        self.doc_open = False  # a piece of the current document was emitted
        self.after_sep = False  # the current document follows a separator
        self.held = ""  # leading whitespace of a document not yet known to hold text

    def _emit(self, text: str, end: bool, at_sep: bool = False) -> Iterator[tuple[str, bool]]:
        # whitespace around a separator belongs to it; a file's own first and last bytes are kept
        if self.after_sep and not self.doc_open:
            text = text.lstrip()
        if at_sep:
            text = text.rstrip()
        if not self.doc_open:
            text, self.held = self.held + text, ""
            if text.isspace() and not end and len(text) < PIECE_CHARS:
                self.held = text  # a whitespace-only document is an empty one: wait and see
                return
        if end:
            self.after_sep = at_sep
            if self.doc_open or (text and not text.isspace()):
                yield text, True
            else:
                self.stats.empty_documents += 1
            self.doc_open = False
        elif text:
            self.doc_open = True
            yield text, False

    def feed(self, text: str, final: bool = False) -> Iterator[tuple[str, bool]]:
        buf, pos, pending = self.buf + text, 0, len(self.buf) + len(text)
        while self.sep is not None:
            m = self.sep.search(buf, pos)
            if m is None:
                break
            if m.end() >= len(buf) and not final:  # a separator at the very end may grow
                pending = m.start()
                break
            yield from self._emit(buf[pos:m.start()], True, at_sep=True)
            pos = m.end()
        rest, pending = buf[pos:], pending - pos
        margin = 256 if self.sep is not None else 0  # keep room for a separator cut in half
        while len(rest) > PIECE_CHARS + margin:
            cut = cut_point(rest, min(PIECE_CHARS, pending, len(rest) - margin))
            if cut <= 0:
                break
            yield from self._emit(rest[:cut], False)
            rest, pending = rest[cut:], pending - cut
        if final:
            if rest or self.doc_open:
                yield from self._emit(rest, True)
            rest = ""
        self.buf = rest


def record_pieces(text: str, stats: Stats) -> Iterator[tuple[str, bool]]:
    """One record (JSONL line, Parquet row, dataset row) is one document."""
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from JSON escapes: make them visible, count them
            before = _BAD_UTF8[0]
            text = text.encode("utf-8", "surrogatepass").decode("utf-8", "scalelm-replace")
            stats.count_invalid(before, "a record")
    if not text.strip():
        stats.empty_documents += 1
        return
    while len(text) > PIECE_CHARS:
        cut = cut_point(text, PIECE_CHARS)
        yield text[:cut], False
        text = text[cut:]
    yield text, True


def record_text(rec, fields: list[str], where: str, stats: Stats, first: bool) -> Optional[str]:
    """The text of a record: its ``fields`` joined by newlines. A missing field is an error on
    the first record (probably a wrong --text-field) and a counted skip after that."""
    if not isinstance(rec, dict):
        if first:
            raise SourceError(f"{where}: records must be JSON objects with a text field, got {type(rec).__name__}")
        stats.bad_record(where)
        return None
    parts = []
    for f in fields:
        v = rec.get(f)
        if isinstance(v, str):
            parts.append(v)
        elif first:
            have = ", ".join(sorted(map(str, rec))) or "no fields"
            problem = "has no field" if v is None else f"has a {type(v).__name__}, not text, in field"
            raise SourceError(f"{where}: the record {problem} '{f}' (it has: {have}); "
                              f"choose the text with --text-field NAME (or NAME1,NAME2 to join several)")
        else:
            stats.missing_text += 1
            stats.missing_text_first = stats.missing_text_first or where
            return None
    return "\n".join(p for p in parts if p)  # an empty field (Alpaca's blank input) adds no blank line


# ----------------------------------------------------------------------------- file readers

def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


BAD_GZIP = (EOFError, gzip.BadGzipFile, zlib.error)  # what gzip raises on a truncated or foreign file


def bad_gzip(rel: str, e: Exception) -> SourceError:
    return SourceError(f"{rel} is not a readable gzip file ({e}): it is truncated or not gzip at all; "
                       f"download or compress it again (or drop the .gz suffix if it is plain text)")


def file_format(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    suffix = Path(name).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":  # many .json files are really JSON lines: look at the first character
        try:
            with _open(path) as f:
                head = f.read(4096).lstrip()
        except BAD_GZIP as e:
            raise bad_gzip(path.name, e) from None
        return "json" if head.startswith(b"[") else "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _is_binary(head: bytes, rel: str, stats: Stats) -> bool:
    if b"\0" in head[:BINARY_PROBE]:
        stats.binary_files.append(rel)
        return True
    return False


def _lf(text: str, stats: Stats, final: bool = False) -> tuple[str, str]:
    """``text`` with its Windows line ends ("\\r\\n") as "\\n", and a trailing "\\r" held back for the next
    chunk (its "\\n" may start it). Novels saved on Windows would otherwise teach the tokenizer and the
    model to write "\\r\\n", and a document separator of blank lines would not see "\\r\\n\\r\\n" as one
    in every splitter. A lone "\\r" (not before "\\n") is kept: it is not a line end here."""
    held = ""
    if not final and text.endswith("\r"):
        text, held = text[:-1], "\r"
    n = text.count("\r\n")
    if n:
        stats.crlf_lines += n
        text = text.replace("\r\n", "\n")
    return text, held


def read_text(path: Path, rel: str, stats: Stats, sep: Optional[str], on_invalid: str) -> Iterator[tuple[str, bool]]:
    h = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8-sig")(errors=_HANDLERS[on_invalid])
    splitter, offset, held = DocSplitter(sep, stats), 0, ""
    with _open(path) as f:
        chunk = f.read(READ_BYTES)
        if _is_binary(chunk, rel, stats):
            return
        try:
            while chunk:
                h.update(chunk)
                if b"\0" in chunk:  # a stray NUL in a text file: drop it, count it
                    stats.nul_bytes += chunk.count(b"\0")
                    chunk = chunk.replace(b"\0", b"")
                before = _BAD_UTF8[0]
                try:
                    text = decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    raise SourceError(f"{rel}: invalid UTF-8 near byte {offset + e.start} (use "
                                      f"--on-invalid-utf8 replace or skip to read it anyway)") from None
                stats.count_invalid(before, rel)
                text, held = _lf(held + text, stats)
                yield from splitter.feed(text)
                offset += len(chunk)
                chunk = f.read(READ_BYTES)
            before = _BAD_UTF8[0]
            try:  # a character cut off at the end of the file
                tail = decoder.decode(b"", final=True)
            except UnicodeDecodeError:
                raise SourceError(f"{rel}: invalid UTF-8 at the end of the file, byte {offset - 1} (use "
                                  f"--on-invalid-utf8 replace or skip to read it anyway)") from None
            stats.count_invalid(before, rel)
            tail, _ = _lf(held + tail, stats, final=True)
            yield from splitter.feed(tail, final=True)
        finally:  # also when the consumer stops early (--max-bytes): hash what was read
            stats.add_hash(rel, h.hexdigest())


def read_jsonl(path: Path, rel: str, stats: Stats, fields: list[str], on_invalid: str) -> Iterator[tuple[str, bool]]:
    h, first = hashlib.sha256(), True
    with _open(path) as f:
        if _is_binary(f.read(BINARY_PROBE), rel, stats):
            return
        f.seek(0)
        try:
            for lineno, raw in enumerate(f, 1):
                h.update(raw)
                before = _BAD_UTF8[0]
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8", _HANDLERS[on_invalid])
                except UnicodeDecodeError as e:
                    raise SourceError(f"{rel}:{lineno}: invalid UTF-8 at column {e.start} (use "
                                      f"--on-invalid-utf8 replace or skip to read it anyway)") from None
                stats.count_invalid(before, f"{rel}:{lineno}")
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    stats.bad_record(f"{rel}:{lineno}")
                    continue
                text = record_text(rec, fields, f"{rel}:{lineno}", stats, first)
                first = False
                if text is not None:
                    yield from record_pieces(text, stats)
        finally:
            stats.add_hash(rel, h.hexdigest())


def read_json_array(path: Path, rel: str, stats: Stats, fields: list[str], on_invalid: str) -> Iterator[tuple[str, bool]]:
    """A JSON file holding one array of records (e.g. Alpaca). Parsed whole: use JSONL for big data."""
    with _open(path) as f:
        raw = f.read()
    stats.add_hash(rel, hashlib.sha256(raw).hexdigest())
    before = _BAD_UTF8[0]
    try:
        records = json.loads(raw.decode("utf-8-sig", _HANDLERS[on_invalid]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SourceError(f"{rel} is not valid JSON: {e}") from None
    stats.count_invalid(before, rel)
    if not isinstance(records, list):
        raise SourceError(f"{rel} holds a JSON {type(records).__name__}; expected an array of records "
                          f"(or one JSON object per line, .jsonl)")
    for i, rec in enumerate(records):
        text = record_text(rec, fields, f"{rel}[{i}]", stats, i == 0)
        if text is not None:
            yield from record_pieces(text, stats)


def read_parquet(path: Path, rel: str, stats: Stats, fields: list[str], sha: str) -> Iterator[tuple[str, bool]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError("reading Parquet needs pyarrow: pip install 'scalelm[hf]'") from None
    stats.add_hash(rel, sha)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise SourceError(f"{rel} is not a readable Parquet file: {e}") from None
    names = pf.schema_arrow.names
    missing = [f for f in fields if f not in names]
    if missing:
        raise SourceError(f"{rel} has no column {missing[0]!r} (it has: {', '.join(names)}); "
                          f"choose the text with --text-field NAME")
    yield from rows_pieces((b.to_pydict() for b in pf.iter_batches(batch_size=1024, columns=fields)),
                           fields, rel, stats)


def rows_pieces(batches, fields: list[str], where: str, stats: Stats) -> Iterator[tuple[str, bool]]:
    """Column batches (dicts of lists) -> pieces; a null or non-text cell is a counted skip."""
    row = 0
    for batch in batches:
        for values in zip(*(batch[f] for f in fields)):
            row += 1
            if not all(isinstance(v, str) for v in values):
                stats.missing_text += 1
                stats.missing_text_first = stats.missing_text_first or f"{where} row {row}"
                continue
            yield from record_pieces("\n".join(v for v in values if v), stats)
