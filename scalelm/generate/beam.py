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
greedy decoding, token for token. The repetition penalty, the n-gram ban and ``min_new_tokens``
act on the log-probabilities as in Hugging Face's beam search.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch

from .outputs import Completion, GenerationError
from .sampling import NonFiniteLogits, SamplingParams, apply_repetition_penalty, constrain

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


def _controlled(logp: torch.Tensor, controls: SamplingParams, seqs: list[list[int]], new_tokens: int,
                eos: Sequence[int]) -> torch.Tensor:
    """The beams' log-probabilities (rows: ``seqs``, every one with ``new_tokens`` new tokens) as the
    repetition penalty, the n-gram ban and the least length leave them."""
    if controls.repetition_penalty != 1.0:
        seen = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device)
        for r, s in enumerate(seqs):
            seen[r, s] = True
        logp = apply_repetition_penalty(logp, seen, controls.repetition_penalty)
    return constrain(logp, controls, seqs, [new_tokens] * len(seqs), list(eos))


@torch.inference_mode()
def beam_search(gen, prompts: Union[Prompt, list[Prompt]], num_beams: int = 4,
                max_new_tokens: Union[int, Sequence[int]] = 128, length_penalty: float = 1.0,
                early_stopping: bool = True, truncate: bool = False, ignore_eos: bool = False,
                repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                min_new_tokens: int = 0) -> list[Completion]:
    """The best-scoring continuation of each prompt (one Completion per prompt) of ``gen``, a
    :class:`~scalelm.generate.generator.Generator` (its model, cache and prefill).

    ``repetition_penalty``, ``no_repeat_ngram_size`` and ``min_new_tokens`` act on each beam's
    log-probabilities before they are summed, as Hugging Face's logits processors do in its beam
    search (each beam's sequence is its prompt and its own tokens).

    ``max_new_tokens``: one budget, or one per prompt. The search does not slide the context: a
    prompt's budget is at most what its own context has room for (``stopped_at_context`` when that
    cut it short), whatever the lengths of the other prompts of the batch."""
    if num_beams < 1:
        raise GenerationError(f"num_beams={num_beams} is invalid: must be >= 1")
    if isinstance(max_new_tokens, int) and max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
    import math

    if not math.isfinite(length_penalty):
        raise GenerationError(f"length_penalty={length_penalty} is invalid: must be a finite number")
    controls = SamplingParams(temperature=0.0, repetition_penalty=repetition_penalty,
                              no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens).validate()
    rows, cuts = gen._prompt_rows(prompts, truncate)
    budgets, short = gen.budgets(rows, max_new_tokens, slide=False)
    B, K = len(rows), num_beams
    eos: Sequence[int] = () if ignore_eos else sorted(gen.eos_ids)
    # rows line up at the right (left padding) and keep their own positions, so a short prompt's
    # budget may run past block_size slots: the cache holds every row's prompt and budget, and a
    # finished prompt's beams leave the batch (their positions would run past the context)
    cache = gen._new_cache(B, max(map(len, rows)) + max(budgets) - 1)
    first = gen._prefill(cache, rows)  # (B, V): one prefill per prompt, then K copies of it
    cache.index_rows(torch.arange(B, device=gen.device).repeat_interleave(K))
    logits = first.repeat_interleave(K, dim=0)
    active = list(range(B))  # the prompts in the cache, K rows each
    beam_lp = torch.full((B, K), float("-inf"), device=gen.device, dtype=torch.float32)
    beam_lp[:, 0] = 0.0  # at the start the K beams are one: only the first may extend
    tokens: list[list[list[int]]] = [[[] for _ in range(K)] for _ in range(B)]  # [prompt][beam]
    hyps = [_Hypotheses(K, length_penalty, early_stopping) for _ in range(B)]
    V = logits.shape[-1]
    n_cand = K * (1 + len(eos))  # enough that K candidates survive even if every beam ends
    for step in range(max(budgets)):
        A = len(active)
        logp = torch.log_softmax(logits.float(), dim=-1)
        if controls.repetition_penalty != 1.0 or controls.constrains:
            logp = _controlled(logp, controls, [list(rows[b]) + tokens[b][k] for b in active for k in range(K)],
                               step, eos)
        scores = (beam_lp.view(A * K, 1) + logp).view(A, K * V)
        top_lp, top_idx = scores.topk(min(n_cand, K * V), dim=1)
        top_lp, top_idx = top_lp.tolist(), top_idx.tolist()  # one host sync per step
        bad = next((b for j, b in enumerate(active) if top_lp[j] and top_lp[j][0] != top_lp[j][0]), None)  # NaN first
        if bad is not None:  # logits with a NaN or inf (a broken model or graph): no beam can be scored
            raise NonFiniteLogits(step + 1, bad)
        new_lp = torch.full((A, K), float("-inf"), dtype=torch.float32)
        order, next_tok = [], []
        for j, b in enumerate(active):
            kept, beams = 0, []
            for rank, (lp, idx) in enumerate(zip(top_lp[j], top_idx[j])):
                if kept == K:
                    break
                beam, tok = divmod(idx, V)
                if lp == float("-inf"):
                    continue
                if tok in eos:
                    if rank < K:
                        hyps[b].add(lp, list(tokens[b][beam]), "eos")
                    continue
                new_lp[j, kept] = lp
                order.append(j * K + beam)
                next_tok.append(tok)
                beams.append(tokens[b][beam] + [tok])
                kept += 1
            while kept < K:  # fewer live candidates than beams (tiny vocab): pad with dead rows
                order.append(j * K)
                next_tok.append(0)
                beams.append(list(tokens[b][0]))
                kept += 1
            tokens[b] = beams
        length = step + 1
        keep = []
        for j, b in enumerate(active):
            if hyps[b].done(float(new_lp[j].max()), length):
                continue
            if length >= budgets[b]:  # out of tokens or context: the live beams are finished too
                for k in range(K):
                    lp = float(new_lp[j, k])
                    if lp > float("-inf"):
                        hyps[b].add(lp, tokens[b][k], "length")
                continue
            keep.append(j)
        if not keep:
            break
        if len(keep) < A:
            rows_kept = [j * K + k for j in keep for k in range(K)]
            order, next_tok = [order[r] for r in rows_kept], [next_tok[r] for r in rows_kept]
            new_lp, active = new_lp[keep], [active[j] for j in keep]
        beam_lp = new_lp.to(gen.device)
        cache.index_rows(torch.tensor(order, device=gen.device))
        logits = gen._step(torch.tensor(next_tok, device=gen.device)[:, None], kv_cache=cache,
                           last_only=True)[0][:, -1]
    out = []
    for b in range(B):
        _, toks, reason = hyps[b].items[0]
        c = Completion(b, list(rows[b]), list(toks), gen.decode(toks) if gen.tokenizer is not None else "", reason,
                       prompt_cut_tokens=cuts[b], stopped_at_context=short[b] and reason == "length")
        out.append(c)
    return out


# ----------------------------------------------------------------------------- `scalelm generate --beams N`

# what only sampling, streaming or speculative decoding use: refused with --beams above 1, where
# it would be silently ignored (the search is deterministic and knows its best text only at the end)
_NOT_WITH_BEAMS = {"temperature": "--temperature", "top_k": "--top-k", "top_p": "--top-p", "seed": "--seed",
                   "num_samples": "--num-samples", "stream": "--stream", "stop": "--stop", "draft": "--draft",
                   "prompt_lookup": "--prompt-lookup", "speculate_k": "--speculate-k", "backend": "--backend",
                   "json_schema": "--json-schema", "regex": "--regex", "choice": "--choice"}


def add_beam_args(p) -> None:
    """``--beams N``. Add it after the sampling and speculative options: it records their defaults,
    so that :func:`check_beam_args` can tell which of them were given."""
    p.add_argument("--beams", type=int, default=1, metavar="N",
                   help="beam search with N beams: the most likely continuation of each prompt, deterministic "
                        "(default 1: decode as the sampling options say)")
    p.add_argument("--length-penalty", type=float, default=1.0,
                   help="with --beams: a finished beam scores log-probability / length ** this (HF's; > 1 favours "
                        "longer outputs, < 1 shorter; default 1)")
    p.set_defaults(beam_conflict_defaults={d: p.get_default(d) for d in _NOT_WITH_BEAMS
                                           if d in {a.dest for a in p._actions}})


def check_beam_args(args) -> bool:
    """True when ``args`` ask for beam search; refuses the options beam search cannot honour."""
    if args.beams < 1:
        raise GenerationError(f"--beams={args.beams} is invalid: must be >= 1 (1: no beam search)")
    if args.beams == 1:
        if getattr(args, "length_penalty", 1.0) != 1.0:
            raise GenerationError("--length-penalty weighs finished beams: it is for --beams above 1")
        return False
    defaults = getattr(args, "beam_conflict_defaults", {})
    given = [opt for dest, opt in _NOT_WITH_BEAMS.items() if dest in defaults and getattr(args, dest) != defaults[dest]]
    if given:
        raise GenerationError(f"--beams {args.beams} searches for the most likely continuation; {', '.join(given)} "
                              f"belong{'s' if len(given) == 1 else ''} to sampling, streaming or speculative decoding "
                              f"(with --beams 1): leave {'it' if len(given) == 1 else 'them'} out")
    return True
