"""Constrained decoding: token masks that keep a sampled text inside a grammar (structured output).

A :class:`Grammar` is what the text must match: a JSON schema (``generate --json-schema``, serve's
``response_format``/``guided_json``), any JSON object, a regex, one of a list of strings, or a Lark
grammar (serve's tool calls). :func:`compile_grammar` compiles it for a model's tokenizer with
`llguidance <https://github.com/guidance-ai/llguidance>`_, which computes the set of allowed next
tokens as a bitmask in native code; a grammar it cannot compile is a :class:`GrammarError` that
says why. Each sequence decodes with its own :class:`Matcher` (the grammar's state after the
tokens it has taken); :func:`mask_logits` sets the disallowed tokens of each row of a batch to
-inf with tensor operations (one bitmask per row, unpacked on the host and moved once), so rows
with and without constraints share a batch and the vocabulary is never looped over in Python.

The model's vocabulary may be larger than the tokenizer's (padded to a multiple of 64): the
padding ids are never allowed. End-of-text is allowed exactly when the grammar accepts the text
so far; once nothing but end-of-text may follow (:meth:`Matcher.advance` returns True), the
sequence is finished, so a bounded grammar (a schema of bounded size) always terminates.

JSON is compiled compact (no optional whitespace: a model with random weights would otherwise
pad forever with spaces), with llguidance's default strictness: a schema keyword it does not
implement is an error, not silently ignored.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..errors import UserError
from .outputs import GenerationError

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: ',' and ':' with no spaces, no padding
_SHIFTS = torch.arange(32, dtype=torch.int32)  # bit k of a mask word: token 32 * word + k


class GrammarError(UserError, ValueError):
    """A schema, regex, choice list or grammar that cannot be compiled into token masks."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError("structured output needs llguidance: pip install 'scalelm[serve]'") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """An llguidance grammar (its JSON text), what it came from (for messages), and the same
    grammar as the body of a Lark rule (to embed it in a larger grammar: serve's tool calls)."""
    text: str
    what: str
    rule: Optional[str] = None


def json_schema(schema, what: str = "the JSON schema") -> Grammar:
    """Text that parses as JSON and validates against ``schema`` (a dict, or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise GrammarError(f"{what} is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be a JSON object, not {type(schema).__name__}")
    try:
        text = _llguidance().LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise GrammarError(f"{what} cannot be compiled: {e}") from None
    return Grammar(text, what, "%json " + json.dumps({**schema, "x-guidance": JSON_OPTIONS}))


def json_object() -> Grammar:
    """Any JSON object (OpenAI's ``{"type": "json_object"}``)."""
    return json_schema({"type": "object"})


def regex(pattern: str) -> Grammar:
    """Text that matches ``pattern`` as a whole (Rust ``regex`` syntax, as Python's for common use)."""
    return Grammar(_llguidance().LLMatcher.grammar_from_regex(pattern), "the regex",
                   "/" + pattern.replace("/", "\\/") + "/")


def choice(options: Sequence[str]) -> Grammar:
    """Exactly one of ``options``."""
    options = list(options)
    if not options or not all(isinstance(o, str) for o in options):
        raise GrammarError("a choice needs a non-empty list of strings")
    body = " | ".join(json.dumps(o) for o in options)
    return Grammar(lark("start: " + body).text, "the choice list", body)


def lark(text: str, what: str = "the grammar") -> Grammar:
    """A Lark grammar in llguidance's dialect (``%json {schema}`` embeds a JSON schema)."""
    return Grammar(_llguidance().LLMatcher.grammar_from_lark(text), what, None)


# ----------------------------------------------------------------------------- compiled for a model
class Vocab:
    """A model's tokenizer as llguidance reads it (built once per tokenizer: about a second for a
    large vocabulary), padded to the model's vocabulary size."""

    def __init__(self, tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        llg = _llguidance()
        self.n = max(int(vocab_size), tokenizer.get_vocab_size())
        self.vocab_size = int(vocab_size)  # the logits' width
        eos = sorted(int(i) for i in eos_ids)
        try:
            self.tokenizer = llg.LLTokenizer(tokenizer.to_str(), n_vocab=self.n, eos_token=eos or None)
        except Exception as e:  # noqa: BLE001 (a tokenizer llguidance cannot read: say so, once)
            raise GrammarError(f"structured output cannot use this model's tokenizer: {e}") from None
        self.words = (self.n + 31) // 32  # int32 words of one row's bitmask


_vocabs: dict = {}
_vocabs_lock = threading.Lock()


def vocab_for(tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> Vocab:
    """The cached :class:`Vocab` of a tokenizer (the server's request threads share one)."""
    if tokenizer is None:
        raise GrammarError("structured output needs the model's tokenizer (this model has none)")
    key = (id(tokenizer), int(vocab_size), tuple(sorted(eos_ids)))
    with _vocabs_lock:
        hit = _vocabs.get(key)
        if hit is None or hit[0] is not tokenizer:  # (holding the tokenizer keeps its id unique)
            hit = _vocabs[key] = (tokenizer, Vocab(tokenizer, vocab_size, eos_ids))
    return hit[1]


class Constraint:
    """A grammar compiled for one model's tokenizer; each sequence takes its own :meth:`matcher`."""

    def __init__(self, grammar: Grammar, vocab: Vocab):
        llg = _llguidance()
        try:
            proto = llg.LLMatcher(vocab.tokenizer, grammar.text, log_level=0)
        except Exception as e:  # noqa: BLE001 (it reports grammar errors as a state; anything else is one too)
            raise GrammarError(f"{grammar.what} cannot be compiled: {_first_line(str(e))}") from None
        if proto.is_error():
            raise GrammarError(f"{grammar.what} cannot be compiled: {_first_line(proto.get_error())}")
        self.grammar, self.vocab, self._proto = grammar, vocab, proto

    def matcher(self) -> "Matcher":
        return Matcher(self._proto.deep_copy(), self.vocab)


def compile_grammar(grammar: Grammar, tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> Constraint:
    return Constraint(grammar, vocab_for(tokenizer, vocab_size, eos_ids))


def _first_line(msg: str) -> str:
    """llguidance's message on one line, without its echo of the grammar source and ``^`` markers."""
    keep = [x.strip() for x in msg.strip().splitlines()
            if x.strip() and not re.match(r"\s*\d+\s*\|", x) and x.strip().strip("^~ ")]
    text = " ".join(keep) or "unknown error"
    return text if len(text) <= 400 else text[:400] + "..."


class Matcher:
    """One sequence's place in its grammar."""

    def __init__(self, m, vocab: Vocab):
        self.m, self.vocab = m, vocab

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into ``bitmask[row]`` (int32 words, bit set = allowed)."""
        from llguidance.torch import fill_next_token_bitmask

        fill_next_token_bitmask(self.m, bitmask, row)

    def advance(self, token: int) -> bool:
        """Take a sampled token; True when the grammar is complete (only end-of-text may follow)."""
        if not self.m.consume_token(int(token)):
            raise GenerationError(f"token {token} breaks the output's grammar: "
                                  f"{_first_line(self.m.get_error())}")
        return self.m.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.m.is_accepting()


def mask_logits(logits: torch.Tensor, matchers: Sequence[Optional[Matcher]]) -> torch.Tensor:
    """``logits`` (B, V) with the tokens row ``b``'s grammar forbids at -inf (rows without a
    matcher as they are). One bitmask per row, filled by llguidance, unpacked with shifts."""
    live = [(b, m) for b, m in enumerate(matchers) if m is not None]
    if not live:
        return logits
    vocab = live[0][1].vocab
    bitmask = torch.full((len(matchers), vocab.words), -1, dtype=torch.int32)  # all allowed
    for b, m in live:
        m.fill(bitmask, b)
    V = logits.shape[-1]
    allowed = ((bitmask[:, :, None] >> _SHIFTS) & 1).view(len(matchers), -1)[:, :V].bool()
    return logits.masked_fill(~allowed.to(logits.device, non_blocking=True), float("-inf"))
