"""Structured output in `Generator` and `scalelm generate`: grammars (JSON schema, regex, choice) make
even a random-weight model's output parse and validate; constrained rows batch as they run alone."""

import io
import json
import re
import sys

import pytest
import torch

from scalelm import cli
from scalelm.config import ModelConfig
from scalelm.generate import constrained
from scalelm.generate.constrained import GrammarError, Matcher, compile_grammar, mask_logits
from scalelm.generate.generator import Generator
from scalelm.generate.sampling import SamplingParams
from scalelm.model import GPT
from scalelm.model.io import save_model_dir

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

GREEDY = SamplingParams(temperature=0.0)
SAMPLE = SamplingParams(temperature=1.0)
# bounded schemas: a random model writes junk, so every string, number and array has a limit and
# the grammar completes (and ends the row) well inside max_new_tokens
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "role", "tags", "ok"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                               "y": {"type": "integer", "minimum": -9, "maximum": 9}},
              "required": ["x", "y"], "additionalProperties": False},
    "kind": {"const": "pt"},
    "weights": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99},
                "minItems": 1, "maxItems": 4}},
    "required": ["point", "kind", "weights"], "additionalProperties": False}
ENUM = {"enum": ["red", "green", 3, None]}

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer_json):
    """A random model whose vocabulary (320) is padded past its tokenizer's (300)."""
    root = tmp_path_factory.mktemp("constrained")
    torch.manual_seed(0)
    m = GPT(ModelConfig(vocab_size=320, block_size=128, n_layer=2, n_head=4, n_embd=64,
                        tie_embeddings=False, init_std=0.3))
    save_model_dir(m, root / "model", tokenizer_json=tiny_tokenizer_json)
    return root / "model"


@pytest.fixture(scope="module")
def gen(model_dir):
    return Generator.from_checkpoint(model_dir)


@pytest.mark.parametrize("schema", [PERSON, NESTED, ENUM], ids=["object", "nested", "enum"])
def test_sampled_json_parses_and_validates_against_its_schema(gen, schema):
    outs = gen.generate(["To be", "Hello"], 96, sampling=SAMPLE, seed=1, num_samples=3,
                        grammar=constrained.json_schema(schema))
    for o in outs:
        assert o.finish_reason == "stop", o  # the grammar completed and ended the row
        jsonschema.validate(json.loads(o.text), schema)
        assert all(t < 300 for t in o.tokens)  # never a padding id (the model has 320, the tokenizer 300)


def test_json_object_regex_and_choice(gen):
    for o in gen.generate("To be", 64, sampling=SAMPLE, seed=2, num_samples=3,
                          grammar=constrained.json_schema({"type": "object", "properties": {},
                                                           "additionalProperties": False})):
        assert o.finish_reason == "stop" and json.loads(o.text) == {}
    pattern = r"[0-9]{3}-[a-z]{2,4}"
    for o in gen.generate(["To be", "A"], 32, sampling=SAMPLE, seed=3, num_samples=3,
                          grammar=constrained.regex(pattern)):
        assert o.finish_reason == "stop" and re.fullmatch(pattern, o.text), o.text
    picks = {o.text for o in gen.generate("To be", 32, sampling=SAMPLE, seed=4, num_samples=8,
                                          grammar=constrained.choice(["yes", "no", "maybe so"]))}
    assert picks <= {"yes", "no", "maybe so"} and picks


def test_a_constrained_batch_gives_each_row_what_it_gives_alone(gen):
    g = constrained.json_schema(NESTED)
    prompts = ["To be", "Hello there, friend", "A"]
    batch = gen.generate(prompts, 64, sampling=GREEDY, grammar=g)
    for p, b in zip(prompts, batch):
        alone = gen.generate(p, 64, sampling=GREEDY, grammar=g)[0]
        assert b.tokens == alone.tokens and b.finish_reason == alone.finish_reason == "stop"
        jsonschema.validate(json.loads(b.text), NESTED)
    # the grammar does change what a random model writes
    assert gen.generate(prompts[0], 16, sampling=GREEDY)[0].tokens != batch[0].tokens[:16]


def test_masks_rows_with_tensors_and_leave_unconstrained_rows_alone(gen):
    c = compile_grammar(constrained.choice(["yes", "no"]), gen.tokenizer, gen.cfg.vocab_size, gen.eos_ids)
    logits = torch.randn(3, gen.cfg.vocab_size)
    out = mask_logits(logits, [None, c.matcher(), None])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = torch.isfinite(out[1]).nonzero().flatten().tolist()
    firsts = {gen.encode("yes")[0], gen.encode("no")[0]}
    assert firsts <= set(allowed) and len(allowed) < 10 and max(allowed) < 300
    assert mask_logits(logits, [None, None]) is logits
    m: Matcher = c.matcher()
    assert not any(m.advance(t) for t in gen.encode("ye")) and m.advance(gen.encode("s")[0])  # complete after "yes"
    assert m.accepting


@pytest.mark.parametrize("grammar, says", [
    (lambda: constrained.json_schema({"type": "foo"}), "Invalid type"),
    (lambda: constrained.json_schema({"type": "string", "format": "no-such-format"}), "format"),
    (lambda: constrained.regex("(ab"), "unclosed group"),
])
def test_a_grammar_that_cannot_compile_is_a_user_error_that_says_why(gen, grammar, says):
    with pytest.raises(GrammarError, match=says):
        gen.generate("To be", 4, grammar=grammar())
    with pytest.raises(GrammarError, match="must be a JSON object"):
        constrained.json_schema([1, 2])
    with pytest.raises(GrammarError, match="not valid JSON"):
        constrained.json_schema("{nope")
    with pytest.raises(GrammarError, match="non-empty list"):
        constrained.choice([])


def main(capsys, monkeypatch, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_generate_json_schema_regex_and_choice_flags(model_dir, tmp_path, capsys, monkeypatch):
    f = tmp_path / "person.json"
    f.write_text(json.dumps(PERSON))
    rc, out, err = main(capsys, monkeypatch, "generate", model_dir, "--prompt", "To be", "--json-schema", f,
                        "--num-samples", "3", "--seed", "5", "--max-new-tokens", "96", "--json", "--threads", "1")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert r["finish_reason"] == "stop"
        jsonschema.validate(json.loads(r["text"]), PERSON)
    rc, out, err = main(capsys, monkeypatch, "generate", model_dir, "--prompt", "To be", "--regex", "[a-c]{4}",
                        "--temperature", "0", "--threads", "1")
    text = out.rstrip("\n")
    assert rc == 0 and len(text) == 4 and set(text) <= set("abc"), out  # the continuation, printed alone
    rc, out, err = main(capsys, monkeypatch, "generate", model_dir, "--prompt", "To be", "--choice", "alpha", "beta",
                        "--json", "--threads", "1")
    assert rc == 0 and json.loads(out)["text"] in ("alpha", "beta"), out
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "foo"}')
    rc, out, err = main(capsys, monkeypatch, "generate", model_dir, "--json-schema", bad, "--threads", "1")
    assert rc == 2 and f"the JSON schema in {bad} cannot be compiled: Invalid type: foo" in err, err
    with pytest.raises(SystemExit):  # one constraint at a time
        main(capsys, monkeypatch, "generate", model_dir, "--regex", "a", "--choice", "b")
    rc, out, err = main(capsys, monkeypatch, "generate", model_dir, "--regex", "a", "--beams", "2")
    assert rc == 2 and "--regex" in err
