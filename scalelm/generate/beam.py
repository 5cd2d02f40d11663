"""Beam search on the KV cache, batched over prompts: ``Generator.beam_search``.

Each prompt is prefilled once; its cache is then copied to ``num_beams`` rows, so the beams share
the prompt's prefill. Every step scores all ``beams x vocab`` continuations of a prompt by their
summed log-probability, keeps the best ``num_beams`` that do not end, and sets aside the ones that
end (end-of-text) as finished hypotheses, scored by ``sum_logprob / length ** length_penalty``
(``length`` counts the generated tokens, end-of-text included). The cache rows are reordered to
follow the surviving beams.

A prompt is done when it has ``num_beams`` finished hypotheses and either ``early_stopping`` or
no live beam can still beat the worst of them (the same rule as Hugging Face's ``generate``).
At ``max_new_tokens`` (or a full context) the live beams count as finished. With one beam this is
greedy decoding, token for token.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .outputs import Completion, GenerationError

Prompt = Union[str, Sequence[int]]


class _Hypotheses:
    """The finished hypotheses of one prompt, best ``n`` kept."""

    def __init__(self, n: int, length_penalty: float, early_stopping: bool):
        self.n, self.lp, self.early = n, length_penalty, early_stopping
        self.items: list[tuple[float, list[int], str]] = []

    def score(self, logprob: float, length: int) -> float:
        return logprob / (max(length, 1) ** self.lp)

    def add(self, logprob: float, tokens: list[int], reason: str) -> None:
        self.items.append((self.score(logprob, len(tokens) + (reason == "eos")), tokens, reason))
        self.items.sort(key=lambda h: -h[0])
        del self.items[self.n:]

    def done(self, best_live_logprob: float, length: int) -> bool:
        if len(self.items) < self.n:
            return False
        return self.early or self.items[-1][0] >= self.score(best_live_logprob, length)


@torch.inference_mode()
def beam_search(gen, prompts: Union[Prompt, list[Prompt]], num_beams: int = 4,
                max_new_tokens: int = 128, length_penalty: float = 1.0, early_stopping: bool = True,
                truncate: bool = False, ignore_eos: bool = False) -> list[Completion]:
    """The best-scoring continuation of each prompt (one Completion per prompt) of ``gen``, a
    :class:`~scalelm.generate.generator.Generator` (its model, cache and prefill)."""
    if num_beams < 1:
        raise GenerationError(f"num_beams={num_beams} is invalid: must be >= 1")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
    rows = [gen.prompt_ids(p, truncate) for p in ([prompts] if single else list(prompts))]
    if not rows:
        raise GenerationError("no prompt given")
    B, K, cfg = len(rows), num_beams, gen.cfg
    eos: Sequence[int] = () if ignore_eos else sorted(gen.eos_ids)
    capacity = min(cfg.block_size, max(map(len, rows)) + max_new_tokens)
    cache = gen._new_cache(B, capacity)
    first = gen._prefill(cache, rows)  # (B, V): one prefill per prompt, then K copies of it
    cache.index_rows(torch.arange(B, device=gen.device).repeat_interleave(K))
    logits = first.repeat_interleave(K, dim=0)
    beam_lp = torch.full((B, K), float("-inf"), device=gen.device, dtype=torch.float32)
    beam_lp[:, 0] = 0.0  # at the start the K beams are one: only the first may extend
    tokens: list[list[int]] = [[] for _ in range(B * K)]
    hyps = [_Hypotheses(K, length_penalty, early_stopping) for _ in range(B)]
    done = [False] * B
    V = logits.shape[-1]
    n_cand = K * (1 + len(eos))  # enough that K candidates survive even if every beam ends
    for step in range(max_new_tokens):
        logp = torch.log_softmax(logits.float(), dim=-1)
        scores = (beam_lp.view(B * K, 1) + logp).view(B, K * V)
        top_lp, top_idx = scores.topk(min(n_cand, K * V), dim=1)
        top_lp, top_idx = top_lp.tolist(), top_idx.tolist()  # one host sync per step
        new_lp = torch.full((B, K), float("-inf"), dtype=torch.float32)
        order, next_tok, new_tokens = [], [], []
        for b in range(B):
            kept = 0
            for rank, (lp, idx) in enumerate(zip(top_lp[b], top_idx[b])):
                if kept == K:
                    break
                beam, tok = divmod(idx, V)
                src = b * K + beam
                if lp == float("-inf"):
                    continue
                if tok in eos:
                    if rank < K and not done[b]:
                        hyps[b].add(lp, list(tokens[src]), "eos")
                    continue
                new_lp[b, kept] = lp
                order.append(src)
                next_tok.append(tok)
                new_tokens.append(tokens[src] + [tok])
                kept += 1
            while kept < K:  # fewer live candidates than beams (tiny vocab): pad with dead rows
                order.append(b * K)
                next_tok.append(0)
                new_tokens.append(list(tokens[b * K]))
                kept += 1
        beam_lp = new_lp.to(gen.device)
        tokens = new_tokens
        length = step + 1
        for b in range(B):
            if not done[b]:
                done[b] = hyps[b].done(float(new_lp[b].max()), length)
        if all(done) or step == max_new_tokens - 1 or cache.pos >= cache.max_len:
            break
        cache.index_rows(torch.tensor(order, device=gen.device))
        logits = gen._step(torch.tensor(next_tok, device=gen.device)[:, None], kv_cache=cache,
                           last_only=True)[0][:, -1]
    out = []
    for b in range(B):
        if not done[b]:  # out of tokens or context: the live beams are finished too
            for k in range(K):
                lp = float(beam_lp[b, k])
                if lp > float("-inf"):
                    hyps[b].add(lp, tokens[b * K + k], "length")
        _, toks, reason = hyps[b].items[0]
        c = Completion(b, list(rows[b]), list(toks), gen.decode(toks) if gen.tokenizer is not None else "", reason)
        out.append(c)
    return out
