"""Line inputs: the one way every "one X per line" file or standard input is split into lines.

``scalelm translate --input``, ``eval --task translate --source/--reference``, ``classify --input``
(plain lines, and the lines of JSONL) and the SFT/classify JSONL readers all split here, so that
output ``i`` answers input line ``i`` whichever command it is and wherever the text came from.

A line ends at ``"\\n"`` only. ``str.splitlines()`` also ends lines at ``\\r``, ``\\v``, ``\\f``,
``\\x1c``-``\\x1e``, ``\\x85``, U+2028 and U+2029, characters that occur inside one sentence (a form
feed from a PDF, U+2028 inside a JSON string written with ``ensure_ascii=False``): four lines in
would give eight translations out, or a JSONL object cut in two. One ``"\\r"`` before the ``"\\n"``
is dropped (CRLF files), a final ``"\\n"`` ends the last line rather than starting an empty one,
and blank lines are kept: each is an input, answered by an empty output or its own record.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError

STDIN = "-"


class LineInputError(UserError):
    """A line input that cannot be read: missing, not a file, not UTF-8."""


def split_lines(text: str) -> list[str]:
    """``text`` as lines (see the module docstring); ``""`` is no line at all."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()  # the final newline ends the last line (and an empty text has none)
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def decode_utf8(data: bytes, where: str) -> str:
    """UTF-8 bytes as text (a byte-order mark dropped); a clear error naming the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise LineInputError(f"{where} is not UTF-8 (byte {e.start}): convert it, e.g. `iconv -f latin1 -t utf-8`") \
            from None


def read_text(path: str | Path, what: str = "--input") -> str:
    """The text of a UTF-8 file, or of standard input for ``"-"`` (read as bytes: a text-mode
    stdin would turn a lone ``\\r`` into a line end)."""
    if str(path) == STDIN:
        buf = getattr(sys.stdin, "buffer", None)
        if buf is None:  # a replaced sys.stdin (an io.StringIO): already text
            return sys.stdin.read()
        return decode_utf8(buf.read(), "standard input")
    p = Path(path)
    if not p.is_file():
        raise LineInputError(f"{what} {p} not found" if not p.exists() else f"{what} {p} is not a file")
    return decode_utf8(p.read_bytes(), str(p))


def read_lines(path: str | Path, what: str = "--input") -> list[str]:
    """The lines of a UTF-8 file, or of standard input for ``"-"``, split by :func:`split_lines`."""
    return split_lines(read_text(path, what))
