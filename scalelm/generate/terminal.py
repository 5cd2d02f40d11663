"""Text bound for a terminal: control characters from a model or a tokenizer are shown, not obeyed.

A generated ESC/OSC sequence could retitle the window, rewrite the screen or, in some terminals,
write files; a CR or bidi override can hide text. When stdout is a terminal they are printed as
``\\x1b``-style escapes (newline and tab stay); pipes and files get the text unchanged, and
``--raw`` turns escaping off.
"""

from __future__ import annotations

import re
import sys

# C0 controls but \t and \n, DEL and C1, and the bidi/direction marks ("Trojan Source")
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def terminal_safe(text: str) -> str:
    return _UNSAFE.sub(_escape, text)


def for_stdout(raw: bool = False):
    """The function to pass text through before writing it to stdout."""
    try:
        tty = sys.stdout.isatty()
    except (AttributeError, ValueError):
        tty = False
    return terminal_safe if tty and not raw else (lambda s: s)
