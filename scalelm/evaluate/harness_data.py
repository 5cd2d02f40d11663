"""The files the local lm-eval tasks read (``--harness-data``), parsed in one place.

``tasks/utils.py`` builds the tasks' datasets with these functions inside lm-eval, and
:func:`check_local_data` runs them first, in scalelm, before any model is loaded: a file that is
not UTF-8 or holds nothing to score is one clear error instead of a traceback from inside
lm-eval, and SST lines that cannot be scored (no 0/1 label, or no sentence) are counted and
reported instead of dropped without a word.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .text import read_text

SST_TASK, TEXT_TASK = "scalelm_sst2", "scalelm_text_ppl"
SST_LABELS = {"0": 0, "1": 1}  # negative, positive


def _read(path: str | Path) -> str:
    return read_text(path, "--harness-data", advice="save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)")


@dataclass
class SST:
    rows: list[dict]  # {"sentence", "label"} of the lines that can be scored
    skipped: list[int] = field(default_factory=list)  # 1-based numbers of the non-blank lines that cannot


def read_sst(path: str | Path) -> SST:
    """SST format: ``<label> <sentence>`` per line, label 0 (negative) or 1 (positive); blank lines
    are ignored, any other line without a 0/1 label and a sentence is skipped and counted."""
    out = SST([])
    for n, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        label, _, sentence = line.strip().partition(" ")
        if label in SST_LABELS and sentence.strip():
            out.rows.append({"sentence": sentence, "label": SST_LABELS[label]})
        else:
            out.skipped.append(n)
    return out


def read_paragraphs(path: str | Path) -> list[str]:
    """One document per blank-line-separated paragraph of a UTF-8 text file."""
    return [d.strip("\n") for d in _read(path).split("\n\n") if d.strip()]


def check_local_data(tasks: list[str], path: str | Path) -> dict:
    """Read ``path`` as each local task in ``tasks`` will, refusing what cannot be scored; returns
    what goes into the output (the SST lines skipped) and warns about those on stderr."""
    report: dict = {}
    if SST_TASK in tasks:
        sst = read_sst(path)
        total = len(sst.rows) + len(sst.skipped)
        if not sst.rows:
            raise UserError(f"--harness-data {path}: none of its {total} lines is '<0|1> <sentence>' (the SST format "
                            f"{SST_TASK} reads): nothing to score")
        if sst.skipped:
            shown = ", ".join(map(str, sst.skipped[:5])) + (", ..." if len(sst.skipped) > 5 else "")
            print(f"warning: --harness-data {path}: {len(sst.skipped)} of {total} lines have no 0/1 label or no "
                  f"sentence and are not scored (lines {shown})", file=sys.stderr)
        report[SST_TASK] = {"examples": len(sst.rows), "skipped_lines": len(sst.skipped)}
    if TEXT_TASK in tasks:
        read_paragraphs(path)  # UTF-8 with some text (read_text refuses an empty or blank file)
    return report
