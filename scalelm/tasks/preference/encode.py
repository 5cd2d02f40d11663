"""Pairs -> token ids: each reply rendered after its prompt with the chat template, as SFT renders
a conversation (only the reply's tokens are targets), both replies cut to the same prompt.

A pair longer than the context (``max_length`` + 1 tokens) keeps the end of its prompt (the turn
being answered) and the start of its replies: the replies are cut to what is left after the
prompt, but never below half the context, then the prompt loses its oldest tokens. Such pairs are
counted as truncated; a pair with no reply token left is dropped (both reported).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..sft.encode import Encoded, Encoder
from .pairs import Pair


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded

    @property
    def n_tokens(self) -> int:
        return len(self.chosen.ids) + len(self.rejected.ids) - 2


@dataclass
class PairReport:
    pairs: int = 0
    truncated: int = 0
    dropped: list = field(default_factory=list)  # where


def _fit(e: Encoded, prompt_len: int, keep_prompt: int, keep_reply: int) -> Encoded:
    s = slice(prompt_len - keep_prompt, prompt_len + keep_reply)
    return Encoded(e.ids[s], e.sup[s])


def _last_reply_only(e: Encoded) -> Encoded:
    """Targets on the final reply only: earlier assistant turns of a multi-turn prompt are context."""
    sup = e.sup.copy()
    if sup.any():
        end = len(sup) - int(np.argmax(sup[::-1]))  # one past the last reply token
        start = end
        while start > 0 and sup[start - 1]:
            start -= 1
        sup[:start] = False
    return Encoded(e.ids, sup)


def encode_pair(enc: Encoder, pair: Pair) -> tuple[EncodedPair | None, bool]:
    """``(encoded pair or None if no reply token fits, truncated?)``."""
    c = _last_reply_only(enc.encode(pair.prompt + [{"role": "assistant", "content": pair.chosen}], pair.where))
    r = _last_reply_only(enc.encode(pair.prompt + [{"role": "assistant", "content": pair.rejected}], pair.where))
    p = int(np.argmax(c.sup)) if c.sup.any() else len(c.ids)  # the prompt: every token before the reply's first
    limit = enc.max_length + 1
    longest = max(len(c.ids), len(r.ids)) - p
    if p + longest <= limit:
        return EncodedPair(c, r), False
    keep_reply = min(longest, max(limit - p, limit // 2))
    keep_prompt = min(p, limit - keep_reply)
    c, r = _fit(c, p, keep_prompt, keep_reply), _fit(r, p, keep_prompt, keep_reply)
    if c.n_supervised == 0 or r.n_supervised == 0:
        return None, True
    return EncodedPair(c, r), True


def encode_pairs(enc: Encoder, pairs: list[Pair]) -> tuple[list[EncodedPair], PairReport]:
    rep, out = PairReport(pairs=len(pairs)), []
    for pair in pairs:
        e, cut = encode_pair(enc, pair)
        rep.truncated += cut
        if e is None:
            rep.dropped.append(pair.where)
        else:
            out.append(e)
    return out, rep
