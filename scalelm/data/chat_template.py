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
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Optional

from ..errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


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

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except Exception as e:  # noqa: BLE001 (the template is code from a file: any failure is its own)
            from jinja2.sandbox import SecurityError

            what = "uses an operation the sandbox blocks" if isinstance(e, SecurityError) else "failed"
            raise ChatTemplateError(f"{self.where} {what}: {type(e).__name__}: {str(e).rstrip('.')}"
                                    f"{self._advice}") from None

    def prompt(self, messages: list[dict]) -> str:
        """The text that asks for the next assistant reply (what ``scalelm chat`` and ``serve`` send)."""
        return self.render(messages, add_generation_prompt=True)

    def segments(self, messages: list[dict], where: str = "") -> list[tuple[str, bool]]:
        """``[(text, is_reply), ...]`` whose concatenation is the rendered conversation up to its last
        assistant message; ``is_reply`` marks each assistant message's text (and the end-of-turn
        marks the template writes after it).

        Training renders turn by turn: before each assistant message, the conversation so far with
        the generation prompt (exactly :meth:`prompt`); after it, the conversation with the reply.
        The difference is what the model learns to write."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.prompt(messages[:i])
            full = self.render(messages[:i + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                at = f"{where}: " if where else ""
                raise ChatTemplateError(f"{at}{self.where} does not render a conversation as the conversation "
                                        f"before it plus the new turn (message {i + 1}), so replies cannot be told "
                                        f"from prompts; use chatml, alpaca or a template that appends turns")
            if len(prompt) > len(done):
                out.append((prompt[len(done):], False))
            out.append((full[len(prompt):], True))
            done = full
        return out

    def end_of_turn(self, specials: list[str]) -> list[str]:
        """The special tokens the template writes after a reply: generation stops at them."""
        probe = "REPLY"
        segs = self.segments([{"role": "user", "content": "Q"}, {"role": "assistant", "content": probe}])
        tail = segs[-1][0].split(probe, 1)[-1] if segs else ""
        return [t for t in specials if t in tail]
