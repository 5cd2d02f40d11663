"""Documented outputs are the commands' outputs: every code block in docs/ that follows a
``<!-- output of: scalelm ... -->`` comment is checked line by line against that command run now
(``...`` stands for lines left out), so a printed figure in the docs cannot drift from the code."""

import re
import shlex
from pathlib import Path

import pytest

from scalelm.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs"
MARK = re.compile(r"<!-- output of: (scalelm [^>]*?) -->\s*```[a-z]*\n(.*?)```", re.S)


def documented():
    for page in sorted(DOCS.glob("*.md")):
        for m in MARK.finditer(page.read_text()):
            yield pytest.param(m.group(1), m.group(2), id=f"{page.name}: {m.group(1)}")


def norm(line: str) -> str:
    return " ".join(line.split())


@pytest.mark.parametrize("command, block", list(documented()))
def test_documented_output_matches_the_command(command, block, capsys):
    assert main(shlex.split(command)[1:]) == 0
    printed = {norm(ln) for ln in capsys.readouterr().out.splitlines()}
    stale = [ln for ln in block.splitlines() if ln.strip() and ln.strip() != "..." and norm(ln) not in printed]
    assert not stale, f"docs show lines `{command}` no longer prints:\n" + "\n".join(stale)


def test_there_are_documented_outputs_and_a_stale_one_is_caught(capsys):
    cases = list(documented())
    assert cases, "no <!-- output of: ... --> blocks in docs/"
    command, block = cases[0].values
    with pytest.raises(AssertionError, match="no longer prints"):
        test_documented_output_matches_the_command(command, block.replace("50.6 GiB", "58.0 GiB"), capsys)
