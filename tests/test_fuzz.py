"""Fuzzing the parsers of user input: whatever comes in, only a UserError (exit 2 with a message)
may come out, never another exception (a traceback).

Refusing everything would pass that alone, so every fuzz test also draws a valid input of the
same kind (valid settings, a well-formed corpus) and checks that it is accepted with the right
result: the settings it names, the documents it holds.
"""

from __future__ import annotations

import gzip
import json
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from scalelm.config import Config, apply_overrides, config_from_dict, load_toml, resolve, valid_keys  # noqa: E402
from scalelm.errors import UserError  # noqa: E402
from scalelm.presets import PRESETS  # noqa: E402

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

# ----------------------------------------------------------------------------- valid settings

# settings each valid whatever the others are (no n_head/n_embd pairs), one per kind of field:
# int, float, Literal, bool, Optional[bool] (None is `auto`), str
VALID = {
    "model.n_layer": st.integers(1, 96),
    "model.block_size": st.integers(1, 2**16),
    "model.vocab_size": st.integers(1, 2**20),
    "model.dropout": st.floats(0.0, 0.99),
    "model.norm": st.sampled_from(["layernorm", "rmsnorm"]),
    "model.bias": st.booleans(),
    "train.max_steps": st.integers(1, 10**9),
    "train.precision": st.sampled_from(["auto", "fp32", "bf16", "fp16"]),
    "train.master_weights": st.sampled_from([None, True, False]),
    "train.device": st.sampled_from(["auto", "cpu", "cuda:1"]),
    "optim.lr": st.floats(1e-8, 10.0),
    "optim.beta2": st.floats(0.0, 0.999),
    "optim.warmup_steps": st.integers(0, 10**6),
    "optim.schedule": st.sampled_from(["cosine", "wsd", "constant"]),
    "log.progress": st.booleans(),
    "log.wandb": st.booleans(),
    "log.mlflow_tracking_uri": st.sampled_from(["", "file:./mlruns", "http://127.0.0.1:5000"]),
    "checkpoint.resume": st.sampled_from(["auto", "never"]),
    "lora.targets": st.sampled_from(["q,v", "all", "attn"]),
    "kd.temperature": st.floats(0.1, 10.0),
}


@st.composite
def valid_settings(draw) -> dict:
    """``{"section.key": value}``: one to four settings from VALID."""
    names = draw(st.lists(st.sampled_from(sorted(VALID)), min_size=1, max_size=4, unique=True))
    return {k: draw(VALID[k]) for k in names}


def expected_config(setting: dict, preset: Optional[str] = None) -> dict:
    """Config().to_dict() with the preset's and then the settings' values in place: what the parsers
    must produce (built without them)."""
    want = Config().to_dict()
    for section, kv in (PRESETS[preset] if preset else {}).items():
        want[section].update(kv)
    for key, v in setting.items():
        section, name = key.split(".")
        want[section][name] = v
    return want


def cli_word(v, bool_word: str) -> str:
    if v is None:
        return "auto"  # an Optional[bool]'s None
    if isinstance(v, bool):
        return {"lower": str(v).lower(), "title": str(v), "yes": "yes" if v else "no"}[bool_word]
    return repr(v) if isinstance(v, float) else str(v)


@st.composite
def valid_overrides(draw) -> tuple[list[str], dict]:
    setting = draw(valid_settings())
    args = [a for k, v in setting.items()
            for a in override(k, cli_word(v, draw(st.sampled_from(["lower", "title", "yes"]))),
                              draw(st.integers(0, 1)))]
    return args, expected_config(setting)


def override(key: str, value: str, form: int) -> list[str]:
    return [f"--{key}={value}"] if form == 0 else [f"--{key}", value] if form == 1 else [f"--{key}"]


@FUZZ
@given(st.lists(st.tuples(keys, values, st.integers(0, 2)), max_size=4), valid_overrides())
def test_overrides_raise_only_config_errors(items, good):
    args = [a for k, v, form in items for a in override(k, v, form) if a not in ("--help", "-h")]
    try:
        apply_overrides(Config(), args)
        resolve(overrides=args)
    except UserError:
        pass
    except SystemExit as e:  # tyro's own exit on a request for help: only code 0 is allowed through
        assert e.code == 0
    args, want = good  # resolve = apply_overrides + validate (one tyro parse: ~0.3 s)
    assert resolve(overrides=args).to_dict() == want, args


toml_values = st.one_of(st.integers(-10**9, 10**9), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                        st.text(max_size=10), st.lists(st.integers(), max_size=3))


def toml_literal(v) -> str:
    if v is None:
        return '"auto"'  # TOML has no null: `auto` is an Optional[bool]'s None
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


@st.composite
def valid_toml(draw) -> tuple[str, dict]:
    """A config file of valid settings, one table per section, maybe over a preset."""
    setting, preset = draw(valid_settings()), draw(st.one_of(st.none(), st.sampled_from(sorted(PRESETS))))
    tables: dict[str, list[str]] = {}
    for key, v in setting.items():
        section, name = key.split(".")
        tables.setdefault(section, []).append(f"{name} = {toml_literal(v)}")
    lines = [f"preset = {json.dumps(preset)}"] if preset else []
    lines += [f"[{s}]\n" + "\n".join(kv) for s, kv in tables.items()]
    return "\n".join(lines) + "\n", expected_config(setting, preset)


@FUZZ
@given(toml_texts(), valid_toml())
def test_toml_files_raise_only_config_errors(text, good):
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "c.toml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_toml(p).validate()
        except UserError:
            pass
        text, want = good
        p.write_text(text, encoding="utf-8")
        assert load_toml(p).validate().to_dict() == want, text


json_like = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                         lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids,
                                                                                   max_size=3), max_leaves=8)


def nested(setting: dict) -> dict:
    out: dict[str, dict] = {}
    for key, v in setting.items():
        section, name = key.split(".")
        out.setdefault(section, {})[name] = v
    return out


@FUZZ
@given(st.one_of(json_like, st.dictionaries(st.sampled_from(["model", "optim", "train", "data"]),
                                            st.dictionaries(st.sampled_from([k.split(".")[1] for k in KEYS]),
                                                            json_like, max_size=3), max_size=3)),
       valid_settings())
def test_config_dicts_raise_only_config_errors(data, good):
    try:
        config_from_dict(data).validate()
    except UserError:
        pass
    assert config_from_dict(nested(good)).validate().to_dict() == expected_config(good), good


# ----------------------------------------------------------------------------- data readers

def _prepare(name: str, content: bytes, tokenizer: str, **kw) -> Optional[tuple[dict, dict[str, str], str]]:
    """``(meta, {split: decoded text}, EOT string)`` of the DATA_DIR prepared from a file holding
    ``content``; None when it was refused with a UserError."""
    from tokenizers import Tokenizer

    from scalelm.data.prepare import prepare

    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / name, Path(d) / "out"
        src.write_bytes(content)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # bad input is reported as warnings too; only errors matter here
            try:
                meta = prepare(str(src), str(out), tokenizer=tokenizer, progress=False, block_size=8,
                               workers=1, **kw)
            except UserError:
                return None
        assert (out / "meta.json").is_file()
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))  # read back without scalelm's loader
        texts = {s: tok.decode(np.fromfile(out / f"{s}.bin", dtype=meta["dtype"]).tolist(),
                               skip_special_tokens=False) for s in ("train", "val")}
        return meta, texts, tok.id_to_token(meta["tokenizer"]["eot_id"])


# documents that survive reading unchanged: no line ends or separator characters inside, no
# whitespace at their ends (whitespace around a separator belongs to it); not all ASCII
doc_text = st.text(st.characters(categories=("L", "N", "P", "S", "Zs"), exclude_characters="<#\\"),
                   min_size=1, max_size=30).map(str.strip).filter(lambda s: len(s.encode()) >= 2)
documents = st.lists(doc_text, min_size=1, max_size=6)
JOIN = {"eot": "<|endoftext|>", "blank": "\n\n", "line": "\n", "##": "##"}


def corpus_file(name: str, docs: list[str], field: str = "text") -> bytes:
    """``docs`` as the content of a file called ``name`` (text files use the default separator, eot)."""
    if name.endswith(".jsonl") or name.endswith(".json"):
        names = field.split(",")  # q,a: each document is its fields joined by a newline
        recs = [dict(zip(names, d.split("\n"))) for d in docs]
        if name.endswith(".json"):
            return json.dumps(recs).encode()
        return "\n".join(json.dumps(r) for r in recs).encode()
    raw = JOIN["eot"].join(docs).encode()
    return gzip.compress(raw) if name.endswith(".gz") else raw


def assert_prepared(result, docs: list[str]) -> None:
    """Accepted, and the token files decode to exactly ``docs``: in order when the split is the
    corpus's tail, as a set of whole documents when it picks documents."""
    assert result is not None, f"a valid corpus was refused: {docs!r}"
    meta, texts, eot = result
    assert meta["stats"]["documents"] == len(docs)
    assert meta["stats"]["bytes"] == sum(len(d.encode()) for d in docs)
    if meta["split"]["by"] == "tail":
        assert (texts["train"] + texts["val"]).split(eot) == docs + [""]
    else:
        got = [d for s in ("train", "val") for d in texts[s].split(eot)[:-1]]
        assert sorted(got) == sorted(docs) and all(texts[s].endswith(eot) for s in texts)
    assert texts["val"], "the validation split is empty"


tokenizers = st.sampled_from(["byte", "char"])
corpus_names = st.sampled_from(["c.txt", "c.jsonl", "c.json", "c.txt.gz", "c.bin"])


@FUZZ
@given(st.binary(max_size=600), corpus_names, tokenizers, st.sampled_from(["replace", "skip", "error"]),
       documents, corpus_names)
def test_prepare_random_bytes(content, name, tokenizer, on_invalid, good, good_name):
    _prepare(name, content, tokenizer, on_invalid_utf8=on_invalid)
    assert_prepared(_prepare(good_name, corpus_file(good_name, good), tokenizer, on_invalid_utf8=on_invalid), good)


jsonl_line = st.one_of(
    st.fixed_dictionaries({"text": st.text(max_size=30)}, optional={"q": json_like, "a": st.text(max_size=9)}
                          ).map(json.dumps),  # good records, so that some corpora are not empty
    st.dictionaries(st.sampled_from(["text", "q", "a", "other"]), json_like, max_size=3).map(json.dumps),
    json_like.map(json.dumps),
    st.text(max_size=30),  # broken lines
)


@FUZZ
@given(st.lists(jsonl_line, max_size=8), tokenizers, st.sampled_from(["text", "q,a"]),
       st.lists(st.tuples(doc_text, doc_text), min_size=1, max_size=6))
def test_prepare_random_jsonl(lines, tokenizer, field, good):
    _prepare("c.jsonl", "\n".join(lines).encode("utf-8", "surrogatepass"), tokenizer, text_field=field)
    docs = [q if field == "text" else f"{q}\n{a}" for q, a in good]
    assert_prepared(_prepare("c.jsonl", corpus_file("c.jsonl", docs, field), tokenizer, text_field=field), docs)


@FUZZ
@given(st.text(max_size=400), tokenizers, st.sampled_from(["eot", "blank", "line", "none", "##"]),
       st.floats(0.01, 0.99), documents)
def test_prepare_random_text(text, tokenizer, doc_sep, val_fraction, good):
    _prepare("c.txt", text.encode("utf-8", "surrogatepass"), tokenizer, doc_sep=doc_sep, val_fraction=val_fraction)
    # none: the file is one document, whatever it holds
    content = JOIN.get(doc_sep, " ").join(good)
    docs = good if doc_sep in JOIN else [content]
    assert_prepared(_prepare("c.txt", content.encode(), tokenizer, doc_sep=doc_sep, val_fraction=val_fraction), docs)
