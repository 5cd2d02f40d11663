"""Chat templates: the Jinja text that turns a conversation into the model's prompt.

Built in: ``chatml`` (``<|im_start|>role\\n...<|im_end|>``, two special tokens), ``alpaca``
(``### Instruction:`` / ``### Response:``, no new tokens) and ``plain`` (the texts one after the
other, each reply ended by end-of-text). Otherwise ``--template`` is a Jinja file in Hugging Face's
chat-template form (``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``).

Rendering uses the same sandboxed Jinja environment as :class:`scalelm.generate.chat.ChatFormat`,
so a fine-tuned model chats with exactly the text it was trained on. Training splits a
conversation into prompt and reply segments by rendering it turn by turn: before each assistant
message, the conversation so far with the generation prompt; after it, the conversation with the
reply. The difference is what the model learns to write.
"""

from __future__ import annotations

import re
from pathlib import Path

from ...errors import UserError

CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
          "{% endif %}")
ALPACA = ("{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
          "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately "
          "completes the request.\\n\\n' }}{% endif %}"
          "{% for message in messages %}{% if message['role'] == 'user' %}"
          "{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
          "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + "
          "'\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}")
PLAIN = ("{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
         "{% else %}{{ message['content'] }}{% endif %}{% endfor %}")
BUILTIN = {"chatml": CHATML, "alpaca": ALPACA, "plain": PLAIN}
SPECIAL = re.compile(r"<\|[A-Za-z0-9_]+\|>")  # <|im_start|>-style literals a template writes


class TemplateError(UserError):
    """A chat template that cannot be read, compiled or used to split a conversation."""


def load_template(spec: str) -> tuple[str, str]:
    """``(name, jinja text)`` of a built-in name or a Jinja file."""
    if spec in BUILTIN:
        return spec, BUILTIN[spec]
    p = Path(spec)
    if not p.is_file():
        raise TemplateError(f"--template {spec!r} is neither a built-in template ({', '.join(BUILTIN)}) nor a "
                            f"Jinja file")
    try:
        return p.stem, p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"{p} is not UTF-8 (byte {e.start}): save the template as UTF-8") from None


def special_tokens_of(template: str) -> list[str]:
    """The ``<|...|>`` tokens a template writes, in order of first use (these must be single tokens)."""
    seen: list[str] = []
    for t in SPECIAL.findall(template):
        if t not in seen:
            seen.append(t)
    return seen


class Template:
    """A compiled chat template with the bos/eos strings it is rendered with."""

    def __init__(self, text: str, bos_token: str = "", eos_token: str = "", name: str = "template"):
        from jinja2 import TemplateError as JinjaError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg):
            raise TemplateError(f"the chat template refused the conversation: {msg}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as generate/chat.py
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
        try:
            self._compiled = env.from_string(text)
        except JinjaError as e:
            raise TemplateError(f"the {name} chat template is not valid Jinja: {e}") from None
        self.text, self.name, self.bos_token, self.eos_token = text, name, bos_token, eos_token

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except TemplateError:
            raise
        except Exception as e:  # noqa: BLE001 (the template is code from a file: any failure is its own)
            raise TemplateError(f"the {self.name} chat template failed: {type(e).__name__}: {e}") from None

    def segments(self, messages: list[dict], where: str = "") -> list[tuple[str, bool]]:
        """``[(text, is_reply), ...]`` whose concatenation is the rendered conversation up to its last
        assistant message; ``is_reply`` marks each assistant message's text (and the end-of-turn
        marks the template writes after it)."""
        out: list[tuple[str, bool]] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            full = self.render(messages[:i + 1])
            if not prompt.startswith(done) or not full.startswith(prompt):
                at = f"{where}: " if where else ""
                raise TemplateError(f"{at}the {self.name} chat template does not render a conversation as the "
                                    f"conversation before it plus the new turn (message {i + 1}), so replies cannot "
                                    f"be told from prompts; use chatml, alpaca or a template that appends turns")
            if len(prompt) > len(done):
                out.append((prompt[len(done):], False))
            out.append((full[len(prompt):], True))
            done = full
        return out

    def prompt(self, messages: list[dict]) -> str:
        """The text that asks for the next assistant reply (what ``scalelm chat`` sends)."""
        return self.render(messages, add_generation_prompt=True)

    def end_of_turn(self, specials: list[str]) -> list[str]:
        """The special tokens the template writes after a reply: generation stops at them."""
        probe = "REPLY"
        segs = self.segments([{"role": "user", "content": "Q"}, {"role": "assistant", "content": probe}])
        tail = segs[-1][0].split(probe, 1)[-1] if segs else ""
        return [t for t in specials if t in tail]

