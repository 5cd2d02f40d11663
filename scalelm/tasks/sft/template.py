"""Chat templates: the Jinja text that turns a conversation into the model's prompt.

Built in: ``chatml`` (``<|im_start|>role\\n...<|im_end|>``, two special tokens), ``alpaca``
(``### Instruction:`` / ``### Response:``, no new tokens) and ``plain`` (the texts one after the
other, each reply ended by end-of-text). Otherwise ``--template`` is a Jinja file in Hugging Face's
chat-template form (``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``).

Rendering is :class:`scalelm.data.chat_template.ChatTemplate`'s, the one ``scalelm chat`` and
``scalelm serve`` use, so a fine-tuned model chats with exactly the text it was trained on
(:meth:`ChatTemplate.segments` splits a conversation into prompt and reply segments).
"""

from __future__ import annotations

import re
from pathlib import Path

from ...data.chat_template import ChatTemplateError
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


def load_template(spec: str) -> tuple[str, str]:
    """``(name, jinja text)`` of a built-in name or a Jinja file."""
    if spec in BUILTIN:
        return spec, BUILTIN[spec]
    p = Path(spec)
    if not p.is_file():
        raise ChatTemplateError(f"--template {spec!r} is neither a built-in template ({', '.join(BUILTIN)}) "
                                f"nor a Jinja file")
    try:
        return p.stem, p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ChatTemplateError(f"{p} is not UTF-8 (byte {e.start}): save the template as UTF-8") from None


def check_special_tokens(tokens) -> None:
    """Refuse ``--special-token`` values that cannot be special tokens: an empty one (the tokenizer
    cannot add it), or one of whitespace only (every such space or newline in the text would become
    that token, so no text would encode as it did in pretraining)."""
    for t in tokens or ():
        if not isinstance(t, str) or not t:
            raise UserError(f"--special-token {t!r} is empty: give the token's text, e.g. --special-token '<|tool|>'")
        if not t.strip():
            raise UserError(f"--special-token {t!r} is only whitespace: every {t!r} in the text would become that "
                            f"token; give a visible token, e.g. --special-token '<|tool|>'")


def special_tokens_of(template: str) -> list[str]:
    """The ``<|...|>`` tokens a template writes, in order of first use (these must be single tokens)."""
    seen: list[str] = []
    for t in SPECIAL.findall(template):
        if t not in seen:
            seen.append(t)
    return seen
