"""Fuzzing the parsers of user input: whatever comes in, only a UserError (exit 2 with a message)
may come out, never another exception (a traceback)."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scalelm.config import Config, apply_overrides, config_from_dict, load_toml, resolve, valid_keys  # noqa: E402
from scalelm.errors import UserError  # noqa: E402

# no example database: nothing is written into the working tree
FUZZ = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = valid_keys()

# values as a user might type them: numbers, words, the edge cases of float parsing, junk
values = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "true", "false", "None", "", "1e400", "0x10", "[1]", "{}", "auto",
                     "cosine", "rmsnorm", "bf16", "-1", "0"]),
    st.text(max_size=12),
)
keys = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=20),
                 st.builds(lambda a, b: f"{a}.{b}", st.sampled_from(["model", "optim", "train", "nope"]),
                           st.text(min_size=1, max_size=10)))


def override(key: str, value: str, form: int) -> list[str]:
    return [f"--{key}={value}"] if form == 0 else [f"--{key}", value] if form == 1 else [f"--{key}"]


@FUZZ
@given(st.lists(st.tuples(keys, values, st.integers(0, 2)), max_size=4))
def test_overrides_raise_only_config_errors(items):
    args = [a for k, v, form in items for a in override(k, v, form) if a not in ("--help", "-h")]
    try:
        apply_overrides(Config(), args)
        resolve(overrides=args)
    except UserError:
        pass
    except SystemExit as e:  # tyro's own exit on a request for help: only code 0 is allowed through
        assert e.code == 0


toml_values = st.one_of(st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                        st.text(max_size=10), st.lists(st.integers(), max_size=3))


def toml_literal(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(repr(v), repr(v))
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string is a JSON string (for these characters)
    if isinstance(v, list):
        return "[" + ", ".join(map(str, v)) + "]"
    return str(v)


@st.composite
def toml_texts(draw) -> str:
    if draw(st.booleans()):  # junk, often not TOML at all
        return draw(st.text(max_size=80))
    lines = []
    if draw(st.booleans()):
        lines.append(f"preset = {json.dumps(draw(st.sampled_from(['baby', 'gpt2-124m', 'nope', ''])))}")
    for _ in range(draw(st.integers(0, 3))):
        key = draw(st.one_of(st.sampled_from(KEYS), st.from_regex(r"[a-z_]{1,8}\.[a-z_]{1,8}", fullmatch=True)))
        section, name = key.split(".", 1)
        lines.append(f"[{section}]\n{name} = {toml_literal(draw(toml_values))}")
    return "\n".join(lines) + "\n"


@FUZZ
@given(toml_texts())
def test_toml_files_raise_only_config_errors(text):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.toml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_toml(p).validate()
        except UserError:
            pass


json_like = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                         lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                   max_size=3), max_leaves=8)


@FUZZ
@given(st.one_of(json_like, st.dictionaries(st.sampled_from(["model", "optim", "train", "data"]),
                                            st.dictionaries(st.sampled_from([k.split(".")[1] for k in KEYS]),
                                                            json_like, max_size=3), max_size=3)))
def test_config_dicts_raise_only_config_errors(data):
    try:
        config_from_dict(data).validate()
    except UserError:
        pass


# ----------------------------------------------------------------------------- data readers

def _prepare(name: str, content: bytes, tokenizer: str, **kw) -> None:
    from scalelm.data.prepare import prepare

    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / name
        src.write_bytes(content)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bad input is reported as warnings too; only errors matter here
            try:
                prepare(str(src), str(Path(d) / "out"), tokenizer=tokenizer, progress=False, block_size=8,
                        workers=1, **kw)
            except UserError:
                return
        assert (Path(d) / "out" / "meta.json").is_file()


tokenizers = st.sampled_from(["byte", "char"])


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(["c.txt", "c.jsonl", "c.json", "c.txt.gz", "c.bin"]), tokenizers,
       st.sampled_from(["replace", "skip", "error"]))
def test_prepare_random_bytes(content, name, tokenizer, on_invalid):
    _prepare(name, content, tokenizer, on_invalid_utf8=on_invalid)


jsonl_line = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=30)}, optional={"q": json_like, "a": st.text(max_size=9)}
                          ).map(json.dumps),  # good records, so that some corpora are not empty
    st.dictionaries(st.sampled_from(["text", "q", "a", "other"]), json_like, max_size=3).map(json.dumps),
    json_like.map(json.dumps),
    st.text(max_size=30),  # broken lines
)


@FUZZ
@given(st.lists(jsonl_line, max_size=8), tokenizers, st.sampled_from(["text", "q,a"]))
def test_prepare_random_jsonl(lines, tokenizer, field):
    _prepare("c.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"), tokenizer, text_field=field)


@FUZZ
@given(st.text(max_size=400), tokenizers, st.sampled_from(["eot", "blank", "line", "none", "##"]),
       st.floats(0.01, 0.99))
def test_prepare_random_text(text, tokenizer, doc_sep, val_fraction):
    _prepare("c.txt", text.encode("utf-8", "surrogatepass"), tokenizer, doc_sep=doc_sep, val_fraction=val_fraction)
