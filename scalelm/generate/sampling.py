"""Choosing the next token: greedy, temperature, top-k, top-p (nucleus), and the controls every
decoding takes (beam search too): repetition penalty, no repeated n-gram, a least number of new
tokens. Each behaves as the Hugging Face ``generate`` logits processor of the same name.

All functions work on a batch of last-position logits ``(B, V)`` and never leave the device,
so a decode step needs no host round trip until the caller asks for the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import UserError
from .outputs import GenerationError


class SamplingError(UserError, ValueError):
    """A sampling setting outside its valid range."""


class NonFiniteLogits(GenerationError):
    """The model gave logits that are no distribution (NaN or inf): broken weights or a broken graph."""

    def __init__(self, new_token: int, row: int):
        super().__init__(f"the model's logits for new token {new_token} (row {row}) are not finite (NaN or inf): its "
                         f"weights or its ONNX graph are broken; check a checkpoint with `scalelm eval`, export "
                         f"an ONNX graph again")


NON_FINITE = -1  # the id next_token_checked gives a row whose logits are not finite


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches p; 1 = off
    repetition_penalty: float = 1.0  # >1 discourages tokens already in the sequence; 1 = off
    no_repeat_ngram_size: int = 0  # never complete an n-gram already in the sequence; 0 = off
    min_new_tokens: int = 0  # end-of-text is banned until this many tokens are generated; 0 = off

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        import math

        def bad(name: str, value, valid: str) -> SamplingError:
            return SamplingError(f"{name}={value} is invalid: must be {valid}")

        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", self.temperature, ">= 0 (0 = greedy)")
        if self.top_k < 0:
            raise bad("top_k", self.top_k, ">= 0 (0 = off)")
        if not (0.0 < self.top_p <= 1.0):
            raise bad("top_p", self.top_p, "in (0, 1] (1 = off)")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "> 0 (1 = off, > 1 penalizes repeats)")
        if self.no_repeat_ngram_size < 0:
            raise bad("no_repeat_ngram_size", self.no_repeat_ngram_size, ">= 0 (0 = off)")
        if self.min_new_tokens < 0:
            raise bad("min_new_tokens", self.min_new_tokens, ">= 0 (0 = off)")
        return self

    @property
    def constrains(self) -> bool:
        """Whether :func:`constrain` has anything to do."""
        return self.no_repeat_ngram_size > 0 or self.min_new_tokens > 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty as in HF: seen tokens' positive logits are divided, negative multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def banned_ngram_tokens(seq: list[int], n: int) -> list[int]:
    """The tokens that would complete an ``n``-gram already in ``seq``: those that followed an
    earlier occurrence of its last ``n - 1`` tokens (Hugging Face's ``NoRepeatNGramLogitsProcessor``;
    with ``n = 1``, every token of ``seq``)."""
    if n <= 0 or len(seq) + 1 < n:
        return []
    tail = seq[len(seq) - n + 1:]
    return [seq[i + n - 1] for i in range(len(seq) - n + 1) if seq[i:i + n - 1] == tail]


def constrain(scores: torch.Tensor, params: SamplingParams, seqs: list[list[int]], new_tokens: list[int],
              eos_ids) -> torch.Tensor:
    """``scores`` (B, V) with what ``params`` forbid set to -inf: the tokens completing a repeated
    n-gram of each row's whole sequence ``seqs[b]`` (the prompt included, as Hugging Face's
    ``generate`` does; an encoder-decoder's rows are its decoder's, from the start token), and
    end-of-text while row ``b`` has fewer than ``min_new_tokens`` new tokens (``new_tokens[b]``).
    Works on logits (sampling, greedy) and log-probabilities (beam search) alike."""
    if not params.constrains:
        return scores
    rows, cols = [], []
    for b, seq in enumerate(seqs):
        ban = banned_ngram_tokens(seq, params.no_repeat_ngram_size) if params.no_repeat_ngram_size else []
        if new_tokens[b] < params.min_new_tokens:
            ban = [*ban, *eos_ids]
        rows += [b] * len(ban)
        cols += ban
    if not rows:
        return scores
    scores = scores.clone()
    scores[torch.tensor(rows, device=scores.device), torch.tensor(cols, device=scores.device)] = float("-inf")
    return scores


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability mass reaches ``p`` (at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # drop a token when the mass before it already reaches p; the top token always stays
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop_sorted[..., 0] = False  # explicitly: a p below float32's smallest value would round to 0 and drop it
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_token(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
               seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Next token ids ``(B,)`` from last-position logits ``(B, V)``."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    logits = filter_top_p(filter_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def next_token_checked(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None,
                       seen: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`next_token`, except that a row whose logits are no distribution (a NaN or +inf
    anywhere, or all -inf) gets ``NON_FINITE`` instead of a token: sampling it would raise, and the
    argmax of NaNs is a meaningless id. Flagged in the ids, so the check costs no host sync of its
    own: the caller reads the ids back anyway and stops with :class:`NonFiniteLogits`."""
    bad = ~torch.isfinite(logits.amax(dim=-1))  # amax is NaN when any logit is
    tok = next_token(logits.masked_fill(bad[:, None], 0.0), params, generator, seen)
    return tok.masked_fill(bad, NON_FINITE)
