"""Conversations -> token ids with the positions that count in the loss.

Each segment of a rendered conversation (:meth:`~scalelm.data.chat_template.ChatTemplate.segments`)
is tokenized on its own, as ``scalelm chat`` tokenizes a prompt before the model replies, so
training sees the token boundaries inference will see. Text that messages wrote is text: a
control token's string inside a message is tokenized as its characters, as ``scalelm chat`` and
``scalelm serve`` tokenize it (:class:`~scalelm.data.chat_template.ControlTokens`). An example's targets are its next tokens
where the next token is part of a reply (``IGNORE_INDEX`` elsewhere); ``loss_on="all"`` counts
every token instead. Examples longer than the context are cut at the end; one whose reply is cut
away entirely teaches nothing and is dropped (and reported).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np

from ...data.chat_template import ChatTemplate, ControlTokens, Rendered
from ...errors import UserError

LOSS_ON = ("completion", "all")


@dataclass
class Encoded:
    """Token ids (n) and whether each token is supervised (a reply token)."""
    ids: np.ndarray
    sup: np.ndarray

    @property
    def n_supervised(self) -> int:
        return int(self.sup[1:].sum())  # the first token is never a target


@dataclass
class EncodeReport:
    examples: int = 0
    truncated: int = 0
    dropped: list = field(default_factory=list)  # (index, where) of examples without a reply token left
    tokens: int = 0
    supervised_tokens: int = 0

    def as_dict(self) -> dict:
        return {"examples": self.examples, "kept": self.examples - len(self.dropped), "truncated": self.truncated,
                "dropped": len(self.dropped), "tokens": self.tokens, "supervised_tokens": self.supervised_tokens}

    def warn(self, what: str, max_length: int, file=None) -> None:
        if self.dropped:
            first = ", ".join(w for _, w in self.dropped[:5])
            more = f" and {len(self.dropped) - 5} more" if len(self.dropped) > 5 else ""
            print(f"warning: {len(self.dropped)} of {self.examples} {what} examples have no reply token within the "
                  f"context of {max_length} tokens and are skipped: {first}{more}; raise --max-length (up to the "
                  f"model's block_size) or shorten their prompts", file=file or sys.stderr)


class Encoder:
    """Tokenizes conversations with a template; ``max_length`` is the longest input (``block_size``)."""

    def __init__(self, tokenizer, template: ChatTemplate | None, max_length: int, loss_on: str = "completion"):
        if loss_on not in LOSS_ON:
            raise UserError(f"--loss-on must be one of {', '.join(LOSS_ON)}, not {loss_on!r}")
        if max_length < 2:
            raise UserError(f"--max-length {max_length} leaves no room for a prompt and a reply")
        self.tokenizer, self.template, self.max_length, self.loss_on = tokenizer, template, max_length, loss_on
        self.controls = ControlTokens(tokenizer)

    def encode_segments(self, segments: list[tuple[str | Rendered, bool]]) -> Encoded:
        encs = self.controls.encode_batch([s if isinstance(s, Rendered) else Rendered(s) for s, _ in segments])
        ids = np.fromiter((i for e in encs for i in e), dtype=np.int64)
        sup = np.fromiter((r for e, (_, r) in zip(encs, segments) for _ in e), dtype=bool, count=len(ids))
        if self.loss_on == "all":
            sup[:] = True
        return Encoded(ids, sup)

    def encode(self, messages: list[dict], where: str = "") -> Encoded:
        return self.encode_segments(self.template.marked_segments(messages, where, self.controls))

    def encode_all(self, items: list[tuple[str, list]], segments: bool = False
                   ) -> tuple[list[Encoded], list[int], EncodeReport]:
        """``(kept examples, their indices in items, report)``; each cut to ``max_length + 1`` tokens.
        ``items`` are ``(where, messages)``, or ``(where, [(text, is_reply), ...])`` with ``segments``."""
        rep = EncodeReport(examples=len(items))
        out, index = [], []
        for i, (where, msgs) in enumerate(items):
            e = self.encode_segments(msgs) if segments else self.encode(msgs, where)
            if len(e.ids) > self.max_length + 1:
                rep.truncated += 1
                e = Encoded(e.ids[:self.max_length + 1], e.sup[:self.max_length + 1])
            if e.n_supervised == 0:
                rep.dropped.append((i, where))
                continue
            rep.tokens += len(e.ids) - 1
            rep.supervised_tokens += e.n_supervised
            out.append(e)
            index.append(i)
        return out, index, rep


def require_supervision(rep: EncodeReport, path, max_length: int) -> None:
    """A dataset without a single reply token in the context trains nothing: an error."""
    if rep.supervised_tokens == 0:
        raise UserError(f"{path}: none of its {rep.examples} examples has a reply token within the context of "
                        f"{max_length} tokens, so there is nothing to learn: check the fields (--prompt-field/"
                        f"--completion-field), raise --max-length or shorten the prompts")
