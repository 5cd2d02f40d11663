"""Generation with an encoder-decoder: the same ``Generator`` API, with sources as prompts.

``Seq2SeqGenerator(model, tokenizer, eos_ids).generate(sources, ...)`` (and ``stream``,
``beam_search``) encodes each batch of sources once, caches every decoder layer's
cross-attention keys/values (:class:`~scalelm.model.encdec.Seq2SeqCache`), and decodes from the
start token (end-of-text) with the decoder's self-attention KV cache. Everything else (sampling,
stop strings, end-of-text, beams) is the ``Generator``'s own code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..model.encdec import EncoderDecoder, Seq2SeqCache
from .generator import GenerationError, Generator


class Seq2SeqGenerator(Generator):
    """``Seq2SeqGenerator.from_checkpoint(DIR)`` loads an encoder-decoder model directory."""

    seq2seq = True

    def __init__(self, model: EncoderDecoder, tokenizer=None, eos_ids: Sequence[int] = (),
                 bos_id: Optional[int] = None, chat_template: Optional[str] = None, compile: bool = False,
                 pack=False, **speculative):
        if speculative:
            raise GenerationError("speculative decoding is for the GPT; the encoder-decoder decodes one token a step")
        super().__init__(model, tokenizer, eos_ids, bos_id, chat_template, pack=False)
        if compile:
            raise GenerationError("--compile is for the GPT's decode step; the encoder-decoder decodes eagerly")
        if self.bos_id is None:
            raise GenerationError("the encoder-decoder needs a start token: give eos_ids (end-of-text) or bos_id")
        self._step = self._decoder_step
        self._src: Optional[list[list[int]]] = None

    def _decoder_step(self, tok: torch.Tensor, kv_cache: Seq2SeqCache, last_only: bool = True):
        return self.model.step(tok, kv_cache, last_only), None

    # sources in, the decoder's start token as every row's "prompt": generate(), stream() and
    # beam_search() are the Generator's own, budgets included (a row's context is its decoder's)
    def _prompt_rows(self, sources, truncate: bool) -> tuple[list[list[int]], list[int]]:
        srcs, cuts = zip(*(self._prompt_and_cut(s, truncate) for s in self._prompt_list(sources)))
        self._src = list(srcs)
        return [[self.bos_id] for _ in srcs], list(cuts)

    def _new_cache(self, batch_size: int, capacity: int) -> Seq2SeqCache:
        srcs = self._src
        if srcs is None or batch_size % len(srcs):
            raise GenerationError("internal: the sources of this batch are unknown")
        rep = batch_size // len(srcs)  # num_samples > 1 repeats each source
        rows = [s for s in srcs for _ in range(rep)]
        S = max(map(len, rows))
        src = torch.zeros(len(rows), S, dtype=torch.long)
        valid = torch.zeros(len(rows), S, dtype=torch.bool)
        for b, s in enumerate(rows):  # right padding; the mask hides it from every attention
            src[b, :len(s)] = torch.tensor(s)
            valid[b, :len(s)] = True
        with torch.inference_mode():
            return self.model.start(src.to(self.device), valid.to(self.device), capacity, dtype=self.dtype)

    def _prefill(self, cache: Seq2SeqCache, seqs: list[list[int]]) -> torch.Tensor:
        return self.model.step(self._left_padded(cache, seqs), cache)[:, -1]
