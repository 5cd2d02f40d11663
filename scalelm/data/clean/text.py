"""The normalisation the cleaning steps share: words for n-grams, and snippets for the report."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def _punctuation_to_space() -> dict:
    # every character of the Basic Multilingual Plane that is neither a letter, a digit, "_" nor a
    # space; built once (about 30 ms). str.translate + split is 3x faster than re.findall(r"\w+").
    return str.maketrans({c: " " for c in map(chr, range(0x10000))
                          if not (c.isalnum() or c == "_" or c.isspace()) and not 0xD800 <= ord(c) < 0xE000})


def words(text: str) -> list[str]:
    """Case-folded words: the text split at whitespace and punctuation (what ``\\w+`` finds, for
    the Basic Multilingual Plane). The words of MinHash shingles and of decontamination 13-grams:
    punctuation, case and line breaks do not count."""
    return text.casefold().translate(_punctuation_to_space()).split()


def snippet(text: str, chars: int = 160) -> str:
    """The start of a document for the report, on one line."""
    s = " ".join(text[: chars * 2].split())
    return s if len(s) <= chars else s[: chars - 3] + "..."
