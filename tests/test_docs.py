"""The docs a reader finds: README.md stays a short front page and docs/ holds one page per stage.

What is checked, against the code rather than against a copy of it:
- docs/architecture.md's module map names every module of the package exactly once, and nothing else;
- docs/configuration.md documents every section of ``scalelm.config.Config`` and every key of each;
- README.md is at most 300 lines and opens with the two ``./dev`` commands;
- every relative link in README.md and docs/*.md reaches a file, and every ``#anchor`` a heading;
- every path of the repository the docs name in code (`scalelm/train/auto.py`, `tests/...`) exists;
- docs/ has the stage pages the README's feature table points to;
- the layering rule as README.md and docs/architecture.md spell it is pyproject.toml's contract.
Nothing here trains or imports torch: it runs in well under a second.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

from scalelm.config import Config

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "scalelm"
DOCS = ROOT / "docs"
README = ROOT / "README.md"

STAGE_PAGES = ["data.md", "training.md", "finetuning.md", "compression.md", "generation.md", "serving.md",
               "evaluation.md", "scaling-out.md", "scaling-laws.md", "performance.md", "interop.md",
               "architecture.md", "configuration.md"]
README_MAX_LINES = 300
FIRST_COMMANDS = ["./dev demo", "./dev test"]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_MAP_ROW = re.compile(r"^\|\s*`([^`]+)`\s*\|")
# a path in the repository named in prose or code: scalelm/..., tests/..., scripts/..., benchmarks/...
_REPO_PATH = re.compile(r"(?<![\w./-])(?:\.\./)?((?:scalelm|tests|scripts|benchmarks)/[\w./-]*\w)")


# ----------------------------------------------------------------------------- markdown helpers

def prose_lines(text: str) -> list[str]:
    """The lines of a Markdown text with fenced code blanked, so a `# comment` in a shell block is no heading
    and a `[x](y)` in code is no link (line numbers are kept)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            out.append("")
        else:
            out.append("" if fenced else line)
    return out


def headings(text: str) -> list[tuple[int, str]]:
    return [(len(m.group(1)), m.group(2)) for m in map(_HEADING.match, prose_lines(text)) if m]


def slug(title: str) -> str:
    """GitHub's anchor for a heading: link text kept, lowercase, punctuation (backticks too) dropped, spaces to -."""
    t = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", title).strip().lower()
    return re.sub(r"[^\w\- ]", "", t).replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in headings(text):
        s = slug(title)
        n = seen.get(s, 0)
        seen[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")  # GitHub numbers repeated headings: x, x-1, x-2
    return out


def section(text: str, match) -> str:
    """The text under the first heading whose title satisfies ``match``, up to the next heading of its level
    or above ("" when there is none)."""
    lines, prose = text.splitlines(), prose_lines(text)
    start = level = None
    for i, line in enumerate(prose):
        m = _HEADING.match(line)
        if not m:
            continue
        if start is None:
            if match(m.group(2)):
                start, level = i + 1, len(m.group(1))
        elif len(m.group(1)) <= level:
            return "\n".join(lines[start:i])
    return "" if start is None else "\n".join(lines[start:])


def broken_links(page: Path) -> list[str]:
    """Relative links of ``page`` whose file does not exist, or whose #anchor is no heading there."""
    bad = []
    for n, line in enumerate(prose_lines(page.read_text(encoding="utf-8")), 1):
        for target in _LINK.findall(_CODE_SPAN.sub("code", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: ...
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT) if page.is_relative_to(ROOT) else page.name}:{n}: ({target})"
            if not dest.exists():
                bad.append(f"{where} no such file")
            elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest.read_text(encoding="utf-8"))):
                bad.append(f"{where} no heading #{anchor} in {dest.name}")
    return bad


def missing_paths(page: Path) -> list[str]:
    """Repository paths a page names that do not exist. What benchmarks write (benchmarks/results/...) is
    output, not source, and a name cut short (`quality_*.json`) is a pattern: both are left alone."""
    bad = []
    for n, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        for m in _REPO_PATH.finditer(line):
            path = m.group(1)
            if path.startswith("benchmarks/results/") or line[m.end():m.end() + 1] == "*":
                continue
            if not (ROOT / path).exists():
                bad.append(f"{page.name}:{n}: {path}")
    return bad


def module_map(text: str) -> list[str]:
    """The modules docs/architecture.md's "Module map" names: one table row each, `path/under/scalelm.py` first."""
    return [m.group(1) for line in section(text, lambda t: t.strip() == "Module map").splitlines()
            if (m := _MAP_ROW.match(line)) and m.group(1).endswith(".py")]


def package_modules() -> list[str]:
    return sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                  if p.name != "__init__.py" and "__pycache__" not in p.parts)


def map_problems(listed: list[str], actual: list[str]) -> list[str]:
    out = [f"{m}: listed {listed.count(m)} times" for m in sorted(set(listed)) if listed.count(m) > 1]
    out += [f"{m}: missing; add the row  | `{m}` | what it holds |  to its package's table"
            for m in sorted(set(actual) - set(listed))]
    out += [f"{m}: listed but there is no scalelm/{m}" for m in sorted(set(listed) - set(actual))]
    return out


def config_problems(text: str) -> list[str]:
    """Sections of Config without a heading naming them in backticks, and keys not mentioned under theirs."""
    out = []
    for f in dataclasses.fields(Config):
        body = section(text, lambda t, name=f.name: f"`{name}`" in t)
        if not body:
            out.append(f"section `{f.name}`: no heading naming it (e.g. ### `{f.name}`)")
            continue
        for key in dataclasses.fields(type(getattr(Config(), f.name))):
            if f"`{key.name}`" not in body:
                out.append(f"{f.name}.{key.name}: not described under its section's heading")
    return out


def first_fenced_block(text: str) -> tuple[int, list[str]]:
    """(line number of the opening fence, the block's lines) of a Markdown text's first fenced block."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if _FENCE.match(line))
    end = next(i for i in range(start + 1, len(lines)) if _FENCE.match(lines[i]))
    return start + 1, lines[start + 1:end]


def layer_chain(pyproject_text: str) -> str:
    """The layers contract of pyproject.toml as the docs write it: `cli` > `demo` > ... (siblings joined by |)."""
    contracts = tomllib.loads(pyproject_text)["tool"]["importlinter"]["contracts"]
    layers = next(c["layers"] for c in contracts if c["type"] == "layers")
    return " > ".join(" | ".join(f"`{m.strip()}`" for m in layer.split("|")) for layer in layers)


def squash(text: str) -> str:
    return " ".join(text.split())


def doc_pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


# ----------------------------------------------------------------------------- the checks

def test_module_map_lists_every_module_exactly_once():
    listed = module_map((DOCS / "architecture.md").read_text(encoding="utf-8"))
    problems = map_problems(listed, package_modules())
    assert not problems, "docs/architecture.md's module map is out of date:\n" + "\n".join(problems)


def test_configuration_documents_every_section_and_key():
    problems = config_problems((DOCS / "configuration.md").read_text(encoding="utf-8"))
    assert not problems, "docs/configuration.md is missing:\n" + "\n".join(problems)


def test_readme_is_a_short_front_page_that_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES, (
        f"README.md has {len(text.splitlines())} lines (at most {README_MAX_LINES}): move detail to docs/")
    line, block = first_fenced_block(text)
    commands = [b.split("#")[0].strip() for b in block if b.strip()]
    assert commands == FIRST_COMMANDS, f"README.md's first code block must be {FIRST_COMMANDS}, got {commands}"
    assert line <= 25, f"the two ./dev commands start on line {line}: keep them on the first screen"


def test_every_relative_link_reaches_a_file_and_heading():
    bad = [b for page in doc_pages() for b in broken_links(page)]
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_every_repository_path_the_docs_name_exists():
    bad = [b for page in doc_pages() for b in missing_paths(page)]
    assert not bad, "the docs name files that are not there (moved or renamed?):\n" + "\n".join(bad)


def test_docs_has_the_stage_pages_and_the_readme_links_each():
    missing = [p for p in STAGE_PAGES if not (DOCS / p).is_file()]
    assert not missing, f"docs/ lacks {missing}"
    untitled = [p for p in STAGE_PAGES if not (DOCS / p).read_text(encoding="utf-8").startswith("# ")]
    assert not untitled, f"these pages do not open with a '# Title' line: {untitled}"
    readme = README.read_text(encoding="utf-8")
    unlinked = [p for p in STAGE_PAGES if f"(docs/{p})" not in readme and f"(docs/{p}#" not in readme]
    assert not unlinked, f"README.md does not link {unlinked}"


def test_the_layering_rule_is_the_one_import_linter_checks():
    chain = layer_chain((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    stale = [p.name for p in (README, DOCS / "architecture.md") if chain not in squash(p.read_text(encoding="utf-8"))]
    assert not stale, f"{stale} must state the layers of pyproject.toml, top to bottom, as:\n{chain}"


# ----------------------------------------------------------------------------- the checks can fail

def test_the_map_check_finds_duplicates_missing_and_stale_rows():
    md = ("# T\n\n## Module map\n\n| module | what |\n|---|---|\n| `a.py` | x |\n| `a.py` | x |\n"
          "| `gone.py` | y |\n\n## Next\n\n| `b.py` | a table outside the map |\n")
    assert module_map(md) == ["a.py", "a.py", "gone.py"]
    assert [p.split(";")[0] for p in map_problems(module_map(md), ["a.py", "b.py"])] == [
        "a.py: listed 2 times", "b.py: missing", "gone.py: listed but there is no scalelm/gone.py"]


def test_the_config_check_finds_a_missing_key_and_section():
    sections = {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}
    full = "".join(f"### `{s}`\n\n" + " ".join(f"`{k.name}`" for k in dataclasses.fields(cls)) + "\n\n"
                   for s, cls in sections.items())
    assert config_problems(full) == []
    assert config_problems(full.replace("`lr`", "lr")) == ["optim.lr: not described under its section's heading"]
    assert config_problems(full.replace("### `kd`", "### kd"))[0].startswith("section `kd`: no heading")


def test_the_link_check_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "a.md").write_text(
        "# A page: `x`\n\n## Same\n\n## Same\n\n```bash\n# not a heading\n[x](missing.md)\n```\n"
        "[ok](b.md) [ok](#a-page-x) [ok](#same-1) [web](https://example.com) `[code](nowhere.md)`\n"
        "[bad](nowhere.md) [bad](#not-a-heading) [bad](b.md#gone)\n")
    (tmp_path / "b.md").write_text("# B\n")
    assert [b.split(": ", 1)[1] for b in broken_links(tmp_path / "a.md")] == [
        "(nowhere.md) no such file", "(#not-a-heading) no heading #not-a-heading in a.md",
        "(b.md#gone) no heading #gone in b.md"]
    assert slug("A budget recipe: `--preset auto`") == "a-budget-recipe---preset-auto"


def test_the_readme_layer_and_path_checks_can_fail(tmp_path):
    assert first_fenced_block("x\n```bash\n./dev demo  # c\n```\n") == (2, ["./dev demo  # c"])
    toml = '[[tool.importlinter.contracts]]\ntype = "layers"\nlayers = ["cli", "a | b", "errors"]\n'
    assert layer_chain(toml) == "`cli` > `a` | `b` > `errors`"
    assert layer_chain(toml) in squash("rule: `cli` >\n`a` | `b` > `errors` (siblings)")
    assert layer_chain(toml) not in squash("rule: `cli` > `a` > `errors`")
    (tmp_path / "c.md").write_text("`scalelm/config.py` (../tests/test_docs.py) `scalelm/nope.py` "
                                   "benchmarks/results/new.json `benchmarks/results/quality_*.json` x/scalelm/y.py\n")
    assert missing_paths(tmp_path / "c.md") == ["c.md:1: scalelm/nope.py"]
