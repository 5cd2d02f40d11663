"""Speculative decoding: a cheap proposer drafts up to k tokens, the target checks them in one forward.

Python API (a :class:`Generator` with a proposer hands its decoding to :class:`Speculator`)::

    gen = Generator.from_checkpoint("runs/big", draft="runs/small", speculate_k=4)
    gen = Generator.from_checkpoint("runs/big", prompt_lookup=3)       # n-gram drafts, no draft model
    gen = Generator(model, tokenizer, eos_ids, draft=small_model)      # in-memory models
    out = gen.generate("To be", max_new_tokens=50, sampling=SamplingParams(temperature=0))
    print(out[0].text, out[0].acceptance_rate)                         # a SpecCompletion

Proposers: a draft model (same token ids as the target; its own KV cache), or prompt lookup:
the longest suffix of the row (prompt + generated, at most N tokens) that occurred before in it,
and the up to k tokens that followed its most recent occurrence (no model; Saxena 2023).

What is guaranteed. Greedy: the target's argmax at every position, so the tokens are plain greedy
decoding's (the target sees the same context; only float rounding of a k+1-token forward against a
1-token one could break a near-tie). Sampling: draft token x at a position is accepted with
probability min(1, p(x)/q(x)), else the token is drawn from norm(max(0, p - q)); after k accepted
drafts one more token is drawn from p (Leviathan et al. 2023; Chen et al. 2023). p and q are the
target's and the proposer's *sampling* distributions, after the same repetition penalty,
temperature, top-k and top-p (``scalelm.generate.sampling``), so each token is distributed exactly
as plain sampling's (prompt lookup is a proposer whose q puts all mass on its token). The random
draws differ, so a seed reproduces speculative samples but not plain ones. End-of-text, stop
strings, ``max_new_tokens`` and the events of ``stream`` behave as in :class:`Generator`.

Batches: rows accept different numbers of drafts, but a :class:`PreallocatedKVCache` has one fill
position for the batch. After each step every row's cache is shifted so that all rows end at the same
slot again, with left padding for the shorter ones: the cache's per-row ``start`` moves with the
keys, so position ids and the padding mask stay right and nothing is recomputed. The cost is one
copy per step of the kept keys and values of each row whose padding changed (the same bytes the
next attention reads), and the cache holds the longest row, plus k slots for the drafts. The
alternative of keeping rejected slots as holes would need a per-slot mask and k+1 slots per step
whatever was accepted; keeping the batch's shortest acceptance would re-feed the others' tokens.
Finished rows stay in the batch (as in plain decoding) but are not copied or drafted for.
When the target's context is full the window slides exactly as in plain decoding (so a single row
gives plain greedy's tokens even past the context); a batch slides when its longest row fills it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from ..model.gpt import GPT
from ..model.io import load_model_dir
from ..model.kv_cache import PreallocatedKVCache
from ..runs import TOKENIZER, resolve_checkpoint
from .cpu_layout import pack_linears, param_count, shallow_copy, should_pack
from .outputs import Completion, Event, GenerationError
from .sampling import SamplingParams, apply_repetition_penalty, filter_top_k, filter_top_p
from .textstream import TextStream


@dataclass
class SpecCompletion(Completion):
    drafted: int = 0  # draft tokens proposed for this row
    accepted: int = 0  # of which the target accepted
    steps: int = 0  # target forwards while the row was generating

    @property
    def acceptance_rate(self) -> Optional[float]:
        return self.accepted / self.drafted if self.drafted else None


def sampling_dist(logits: torch.Tensor, sampling: SamplingParams, seen: Optional[torch.Tensor]) -> torch.Tensor:
    """What :func:`~scalelm.generate.sampling.next_token` samples from, for logits ``(..., V)``:
    the penalized logits when greedy (take the argmax), else the filtered probabilities."""
    logits = logits.float()
    if seen is not None and sampling.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return logits
    return filter_top_p(filter_top_k(logits / sampling.temperature, sampling.top_k), sampling.top_p).softmax(-1)


def lookup_proposal(seq: Sequence[int], max_ngram: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix of
    ``seq`` of at most ``max_ngram`` tokens ([] if no suffix occurred before)."""
    L = len(seq)
    if L < 2:
        return []
    a = np.asarray(seq)
    for n in range(min(max_ngram, L - 1), 0, -1):
        # starts i <= L - 1 - n: each occurrence has a continuation, the suffix itself is left out
        hit = a[:L - n] == a[L - n]
        for j in range(1, n):
            hit &= a[j:L - n + j] == a[L - n + j]
        hits = np.flatnonzero(hit)
        if hits.size:
            i = int(hits[-1]) + n
            return [int(t) for t in a[i:i + k]]
    return []


class _CachedLM:
    """One model with a KV cache over a batch of growing token lists.

    Row b's cache holds the first ``held[b]`` tokens of ``seq_b[off[b]:]`` (``off`` > 0 once the
    window slid) in slots ``[lo[b], cache.pos)``, possibly followed by fed drafts that are not in
    the sequence (yet); ``truncate`` drops what the sequence did not keep. Rows in ``dead`` are
    finished: their slots are not kept.
    """

    def __init__(self, model: GPT, batch: int, capacity: int, device, dtype):
        self.model = model
        bs = model.cfg.block_size
        self.window = max(1, bs - bs // 4)  # tokens kept when the window slides, as Generator.window_keep
        self.cache = PreallocatedKVCache(model.cfg, batch, max_len=min(bs, capacity), device=device,
                                         dtype=dtype)
        self.off, self.held, self.lo = [0] * batch, [0] * batch, [0] * batch
        self.dead: set[int] = set()

    def _plan(self, seqs: list[list[int]]):
        """F: tokens every row feeds (the most any row lacks); keep: tokens each row keeps (< 0: padding)."""
        live = [b for b in range(len(seqs)) if b not in self.dead]
        F = max([1] + [len(seqs[b]) - self.off[b] - self.held[b] for b in live])
        keep = [len(s) - o - F if b not in self.dead else 1 - F for b, (s, o) in enumerate(zip(seqs, self.off))]
        return F, keep, max([0] + [keep[b] for b in live])

    def _slide(self, seqs: list[list[int]]) -> None:
        """As plain decoding does when the context is full: start again from each row's last tokens."""
        self.off = [max(0, len(s) - self.window) for s in seqs]
        self.held = [0] * len(seqs)

    def room(self, seqs: list[list[int]], need: int = 0) -> int:
        """Extra tokens (drafts) that fit after this step's feed; slides the window first when fewer than ``need``."""
        F, _, E = self._plan(seqs)
        if self.cache.max_len - E - F < need:
            self._slide(seqs)
            F, _, E = self._plan(seqs)
        return self.cache.max_len - E - F

    def _realign(self, keep: list[int], E: int) -> None:
        """Shift each row's kept slots so that every row ends at slot E (left padding for the shorter)."""
        cache, dev = self.cache, self.cache.k.device
        start = [E - h for h in keep]
        rows = [b for b, (h, s, lo) in enumerate(zip(keep, start, self.lo)) if h > 0 and s != lo]
        if rows:
            r = torch.tensor(rows, device=dev)
            shift = torch.tensor([start[b] - self.lo[b] for b in rows], device=dev)
            src = (torch.arange(E, device=dev)[None] - shift[:, None]).clamp(0, cache.max_len - 1)  # (R, E)
            for buf in (cache.k, cache.v):  # gathered (R, E, L, H, D), written back as (L, R, H, E, D)
                buf[:, r, :, :E] = buf[:, r[:, None], :, src].permute(2, 0, 3, 1, 4)
        cache.reset(torch.tensor(start, device=dev) if max(start) > 0 else None)
        cache.pos = E
        self.lo = start

    def forward(self, seqs: list[list[int]], extra: Optional[torch.Tensor] = None,
                all_logits: bool = False) -> torch.Tensor:
        """Feed what each row lacks, then ``extra`` (B, X); logits (B, X+1, V), or (B, V) of the last token."""
        X = 0 if extra is None else extra.shape[1]
        F, keep, E = self._plan(seqs)
        if E + F + X > self.cache.max_len:
            self._slide(seqs)
            F, keep, E = self._plan(seqs)
        assert E + F + X <= self.cache.max_len, "room() was not asked"
        self._realign(keep, E)
        tails = [[0] * F if b in self.dead else s[max(o, len(s) - F):]
                 for b, (s, o) in enumerate(zip(seqs, self.off))]
        idx = torch.tensor([[0] * (F - len(t)) + t for t in tails], device=self.cache.k.device)
        if extra is not None:
            idx = torch.cat([idx, extra], dim=1)
        if all_logits and F > 1:  # a prefill: logits of its last token only
            self.model(idx[:, :F - 1], kv_cache=self.cache, last_only=True)
            idx = idx[:, F - 1:]
        logits = self.model(idx, kv_cache=self.cache, last_only=not all_logits)[0]
        self.held = [len(s) - o + X for s, o in zip(seqs, self.off)]
        return logits if all_logits else logits[:, -1]

    def push(self, tok: torch.Tensor) -> torch.Tensor:
        """Feed one more token per row (B,) after ``forward``; last-position logits (B, V)."""
        logits = self.model(tok[:, None], kv_cache=self.cache, last_only=True)[0][:, -1]
        self.held = [h + 1 for h in self.held]
        return logits

    def truncate(self, valid: list[int]) -> None:
        """Row b's sequence agrees with what was fed for its first ``valid[b]`` tokens."""
        self.held = [min(h, v - o) for h, v, o in zip(self.held, valid, self.off)]


def verify(logits: torch.Tensor, drafts: torch.Tensor, q: Optional[torch.Tensor], proposed: torch.Tensor,
           sampling: SamplingParams, gen: Optional[torch.Generator],
           seen: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Accepted drafts per row (B,) and the token after them (B,).

    ``logits`` (B, X+1, V): the target's after each of the X drafts (B, X) and before the first;
    ``q`` (B, X, V): the proposer's sampling distributions (None: it proposed deterministically);
    ``proposed`` (B, X): which drafts are real (the others are always rejected with q = 0)."""
    B, X = drafts.shape
    V = logits.shape[-1]
    if seen is not None:  # position j has seen the drafts before it too
        after = torch.zeros(B, X + 1, V, dtype=torch.int32, device=logits.device)
        after[:, 1:].scatter_(2, drafts[..., None], 1)
        seen = (after.cumsum(1) > 0) | seen[:, None]
    p = sampling_dist(logits, sampling, seen)
    rows = torch.arange(B, device=logits.device)
    if sampling.greedy:
        best = p.argmax(-1)  # (B, X+1)
        ok = (best[:, :X] == drafts) & proposed
        n = ok.int().cumprod(1).sum(1)
        return n, best[rows, n]
    px = p[:, :X].gather(-1, drafts[..., None]).squeeze(-1)
    qx = torch.ones_like(px) if q is None else q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, X, generator=gen, device=logits.device)
    ok = (u * qx < px) & proposed  # u < p(x)/q(x): accepted with probability min(1, p(x)/q(x))
    n = ok.int().cumprod(1).sum(1)
    pn = p[rows, n]  # (B, V)
    if X:
        j = n.clamp(max=X - 1)
        qn = torch.nn.functional.one_hot(drafts[rows, j], V).float() if q is None else q[rows, j]
        rejected = (n < X) & proposed[rows, j]
        resid = torch.where(rejected[:, None], (pn - qn).clamp(min=0), pn)
        # p == q up to rounding leaves nothing: then p itself (the rejection had probability ~0)
        pn = torch.where(resid.sum(-1, keepdim=True) > 0, resid, pn)
    return n, torch.multinomial(pn, 1, generator=gen).squeeze(-1)


class Speculator:
    """The proposer a :class:`Generator` decodes with when given ``draft=`` or ``prompt_lookup=``."""

    def __init__(self, gen, draft: Optional[GPT] = None, speculate_k: int = 4, prompt_lookup: int = 0,
                 compile: bool = False, pack: Union[bool, str] = "auto"):
        if compile:
            raise GenerationError("--compile does not apply to speculative decoding (it compiles the one-token "
                                  "step; speculative steps feed several tokens): leave it out")
        if speculate_k < 1:
            raise GenerationError(f"speculate_k={speculate_k} is invalid: must be >= 1 (tokens proposed per step)")
        if prompt_lookup < 0:
            raise GenerationError(f"prompt_lookup={prompt_lookup} is invalid: must be >= 1 (the longest n-gram), "
                                  "0 = off")
        if (draft is None) == (prompt_lookup == 0):
            raise GenerationError("give a draft model or prompt lookup (--draft or --prompt-lookup N), not both")
        self.k, self.lookup, self.draft = speculate_k, prompt_lookup, None
        if draft is not None:
            check_vocab(draft, gen.model, "the draft model", "the target model")
            dev = next(draft.parameters()).device
            if dev != gen.device:
                raise GenerationError(f"the draft model is on {dev} but the target model on {gen.device}: "
                                      "move both to one device")
            # the decoding copy Generator makes of its own model (shares the weights)
            packed = pack is True or (pack == "auto" and should_pack(dev))
            self.draft = (pack_linears(draft) if packed else shallow_copy(draft)).eval()

    def describe(self) -> str:
        what = (f"a {self.draft.cfg.n_layer}-layer draft ({param_count(self.draft.cfg) / 1e6:.2f}M params)" if self.draft is not None else f"prompt lookup (n-grams of up to {self.lookup} tokens)")
        return f"speculative decoding: {what}, up to {self.k} tokens proposed per step"

    def _propose(self, drafter: Optional[_CachedLM], seqs: list[list[int]], left: list[int], X: int,
                 sampling: SamplingParams, rng: Optional[torch.Generator], seen: Optional[torch.Tensor], dev):
        """Drafts (B, X), their distributions (B, X, V) or None, and how many are real per row (B,) or None."""
        if drafter is None:  # prompt lookup
            props = [lookup_proposal(s, self.lookup, min(X, n)) if n > 0 else [] for s, n in zip(seqs, left)]
            X = max(map(len, props))
            drafts = torch.tensor([p + [0] * (X - len(p)) for p in props], dtype=torch.long, device=dev)
            return drafts, None, torch.tensor([len(p) for p in props], device=dev)
        seen = seen.clone() if seen is not None else None
        logits = drafter.forward(seqs)
        ds, qs = [], []
        for j in range(X):
            dist = sampling_dist(logits, sampling, seen)
            d = dist.argmax(-1) if sampling.greedy else torch.multinomial(dist, 1, generator=rng).squeeze(-1)
            ds.append(d)
            qs.append(dist)
            if j < X - 1:
                if seen is not None:
                    seen.scatter_(1, d[:, None], True)
                logits = drafter.push(d)
        return torch.stack(ds, 1), None if sampling.greedy else torch.stack(qs, 1), None

    @torch.inference_mode()
    def decode(self, gen, rows: list[list[int]], max_new: int, sampling: SamplingParams, stops: list[str],
               rng: Optional[torch.Generator], eos: frozenset, done: dict[int, Completion]) -> Iterator[Event]:
        """What ``Generator._decode`` does, speculatively: the same events and completions."""
        B, k, dev = len(rows), self.k, gen.device
        room = max(map(len, rows)) + max_new + k
        target = _CachedLM(gen.model, B, room, dev, gen.dtype)
        drafter = None if self.draft is None else _CachedLM(self.draft, B, room, dev, gen.dtype)
        models = [m for m in (target, drafter) if m is not None]
        seqs = [list(r) for r in rows]
        texts = [TextStream(gen.tokenizer, r, stops) for r in rows]
        comps = [SpecCompletion(i, list(r)) for i, r in enumerate(rows)]
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(B, gen.cfg.vocab_size, dtype=torch.bool, device=dev)
            for b, r in enumerate(rows):
                seen[b, r] = True
        live = list(range(B))
        while live:
            left = [0] * B  # drafts worth making per row
            for b in live:
                left[b] = max_new - len(comps[b].tokens) - 1
            X = min(k, target.room(seqs), max(left))
            if X > 0 and drafter is not None:
                X = min(X, drafter.room(seqs, need=X - 1) + 1)
            drafts = torch.zeros(B, 0, dtype=torch.long, device=dev)
            q = nprop = None
            if X > 0:
                drafts, q, nprop = self._propose(drafter, seqs, left, X, sampling, rng, seen, dev)
                X = drafts.shape[1]
            cap = torch.tensor(left, device=dev)
            cap = cap if nprop is None else torch.minimum(cap, nprop)
            proposed = torch.arange(X, device=dev)[None] < cap[:, None]
            logits = target.forward(seqs, drafts if X else None, all_logits=True)
            n, t = verify(logits, drafts, q, proposed, sampling, rng, seen)
            host = torch.cat([drafts, n[:, None], t[:, None], proposed.sum(1, keepdim=True)], 1).tolist()
            before = [len(s) for s in seqs]
            still = []
            for b in live:
                *d, nb, tb, pb = host[b]
                c = comps[b]
                c.steps, c.drafted, c.accepted = c.steps + 1, c.drafted + pb, c.accepted + nb
                ended = yield from _emit(gen, b, d[:nb] + [tb], c, seqs[b], texts[b], eos, max_new, done)
                if not ended:
                    still.append(b)
                if seen is not None and len(seqs[b]) > before[b]:
                    seen[b, seqs[b][before[b]:]] = True
            valid = [min(before[b] + host[b][X], len(seqs[b])) for b in range(B)]
            for m in models:
                m.truncate(valid)
                m.dead.update(set(live) - set(still))
            live = still


def _emit(gen, b: int, new: list[int], c: Completion, seq: list[int], text: TextStream, eos: frozenset,
          max_new: int, done: dict):
    """Events for row b's new tokens, as plain decoding yields them; True when the row ended."""
    for t in new:
        if t in eos:
            yield gen._finish(c, text, "eos", done)
            return True
        c.tokens.append(t)
        seq.append(t)
        delta = text.add(t)
        if text.stopped:
            c.text = text.text
            yield Event(b, t, delta)
            yield gen._finish(c, text, "stop", done)
            return True
        yield Event(b, t, delta)
        if len(c.tokens) >= max_new:
            yield gen._finish(c, text, "length", done)
            return True
    return False


def check_vocab(draft: GPT, target: GPT, draft_name: str, target_name: str) -> None:
    if draft.cfg.vocab_size != target.cfg.vocab_size:
        raise GenerationError(
            f"{draft_name} has a vocabulary of {draft.cfg.vocab_size:,} tokens but {target_name} has "
            f"{target.cfg.vocab_size:,}: drafts must use the target's token ids. Use a draft trained with "
            f"the target's tokenizer, or --prompt-lookup N (no draft model)")


def load_draft(draft: Union[str, Path], target: GPT, target_name: str, tokenizer, verify: bool = True) -> GPT:
    """The draft checkpoint on the target's device and in its dtype, refused when its vocabulary or its
    tokenizer.json is not the target's (``tokenizer``: the one the target decodes with, if any)."""
    from tokenizers import Tokenizer

    dckpt = resolve_checkpoint(draft)
    w = next(target.parameters())
    model = load_model_dir(dckpt, device=w.device, dtype=w.dtype, verify=verify)
    check_vocab(model, target, f"the draft {draft}", f"the target {target_name}")
    if tokenizer is not None and (dckpt / TOKENIZER).is_file():
        try:
            theirs = json.loads(Tokenizer.from_file(str(dckpt / TOKENIZER)).to_str())
        except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
            raise GenerationError(f"{dckpt / TOKENIZER} is not a valid tokenizer.json: {e}") from None
        if theirs != json.loads(tokenizer.to_str()):
            raise GenerationError(
                f"the draft {draft} has another tokenizer.json than the target {target_name} (same size, other "
                f"tokens or merges): its drafts would mean other text. Use a draft trained with the target's "
                f"tokenizer, or --prompt-lookup N (no draft model)")
    return model


# ----------------------------------------------------------------------------- CLI

def add_speculative_args(p) -> None:
    g = p.add_argument_group("speculative decoding (the same output distribution, fewer target forwards)")
    g.add_argument("--draft", metavar="DRAFT_MODEL", help="a smaller model with the same tokenizer proposes "
                   "tokens; the model checks them, several per forward")
    g.add_argument("--prompt-lookup", type=int, default=0, metavar="N", help="propose the tokens that followed "
                   "the last earlier occurrence of the text's last (up to N) tokens; no draft model")
    g.add_argument("--speculate-k", type=int, metavar="K", help="tokens proposed per step (default 4)")


def speculative_kwargs(args) -> dict:
    """``Generator.from_checkpoint`` keywords for ``--draft`` / ``--prompt-lookup`` / ``--speculate-k``."""
    draft, lookup, k = getattr(args, "draft", None), getattr(args, "prompt_lookup", 0) or 0, getattr(
        args, "speculate_k", None)
    if draft is None and not lookup:
        if k is not None:
            raise GenerationError("--speculate-k needs --draft DRAFT_MODEL or --prompt-lookup N")
        return {}
    if draft is not None and lookup:
        raise GenerationError("give --draft or --prompt-lookup, not both")
    if getattr(args, "backend", "torch") != "torch":
        raise GenerationError(f"--draft and --prompt-lookup need --backend torch (not {args.backend})")
    if lookup < 0:
        raise GenerationError(f"--prompt-lookup={lookup} is invalid: must be >= 1 (the longest n-gram)")
    if k is not None and k < 1:
        raise GenerationError(f"--speculate-k={k} is invalid: must be >= 1")
    if getattr(args, "compile", False):
        raise GenerationError("--compile does not apply to speculative decoding (it compiles the one-token step; "
                              "speculative steps feed several tokens): leave it out")
    return dict(draft=draft, speculate_k=k or 4, prompt_lookup=lookup)


def speculative_json(c: Completion) -> dict:
    """The ``speculative`` entry of a ``--json`` row (empty for plain decoding)."""
    if not isinstance(c, SpecCompletion):
        return {}
    return {"speculative": {"drafted": c.drafted, "accepted": c.accepted, "acceptance_rate": c.acceptance_rate,
                            "target_forwards": c.steps}}


def speculative_summary(comps: Sequence[Completion]) -> Optional[str]:
    """One stderr line: acceptance over all rows and tokens per target forward."""
    spec = [c for c in comps if isinstance(c, SpecCompletion)]
    if not spec:
        return None
    drafted, accepted = sum(c.drafted for c in spec), sum(c.accepted for c in spec)
    steps, tokens = sum(c.steps for c in spec), sum(len(c.tokens) for c in spec)
    rate = f"{accepted / drafted:.3f}" if drafted else "n/a"
    return (f"speculative: acceptance {rate} ({accepted} of {drafted} drafted tokens), "
            f"{tokens / max(steps, 1):.2f} tokens per target forward per row")
