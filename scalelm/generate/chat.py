"""``scalelm chat``: interactive multi-turn chat over stdin, replies streamed to stdout.

Each line on stdin is one user message (``/reset`` forgets the conversation, ``/exit`` or end
of input ends it). The conversation is rendered with the tokenizer's chat template when the
checkpoint has one (``tokenizer_config.json`` or ``chat_template.jinja``, e.g. imported from
Hugging Face), in a Jinja sandbox as ``transformers`` does; otherwise with a plain
``User:`` / ``Assistant:`` transcript, where a reply ends at end-of-text or at the next
``User:``. When the conversation outgrows the context, the oldest turns are dropped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ..data.chat_template import ChatTemplate, ControlTokens, special_token_text, template_source
from .terminal import for_stdout
from .cli import add_model_args, add_sampling_args, generator_from_args, pick_seed, sampling_from_args
from .generator import GenerationError, Generator

PLAIN_STOPS = ["\nUser:"]


def _special_token(gen: Generator, tokenizer_dir: Optional[Path], name: str, token_id) -> str:
    """bos/eos as text for templates: from tokenizer_config.json, else decoded from its id."""
    text = special_token_text(tokenizer_dir, name)
    if text is not None:
        return text
    if token_id is None or gen.tokenizer is None:
        return ""
    return gen.tokenizer.id_to_token(int(token_id)) or ""


def checkpoint_template(gen: Generator, tokenizer_dir: Optional[Path] = None,
                        advice: str = "") -> Optional[ChatTemplate]:
    """The checkpoint's chat template (None if it has none), with the bos/eos strings it is rendered
    with: ``tokenizer_dir``'s tokenizer_config.json (what SFT training wrote), else the tokens of
    the model's bos/eos ids."""
    if not gen.chat_template:
        return None
    where = "the chat template"
    if tokenizer_dir is not None:  # where read_chat_template found it
        where += f" in {template_source(tokenizer_dir)}"
    bos = _special_token(gen, tokenizer_dir, "bos_token", gen.bos_id)
    eos = _special_token(gen, tokenizer_dir, "eos_token", min(gen.eos_ids) if gen.eos_ids else None)
    return ChatTemplate(gen.chat_template, bos, eos, "checkpoint", where=where, advice=advice)


class ChatFormat:
    """Renders a message list to the prompt that asks for the assistant's next reply: with the
    checkpoint's :class:`~scalelm.data.chat_template.ChatTemplate` (``template``; the one SFT
    training rendered with), else as a plain ``User:``/``Assistant:`` transcript."""

    def __init__(self, gen: Generator, tokenizer_dir: Optional[Path] = None, plain: bool = False):
        self.gen = gen
        self.template = None if plain else checkpoint_template(gen, tokenizer_dir,
                                                                "fix it, or chat without it with --plain")
        self.stops = [] if self.template else PLAIN_STOPS
        # message text stays text: only the template writes control tokens (as SFT training encodes)
        self.controls = ControlTokens(gen.tokenizer) if self.template and gen.tokenizer is not None else None

    def render(self, messages: list[dict], tools: Optional[list[dict]] = None) -> str:
        if self.template is not None:
            return self.template.prompt(messages, tools)
        parts = [m["content"] + "\n\n" for m in messages if m["role"] == "system"]
        for m in messages:
            if m["role"] == "user":
                parts.append(f"User: {m['content']}\nAssistant:")
            elif m["role"] == "assistant":
                parts.append(f" {m['content']}\n")
        return "".join(parts)

    def encode(self, messages: list[dict], tools: Optional[list[dict]] = None) -> list[int]:
        """``tools``: given to a template that takes them (serve's tool calls, scalelm/serve/tools.py)."""
        if self.controls is not None:  # a template writes its own special tokens (bos): none added
            return self.controls.encode(self.template.prompt_marked(messages, self.controls, tools))
        return self.gen.encode(self.render(messages, tools), add_special_tokens=self.template is None)


def fit_context(fmt: ChatFormat, messages: list[dict], room: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest turns (never the system message or the last user message) until the
    prompt leaves ``room`` tokens of context for the reply."""
    limit = max(1, fmt.gen.cfg.block_size - room)
    msgs = list(messages)
    ids = fmt.encode(msgs)
    while len(ids) > limit:
        first = next((i for i, m in enumerate(msgs) if m["role"] != "system"), None)
        if first is None or first == len(msgs) - 1:
            break  # only the last message is left: the prompt gets truncated instead
        del msgs[first]
        ids = fmt.encode(msgs)
    return msgs, ids


def add_chat_parser(p) -> None:
    add_model_args(p)
    p.add_argument("--system", help="system message that starts the conversation")
    p.add_argument("--plain", action="store_true", help="use the plain User:/Assistant: format even "
                   "when the tokenizer has a chat template")
    add_sampling_args(p, temperature=0.7, top_k=50, top_p=0.95, max_new=256)
    p.add_argument("--raw", action="store_true", help="write control characters as they are even to a terminal "
                   "(by default a terminal gets them escaped; pipes get the plain text)")


def run_chat(args) -> int:
    from ..checkpoint.kinds import LANGUAGE_MODELS, require_kind

    require_kind(args.model, "scalelm chat", LANGUAGE_MODELS)
    sampling = sampling_from_args(args)
    gen = generator_from_args(args)
    if gen.tokenizer is None:
        raise GenerationError(f"{args.model} has no tokenizer.json: chat needs one (pass --tokenizer PATH)")
    tok_dir = Path(args.tokenizer) if args.tokenizer else None
    if tok_dir is not None and not tok_dir.is_dir():
        tok_dir = tok_dir.parent
    fmt = ChatFormat(gen, tok_dir or _ckpt_dir(args.model), plain=args.plain)
    seed = pick_seed(args, sampling)
    interactive = sys.stdin.isatty()
    print(f"chat ({'chat template' if fmt.template else 'plain User:/Assistant: format'}); "
          "/reset forgets, /exit or end of input quits", file=sys.stderr)
    if args.system:
        _check_utf8(args.system, "--system")
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    turn = lineno = 0
    room = min(args.max_new_tokens, gen.cfg.block_size // 4)
    safe = for_stdout(args.raw)
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        lineno += 1
        line = _read_line(lineno)
        if not line:  # end of input
            break
        msg = line.rstrip("\n")
        if msg.strip() in ("/exit", "/quit"):
            break
        if msg.strip() == "/reset":
            history = []
            print("(conversation reset)", file=sys.stderr)
            continue
        if not msg.strip():
            continue
        history.append({"role": "user", "content": msg})
        msgs, ids = fit_context(fmt, system + history, room)
        history = [m for m in msgs if m["role"] != "system"]
        reply = []
        for ev in gen.stream([ids], args.max_new_tokens, sampling=sampling, stop=fmt.stops,
                             seed=None if seed is None else seed + turn, truncate=True):
            text = ev.text.lstrip() if not reply else ev.text  # the reply's leading space
            if text:
                reply.append(text)
                sys.stdout.write(safe(text))
                sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
        turn += 1
    return 0


def _read_line(lineno: int) -> str:
    """One line of stdin, decoded as UTF-8 here so that other bytes get a message, not a traceback."""
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is None:  # a text stream without bytes under it (tests, embedding)
        return sys.stdin.readline()
    raw = stdin.readline()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GenerationError(f"input line {lineno} is not valid UTF-8 (byte {e.start}): use a UTF-8 terminal "
                              "or locale, or convert the input first (e.g. `iconv -f latin1 -t utf-8`)") from None


def _check_utf8(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # argv bytes that were not UTF-8 arrive surrogate-escaped
        raise GenerationError(f"{what} is not valid UTF-8 (at character {e.start}): set a UTF-8 locale "
                              "or encoding in your shell") from None


def _ckpt_dir(path: str) -> Path:
    from ..runs import resolve_checkpoint

    return resolve_checkpoint(path)
