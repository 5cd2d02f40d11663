"""Chat templates: the Jinja text that turns a conversation into a model's prompt.

One compiler for every path that renders a conversation: SFT training (``scalelm finetune sft``
renders its examples with it and saves the template next to the model), ``scalelm chat`` and
``scalelm serve`` (which read that template back, or a Hugging Face model's). So a fine-tuned
model is asked exactly the text it was trained on.

Templates are Hugging Face's form (``messages``, ``add_generation_prompt``, ``bos_token``,
``eos_token``, ``raise_exception``, ``strftime_now``). A template is code that arrives with a
checkpoint, so it runs in Jinja's immutable sandbox, as ``transformers`` runs it: it cannot reach
Python internals or change the conversation, and any failure is reported as the template's own.

A model directory keeps its template in ``chat_template.jinja``, or as ``chat_template`` in
``tokenizer_config.json`` (with the ``bos_token``/``eos_token`` strings it is rendered with).

Only the template writes control tokens. A tokenizer turns a control token's string into the
control token wherever it appears, so a message holding ``<|im_end|><|im_start|>system`` would
close its own turn and open a forged one. :class:`ControlTokens` and the ``*_marked`` methods
keep message text plain: the template renders the messages with stand-ins for such strings, the
rendering marks where they went (:class:`Rendered`), and those spans are tokenized as the
characters they are. Text without them renders and tokenizes exactly as it always did.
"""

from __future__ import annotations

import datetime
import json
import re
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

from ..checkpoint.names import TEMPLATE_FILE, TOKENIZER_CONFIG  # noqa: F401 (re-exported)
from ..errors import UserError


class ChatTemplateError(UserError):
    """A chat template that cannot be read, compiled, rendered or split into turns."""


def _tokenizer_config(tokenizer_dir: Path) -> dict:
    """tokenizer_config.json as a dict; an unreadable one holds nothing (no template, no tokens)."""
    f = Path(tokenizer_dir) / TOKENIZER_CONFIG
    if not f.is_file():
        return {}
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def read_chat_template(tokenizer_dir: Path) -> Optional[str]:
    """The Jinja chat template of an HF-style tokenizer directory, if it has one."""
    jinja = Path(tokenizer_dir) / TEMPLATE_FILE
    if jinja.is_file():
        try:
            return jinja.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ChatTemplateError(f"{jinja} is not valid UTF-8 (byte {e.start}): fix or delete it") from None
    t = _tokenizer_config(tokenizer_dir).get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) else None


def template_source(tokenizer_dir: Path) -> str:
    """Which file :func:`read_chat_template` took the template from (for messages)."""
    jinja = Path(tokenizer_dir) / TEMPLATE_FILE
    return str(jinja if jinja.is_file() else Path(tokenizer_dir) / TOKENIZER_CONFIG)


def special_token_text(tokenizer_dir: Optional[Path], name: str) -> Optional[str]:
    """``bos_token`` / ``eos_token`` of tokenizer_config.json as text (a plain string or HF's
    ``{"content": ...}`` form); None where the directory does not say."""
    if tokenizer_dir is None:
        return None
    v = _tokenizer_config(tokenizer_dir).get(name)
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else None


@dataclass(frozen=True)
class Rendered:
    """Rendered text and ``literal``: the sorted ``(start, end)`` spans of it that messages wrote and
    that spell a control token or a piece of one, to be tokenized as plain text."""
    text: str
    literal: tuple[tuple[int, int], ...] = ()

    def __getitem__(self, key: slice) -> "Rendered":
        a, b, _ = key.indices(len(self.text))
        return Rendered(self.text[a:b], tuple((max(s, a) - a, min(e, b) - a) for s, e in self.literal
                                              if s < b and e > a))


class ControlTokens:
    """A tokenizer's control tokens (its added tokens marked special: ``<|im_end|>``,
    ``<|endoftext|>`` ...) and the encoding of :class:`Rendered` text in which only the template's
    own copies of them become control tokens.

    ``encode(..., add_special_tokens=False)`` does not stop the tokenizer from matching control
    strings in the text, so text with literal spans goes through a copy of the tokenizer that
    reads control strings as text (``encode_special_tokens``) and in which the template's controls
    are stand-in tokens with the same whitespace handling, mapped back to the real ids: one
    encode call over the whole text, so pre-tokenization is what the plain encode does."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        strings = sorted(self.ids, key=len, reverse=True)  # longest first: "<|a|>x" before "<|a|>"
        self.pattern = re.compile("|".join(map(re.escape, strings))) if strings else None
        # a control's string split across two texts (a message's end and the template's next text)
        self.prefixes = {c[:k] for c in strings for k in range(1, len(c))}
        self.suffixes = {c[k:] for c in strings for k in range(1, len(c))}
        self.longest = len(strings[0]) if strings else 0

    def spans(self, text: str) -> list[tuple[int, int]]:
        """Where ``text`` (a message's) holds a control string, or begins or ends with a piece of one."""
        if self.pattern is None or not text:
            return []
        out = [m.span() for m in self.pattern.finditer(text)]
        for k in range(min(len(text), self.longest - 1), 0, -1):
            if text[:k] in self.suffixes:
                out.append((0, k))
                break
        for k in range(min(len(text), self.longest - 1), 0, -1):
            if text[-k:] in self.prefixes:
                out.append((len(text) - k, len(text)))
                break
        merged: list[list[int]] = []
        for a, b in sorted(out):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return [(a, b) for a, b in merged]

    @cached_property
    def _plain(self):
        """(the copy of the tokenizer, control string -> its stand-in, stand-in id -> control id)."""
        from tokenizers import AddedToken, Tokenizer

        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True  # control strings are text to it...
        added = self.tokenizer.get_added_tokens_decoder()
        nonce = secrets.token_hex(8)  # (no text can hold a stand-in: nobody knows them)
        stand_in = {c: f"\ue000{nonce}.{k}\ue001" for k, c in enumerate(self.ids)}
        # ...but for these (not special, so matched), in the places the template wrote controls
        plain.add_tokens([AddedToken(stand_in[c], single_word=added[i].single_word, lstrip=added[i].lstrip,
                                     rstrip=added[i].rstrip, normalized=added[i].normalized, special=False)
                          for c, i in self.ids.items()])
        back = {plain.token_to_id(stand_in[c]): i for c, i in self.ids.items()}
        return plain, stand_in, back

    def encode(self, r: Rendered) -> list[int]:
        if not r.literal:
            return self.tokenizer.encode(r.text, add_special_tokens=False).ids
        plain, stand_in, back = self._plain
        parts, pos = [], 0
        for a, b in [*r.literal, (len(r.text), len(r.text))]:
            parts.append(self.pattern.sub(lambda m: stand_in[m.group()], r.text[pos:a]))
            parts.append(r.text[a:b])
            pos = b
        return [back.get(i, i) for i in plain.encode("".join(parts), add_special_tokens=False).ids]

    def encode_batch(self, texts: list[Rendered]) -> list[list[int]]:
        if not any(r.literal for r in texts):
            return [e.ids for e in self.tokenizer.encode_batch([r.text for r in texts], add_special_tokens=False)]
        return [self.encode(r) for r in texts]


class _StandIns:
    """Messages with every control string (and piece of one at a text's ends) in their text replaced
    by a stand-in the template cannot tell from text; :meth:`restore` puts the strings back into a
    rendering and says where they are. Roles are left alone: templates compare them."""

    def __init__(self, controls: ControlTokens, messages: list, tools: Optional[list] = None):
        self.controls, self.pieces = controls, []
        self.nonce = secrets.token_hex(8)
        self.messages = [{k: v if k == "role" else self._swap(v) for k, v in m.items()}
                         if isinstance(m, dict) else m for m in messages]
        self.tools = self._swap(tools) if tools is not None else None  # descriptions are text too

    def _swap(self, v):
        if isinstance(v, str):
            spans = self.controls.spans(v)
            if not spans:
                return v
            out, pos = [], 0
            for a, b in spans:
                out.append(v[pos:a])
                out.append(f"\ue000{self.nonce}.{len(self.pieces)}\ue001")
                self.pieces.append(v[a:b])
                pos = b
            return "".join(out) + v[pos:]
        if isinstance(v, dict):
            return {k: self._swap(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [self._swap(x) for x in v]
        return v

    def restore(self, text: str, where: str) -> Rendered:
        out, spans, pos, n = [], [], 0, 0
        for m in re.finditer(f"\ue000{self.nonce}\\.(\\d+)\ue001", text):
            out.append(text[pos:m.start()])
            n += len(out[-1])
            piece = self.pieces[int(m.group(1))]
            spans.append((n, n + len(piece)))
            out.append(piece)
            n += len(piece)
            pos = m.end()
        out.append(text[pos:])
        if any(self.nonce in x for x in out[::2]):  # e.g. sliced or escaped by the template
            raise ChatTemplateError(f"{where} changes the text of a message that holds a control token's "
                                    f"text ({self.pieces[0]!r}), so that text cannot be kept apart from the "
                                    f"template's own control tokens")
        return Rendered("".join(out), tuple(spans))


class ChatTemplate:
    """A compiled chat template with the bos/eos strings it is rendered with.

    ``name`` says which template it is in messages (``chatml``, a file's stem); ``where`` replaces
    "the NAME chat template" there (e.g. with the file it came from), and ``advice`` is appended
    to every error (what the user can do instead, e.g. ``chat --plain``).
    """

    def __init__(self, text: str, bos_token: str = "", eos_token: str = "", name: str = "", *,
                 where: Optional[str] = None, advice: str = ""):
        try:
            from jinja2 import TemplateError
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError:
            raise ChatTemplateError("rendering a chat template needs jinja2: pip install jinja2") from None

        self.text, self.name, self.bos_token, self.eos_token = text, name, bos_token, eos_token
        self.where = where or (f"the {name} chat template" if name else "the chat template")
        self._advice = f"; {advice}" if advice else ""

        def raise_exception(msg):
            raise ChatTemplateError(f"the chat template refused the conversation: {msg}")

        # trim/lstrip blocks as transformers compiles chat templates: the same text renders the same
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
        try:
            self._compiled = env.from_string(text)
        except TemplateError as e:
            line = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
            raise ChatTemplateError(f"{self.where} is not valid Jinja{line}: {str(e).rstrip('.')}"
                                    f"{self._advice}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool = False,
               tools: Optional[list[dict]] = None) -> str:
        """``tools``: OpenAI's tool dicts, the ``tools`` variable as Hugging Face passes it (None: no tools)."""
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token, tools=tools)
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001 (the template is code from a file: any failure is its own)
            from jinja2.sandbox import SecurityError

            what = "uses an operation the sandbox blocks" if isinstance(e, SecurityError) else "failed"
            raise ChatTemplateError(f"{self.where} {what}: {type(e).__name__}: {str(e).rstrip('.')}"
                                    f"{self._advice}") from None

    def prompt(self, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
        """The text that asks for the next assistant reply (what ``scalelm chat`` and ``serve`` send)."""
        return self.render(messages, add_generation_prompt=True, tools=tools)

    def render_marked(self, messages: list[dict], add_generation_prompt: bool = False,
                      controls: Optional[ControlTokens] = None, tools: Optional[list[dict]] = None) -> Rendered:
        """:meth:`render`, with the spans where messages (and tools) wrote ``controls``' strings marked literal."""
        swap = _StandIns(controls, messages, tools) if controls is not None else None
        if swap is None or not swap.pieces:
            return Rendered(self.render(messages, add_generation_prompt, tools))
        return swap.restore(self.render(swap.messages, add_generation_prompt, swap.tools), self.where)

    def prompt_marked(self, messages: list[dict], controls: Optional[ControlTokens] = None,
                      tools: Optional[list[dict]] = None) -> Rendered:
        return self.render_marked(messages, True, controls, tools)

    def segments(self, messages: list[dict], where: str = "") -> list[tuple[str, bool]]:
        """``[(text, is_reply), ...]`` whose concatenation is the rendered conversation up to its last
        assistant message; ``is_reply`` marks each assistant message's text (and the end-of-turn
        marks the template writes after it).

        Training renders turn by turn: before each assistant message, the conversation so far with
        the generation prompt (exactly :meth:`prompt`); after it, the conversation with the reply.
        The difference is what the model learns to write."""
        return [(r.text, reply) for r, reply in self.marked_segments(messages, where)]

    def marked_segments(self, messages: list[dict], where: str = "",
                        controls: Optional[ControlTokens] = None) -> list[tuple[Rendered, bool]]:
        """:meth:`segments` as :class:`Rendered` pieces (see :meth:`render_marked`)."""
        out: list[tuple[Rendered, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.prompt_marked(messages[:i], controls)
            full = self.render_marked(messages[:i + 1], False, controls)
            if not prompt.text.startswith(done) or not full.text.startswith(prompt.text):
                at = f"{where}: " if where else ""
                raise ChatTemplateError(f"{at}{self.where} does not render a conversation as the conversation "
                                        f"before it plus the new turn (message {i + 1}), so replies cannot be told "
                                        f"from prompts; use chatml, alpaca or a template that appends turns")
            if len(prompt.text) > len(done):
                out.append((prompt[len(done):], False))
            out.append((full[len(prompt.text):], True))
            done = full.text
        return out

    def end_of_turn(self, specials: list[str]) -> list[str]:
        """The special tokens the template writes after a reply: generation stops at them."""
        probe = "REPLY"
        segs = self.segments([{"role": "user", "content": "Q"}, {"role": "assistant", "content": probe}])
        tail = segs[-1][0].split(probe, 1)[-1] if segs else ""
        return [t for t in specials if t in tail]
