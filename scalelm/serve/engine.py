"""The continuous-batching decode loop: one thread owns the model and a batch of rows.

Each step the engine thread

1. drops the rows of cancelled sequences (their client went away),
2. runs ONE forward of one token for all active rows (the batched decode step),
3. samples every row with that row's own settings and hands the tokens to the requests,
4. admits waiting sequences while rows are free, and prefills them (prefill.py): each into its own
   one-row cache, starting after the blocks of its prompt that the prefix cache holds
   (prefix_cache.py). With ``prefill_chunk``, a step prefills at most that many prompt tokens
   while rows are decoding, so a long prompt takes several steps and the running rows get a
   token between its chunks (chunked prefill); with no row decoding, a prompt is prefilled
   whole. Prompts that start at the same slot share one forward, right-padded (prefill.py's
   ``groups``). A finished prefill is copied into a free row, its prompt's full blocks go into the
   prefix cache, and its first token comes from its last logits; from the next step on it
   decodes together with the others.

So a new request joins the running batch at the next step boundary instead of waiting for the
batch to drain, and a finished row is free for the next request at once.

The batch's cache (:class:`BatchCache`) gives every row its own length: a step writes each
row's new key/value at that row's next slot, the position ids are the row lengths, and a mask
hides the slots past each row's end (no mask when all rows have one length). Active rows stay
dense at the front of the buffer (a freed row gets the last row's cache), so a step runs on a
view of the first ``n`` rows. A row sees exactly what it would alone: the same prefill (to the
last float bits when it was chunked, padded in a group or started from cached blocks: other
kernels), the same keys and values, only masked slots added, so greedy tokens equal
``Generator``'s (tested).
With ``model.sliding_window``, local layers get each row's band instead (its own slot and the
window - 1 before it); the rows keep all their slots (kv_cache.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..generate.constrained import mask_logits
from ..generate.generator import Generator
from ..generate.outputs import GenerationError
from ..generate.sampling import SamplingParams, apply_repetition_penalty, banned_ngram_tokens, next_token
from ..generate.textstream import TextStream
from ..interp.hooks import patch
from ..interp.steering import row_steering
from ..model.kv_cache import LayerKVCache, PreallocatedKVCache, local_layers
from ..model.masks import window_mask
from . import MAX_BATCH, PREFILL_CHUNK, PREFIX_CACHE_MB
from .prefill import Prefill, groups, run_group
from .prefix_cache import PrefixCache, namespace

log = logging.getLogger("scalelm.serve")


def steering(vectors: list, model):
    """Adds each row's steering vector while the model runs (none: nothing is hooked)."""
    if all(v is None for v in vectors):
        return contextlib.nullcontext()
    return patch(model, row_steering(vectors))


class QueueFull(Exception):
    """No room in the waiting queue: the server answers 429."""


@dataclass
class SeqParams:
    """How one sequence is generated (validated by the server before it gets here)."""
    max_tokens: int
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(temperature=1.0))
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    min_tokens: int = 0  # end-of-text and stop tokens are masked until this many are generated
    ignore_eos: bool = False
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    logit_bias: Optional[dict[int, float]] = None
    logprobs: Optional[int] = None  # None: none; k: the chosen token's logprob and the k most likely
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (echo)
    seed: Optional[int] = None
    steer: Optional[tuple] = None  # (vector, layer, scale): added to that layer's input stream (interp/steering.py)
    constraint: Optional[object] = None  # a compiled grammar (generate/constrained.py): the text must match it

    @property
    def plain(self) -> bool:
        """Greedy with nothing that changes the logits: the whole batch can share one argmax."""
        return (self.sampling.greedy and self.sampling.repetition_penalty == 1.0 and not self.logit_bias
                and not self.sampling.no_repeat_ngram_size
                and not self.presence_penalty and not self.frequency_penalty and not self.min_tokens)


@dataclass
class Event:
    """What a step produced for one sequence. ``token`` is None on a closing event."""
    index: int
    token: Optional[int]
    text: str
    logprob: Optional[float] = None
    top: Optional[list] = None  # [(token id, logprob)], most likely first
    finish_reason: Optional[str] = None  # "stop" (end of text, stop string, stop token) or "length"
    prompt_logprobs: Optional[list] = None  # on the first event, if asked: [(logprob, top)] per prompt token
    error: Optional[str] = None  # the step failed; the sequence is over


class Seq:
    """One sequence to generate (a request has one per prompt and per ``n``)."""

    def __init__(self, index: int, prompt: Sequence[int], params: SeqParams, push: Callable[[list], None]):
        self.index, self.prompt, self.params, self.push = index, list(prompt), params, push
        self.cancelled = False
        self.tokens: list[int] = []
        self.last: Optional[int] = None  # the newest token: the model reads it at the next step
        self.text: Optional[TextStream] = None
        self.generator: Optional[torch.Generator] = None
        self.seen: Optional[torch.Tensor] = None  # (1, V) prompt and output tokens: repetition penalty
        self.counts: Optional[torch.Tensor] = None  # (1, V) output token counts: presence/frequency
        self.bias: Optional[torch.Tensor] = None  # (1, V) logit bias
        self.prompt_lp: Optional[list] = None
        self.submitted = time.perf_counter()
        # structured output: this sequence's place in its grammar (its token mask each step)
        self.matcher = params.constraint.matcher() if params.constraint is not None else None


class BatchCache(LayerKVCache):
    """Keys/values of up to ``rows`` sequences, each of its own length: (layers, rows, kv_heads, S, head_dim).

    A :class:`~scalelm.model.kv_cache.LayerKVCache`: ``GPT.forward`` uses it as any cache
    (``prepare``, ``update``, ``advance``), for one-token steps over the first ``n`` rows
    (:meth:`begin`). Prompts are prefilled alone into a ``PreallocatedKVCache`` and copied in
    (:meth:`put`).

    The buffer grows with the rows in use (doubling, up to ``rows``) instead of being allocated
    whole at start: a row costs ``2 x layers x kv_heads x context x head_dim`` elements, so a large
    ``--batch-size`` takes memory only when that many clients come."""

    def __init__(self, cfg, rows: int, device=None, dtype=torch.float32):
        self.rows = rows
        self._shape = (cfg.n_layer, cfg.kv_heads, cfg.block_size, cfg.head_dim)
        self.k = self.v = torch.zeros((0, 0), device=device, dtype=dtype)
        self._grow(1)
        self.max_len = cfg.block_size
        self.lens = [0] * rows  # filled slots per row (on the host: no sync to read them)
        self.n = 0
        self.window, self.local = cfg.sliding_window, local_layers(cfg)
        self._band: Optional[torch.Tensor] = None

    def _grow(self, n: int) -> None:
        """Room for rows [0, n) at least; the rows in use keep their keys/values."""
        have = self.k.shape[1] if self.k.dim() == 5 else 0
        if n <= have:
            return
        cap = min(self.rows, max(n, 2 * have))
        L, H, S, D = self._shape
        k = torch.zeros((L, cap, H, S, D), device=self.k.device, dtype=self.k.dtype)
        v = torch.zeros_like(k)
        if have:
            k[:, :have], v[:, :have] = self.k, self.v
        self.k, self.v = k, v

    def begin(self, n: int) -> None:
        """The next forward runs rows [0, n), one new token each."""
        self._grow(n)
        lens = self.lens[:n]
        if max(lens) >= self.max_len:
            raise ValueError(f"a row of the batch cache is full ({self.max_len} slots)")
        dev = self.k.device
        self.n, self._end = n, max(lens) + 1
        # all rows at one length (a lone row, always): the new keys go to one slot, written by a
        # slice instead of an indexed write, and no mask is built
        self._same = lens[0] if min(lens) == max(lens) else None
        self._rows = None if self._same is not None else torch.arange(n, device=dev)
        self._slot = torch.tensor(lens, device=dev)
        self._mask = None
        if self._same is None:  # (n, 1, 1, end): each row sees its own slots and the new one
            self._mask = (torch.arange(self._end, device=dev)[None, :] <= self._slot[:, None])[:, None, None, :]
        self._band = None  # local layers: each row's own band (it implies the mask above)
        if self.window is not None and self._end > self.window:
            self._band = window_mask(self._slot[:, None], torch.arange(self._end, device=dev), self.window)[:, None]

    def prepare(self, T: int) -> torch.Tensor:
        if T != 1:
            raise ValueError("BatchCache runs one-token decode steps; prefill uses a PreallocatedKVCache")
        return self._slot[:, None]  # each row's position is its length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        s = self._same
        if s is not None:  # a slice assignment converts to the cache's dtype itself
            self.k[layer, :self.n, :, s:s + 1] = k
            self.v[layer, :self.n, :, s:s + 1] = v
        else:  # an indexed write does not convert dtypes as a slice assignment does: convert first
            self.k[layer, self._rows, :, self._slot] = k[:, :, 0].to(self.k.dtype)
            self.v[layer, self._rows, :, self._slot] = v[:, :, 0].to(self.v.dtype)
        mask = self._band if self._band is not None and self.local[layer] else self._mask
        return self.k[layer, :self.n, :, :self._end], self.v[layer, :self.n, :, :self._end], mask

    def advance(self, T: int) -> None:
        for i in range(self.n):
            self.lens[i] += T

    def put(self, row: int, cache: PreallocatedKVCache, length: int) -> None:
        """Copy a prefilled one-row cache into ``row``."""
        self._grow(row + 1)
        self.k[:, row, :, :length] = cache.k[:, 0, :, :length]
        self.v[:, row, :, :length] = cache.v[:, 0, :, :length]
        self.lens[row] = length

    def move(self, src: int, dst: int) -> None:
        n = self.lens[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self.lens[dst], self.lens[src] = n, 0


class Engine:
    """Owns the model (a :class:`Generator`'s) and runs the decode loop in a background thread."""

    def __init__(self, gen: Generator, max_batch: int = MAX_BATCH, max_queue: int = 64, metrics=None,
                 prefix_cache_mb: float = PREFIX_CACHE_MB, prefill_chunk: int = PREFILL_CHUNK):
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        if prefix_cache_mb < 0 or prefill_chunk < 0:
            raise ValueError("prefix_cache_mb and prefill_chunk must be >= 0")
        self.gen, self.cfg = gen, gen.cfg
        self.max_batch, self.max_queue = max_batch, max_queue
        # optional: .step(rows, seconds), .prefill(tokens, seconds), .first_token(s), .tokens(n), .prefix(...)
        self.metrics = metrics
        self.cache = BatchCache(gen.cfg, max_batch, gen.device, gen.dtype)
        self.rows: list[Seq] = []  # row i of the cache decodes rows[i]
        self.waiting: deque[Seq] = deque()
        self.prefilling: deque[Prefill] = deque()  # admitted, prompt not all in yet (they hold a row's place)
        self.prefix = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None
        self.prefill_chunk = prefill_chunk  # prompt tokens per step while rows decode (0: whole prompts)
        self.steps = 0
        self._cond = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False

    # ------------------------------------------------------------------ any thread
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._run, name="scalelm-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queued(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return len(self.rows)

    def submit(self, seqs: Sequence[Seq]) -> None:
        """Queue sequences for decoding; QueueFull if the queue has no room for all of them."""
        with self._cond:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting (at most {self.max_queue})")
            self.waiting.extend(seqs)
            self._cond.notify()

    def cancel(self, seqs: Sequence[Seq]) -> None:
        """Stop these sequences: waiting ones leave the queue, running ones free their row next step."""
        with self._cond:
            for s in seqs:
                s.cancelled = True
            if any(s in self.waiting for s in seqs):
                self.waiting = deque(s for s in self.waiting if not s.cancelled)
            self._cond.notify()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self.waiting and not self.rows and not self.prefilling:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self.step()
                except Exception:  # a bug outside the model calls: fail what is running, keep serving
                    log.exception("engine step failed")
                    failed, self.rows = self.rows + [j.seq for j in self.prefilling], []
                    self.prefilling.clear()
                    self.cache.lens = [0] * len(self.cache.lens)
                    self._deliver({s: [Event(s.index, None, "", finish_reason="error", error="engine step failed")]
                                   for s in failed})
                time.sleep(0)  # let the event loop thread take the GIL: it sends the tokens
        self._fail(self.rows + [j.seq for j in self.prefilling] + list(self.waiting), "the server is shutting down")

    @property
    def busy(self) -> bool:
        """Work left: rows decoding, prompts being prefilled or sequences waiting."""
        return bool(self.rows or self.prefilling or self.waiting)

    def step(self) -> None:
        """One step: drop cancelled rows, decode one token for all rows, admit and prefill waiting sequences."""
        out: dict[Seq, list[Event]] = {}
        self._free([s for s in self.rows if s.cancelled])
        if any(j.seq.cancelled for j in self.prefilling):
            self.prefilling = deque(j for j in self.prefilling if not j.seq.cancelled)
        decoding = bool(self.rows)
        if self.rows:
            try:
                self._decode(out)
            except Exception as e:  # a failed step fails its rows, not the server
                log.exception("decode step failed")
                self._fail(self.rows, f"decode step failed: {type(e).__name__}", out)
        with self._cond:
            admit = []
            while self.waiting and len(self.rows) + len(self.prefilling) + len(admit) < self.max_batch:
                admit.append(self.waiting.popleft())
        for s in admit:
            try:
                self._admit(s, out)
            except Exception as e:
                log.exception("prefill failed")
                self._fail([s], f"prefill failed: {type(e).__name__}", out)
        # while rows decode, a step prefills at most prefill_chunk prompt tokens, so that they get
        # their next token soon; with none decoding there is no one to keep waiting
        budget = self.prefill_chunk if decoding and self.prefill_chunk else None
        plan = []  # (job, tokens to prefill now), in arrival order
        for job in self.prefilling:
            if budget is not None and budget <= 0:
                break
            n = job.left if budget is None else min(job.left, budget)
            plan.append((job, n))
            if budget is not None:
                budget -= n
        over = set()  # jobs finished or failed
        for group in groups(plan):  # prompts that can share a forward do
            try:
                over.update(self._prefill(group, out))
            except Exception as e:
                log.exception("prefill failed")
                over.update(job for job, _ in group)
                self._fail([job.seq for job, _ in group], f"prefill failed: {type(e).__name__}", out)
        if over:
            self.prefilling = deque(j for j in self.prefilling if j not in over)
        self._deliver(out)

    def _decode(self, out: dict) -> None:
        n = len(self.rows)
        t = time.perf_counter()
        self.cache.begin(n)
        tok = torch.tensor([s.last for s in self.rows], device=self.gen.device)[:, None]
        with steering([s.params.steer for s in self.rows], self.gen.model):  # each row its own vector, if any
            logits = self.gen.model(tok, kv_cache=self.cache, last_only=True)[0][:, -1]
        self._sample(list(self.rows), logits, out)
        self.steps += 1
        if self.metrics is not None:
            self.metrics.step(n, time.perf_counter() - t)

    def _admit(self, s: Seq, out: dict) -> None:
        """Start prefilling ``s``: from the blocks of its prompt the prefix cache has, if any."""
        p, ids = s.params, s.prompt
        if p.max_tokens == 0 and not p.prompt_logprobs:  # nothing to compute (echo alone)
            out.setdefault(s, []).append(Event(s.index, None, "", finish_reason="length"))
            return
        cached, ns = [], namespace(p.steer) if self.prefix is not None else b""
        # prompt logprobs need every prompt position's logits: such a prompt is prefilled whole;
        # at least the last token is always prefilled, for the logits of the first new one
        if self.prefix is not None and not p.prompt_logprobs:
            cached = self.prefix.lookup(ids, ns, limit=len(ids) - 1)
            if self.metrics is not None:
                self.metrics.prefix(bool(cached), len(cached) * self.prefix.block)
        job = Prefill(s, self.cfg, self.gen.device, self.gen.dtype, cached, want_all=p.prompt_logprobs)
        job.ns = ns
        self.prefilling.append(job)

    def _prefill(self, group: list, out: dict) -> list[Prefill]:
        """Prefill the next tokens of each (job, n) of ``group`` (one forward if several); the jobs
        whose prompt is all in get a row (or finish, echo alone) and their first token. Returns those."""
        t = time.perf_counter()
        with steering([job.seq.params.steer for job, _ in group], self.gen.model):  # each row its own vector
            finished = run_group(self.gen.model, group)
        if self.metrics is not None:
            self.metrics.prefill(sum(n for _, n in group), time.perf_counter() - t)
        done = [job for (job, _), f in zip(group, finished) if f]
        for job in done:
            self._prefilled(job, out)
        return done

    def _prefilled(self, job: Prefill, out: dict) -> None:
        """``job``'s prompt is all in: store its blocks, then give it a row and sample its first token."""
        s, p = job.seq, job.seq.params
        ids = s.prompt
        if self.prefix is not None:
            self.prefix.insert(ids, job.cache.k[:, 0], job.cache.v[:, 0], job.ns)
        if p.prompt_logprobs:
            s.prompt_lp = self._prompt_logprobs(ids, job.all_logits(), p.logprobs or 0)
        if p.max_tokens == 0:  # the prompt's logprobs only (echo): no row needed
            out.setdefault(s, []).append(Event(s.index, None, "", finish_reason="length",
                                               prompt_logprobs=s.prompt_lp))
            return
        self._setup(s)
        self.cache.put(len(self.rows), job.cache, len(ids))
        self.rows.append(s)
        self._sample([s], job.last, out)

    def _setup(self, s: Seq) -> None:
        p, dev, V = s.params, self.gen.device, self.cfg.vocab_size
        s.text = TextStream(self.gen.tokenizer, s.prompt, list(p.stop))
        if not p.sampling.greedy:  # a private generator per sequence: a seed reproduces it
            s.generator = torch.Generator(device=dev)
            s.generator.manual_seed(p.seed if p.seed is not None else random.SystemRandom().randrange(2**63))
        if p.sampling.repetition_penalty != 1.0:
            s.seen = torch.zeros(1, V, dtype=torch.bool, device=dev)
            s.seen[0, s.prompt] = True
        if p.presence_penalty or p.frequency_penalty:
            s.counts = torch.zeros(1, V, device=dev)
        if p.logit_bias:
            s.bias = torch.zeros(1, V, device=dev)
            for tok, b in p.logit_bias.items():
                s.bias[0, tok] = b

    # ------------------------------------------------------------------ sampling
    def _next(self, s: Seq, logits: torch.Tensor) -> torch.Tensor:
        """The next token of one sequence from its (1, V) logits, with its own settings."""
        p = s.params
        x = logits.float()
        if s.bias is not None:
            x = x + s.bias
        if s.counts is not None:
            x = x - p.presence_penalty * (s.counts > 0) - p.frequency_penalty * s.counts
        if s.seen is not None:
            x = apply_repetition_penalty(x, s.seen, p.sampling.repetition_penalty)
        # whatever the settings did to the logits, sampling gets finite numbers (else multinomial fails)
        x = torch.nan_to_num(x, nan=-1e30, posinf=1e30, neginf=-1e30)
        if p.sampling.no_repeat_ngram_size:  # HF's n-gram ban, over the prompt and the output
            ban = banned_ngram_tokens(s.prompt + s.tokens, p.sampling.no_repeat_ngram_size)
            if ban:
                x = x.index_fill(1, torch.tensor(ban, device=x.device), float("-inf"))
        if len(s.tokens) < p.min_tokens:
            ends = sorted((set() if p.ignore_eos else self.gen.eos_ids) | set(p.stop_token_ids))
            if ends:
                x = x.index_fill(1, torch.tensor(ends, device=x.device), float("-inf"))
        try:
            return next_token(x, p.sampling, s.generator)  # the repetition penalty is applied above
        except RuntimeError:  # e.g. a distribution with no mass left: take the likeliest token
            log.warning("sampling failed for %s; took the most likely token", p.sampling, exc_info=True)
            return x.argmax(dim=-1)

    def _sample(self, seqs: list[Seq], logits: torch.Tensor, out: dict) -> None:
        # structured output: each constrained row's grammar masks its logits (the batch's one mask);
        # logprobs stay the model's own
        masked = mask_logits(logits, [s.matcher for s in seqs])
        if all(s.params.plain for s in seqs):
            ids = masked.float().argmax(dim=-1).tolist()
        else:
            ids = torch.cat([self._next(s, masked[i:i + 1]) for i, s in enumerate(seqs)]).tolist()
        done = []
        for i, s in enumerate(seqs):
            lp = top = None
            if s.params.logprobs is not None:
                lp, top = self._logprobs(logits[i], ids[i], s.params.logprobs)
            if self._accept(s, ids[i], lp, top, out):
                done.append(s)
        self._free(done)

    def _accept(self, s: Seq, t: int, lp, top, out: dict) -> bool:
        """Hand one sampled token to its sequence; True when the sequence is finished."""
        p, evs = s.params, out.setdefault(s, [])
        plp, s.prompt_lp = s.prompt_lp, None
        if not s.tokens and self.metrics is not None:
            self.metrics.first_token(time.perf_counter() - s.submitted)
        if (not p.ignore_eos and t in self.gen.eos_ids) or t in p.stop_token_ids:
            evs.append(Event(s.index, None, s.text.flush(), finish_reason="stop", prompt_logprobs=plp))
            return True
        complete = False
        if s.matcher is not None:
            try:
                complete = s.matcher.advance(t)
            except GenerationError as e:  # e.g. an n-gram ban left only tokens the grammar forbids
                evs.append(Event(s.index, None, "", finish_reason="error", error=str(e)))
                return True
        s.tokens.append(t)
        s.last = t
        if s.seen is not None:
            s.seen[0, t] = True
        if s.counts is not None:
            s.counts[0, t] += 1
        if self.metrics is not None:
            self.metrics.tokens(1)
        ev = Event(s.index, t, s.text.add(t), lp, top, prompt_logprobs=plp)
        evs.append(ev)
        if complete:  # the grammar is complete: nothing may follow
            ev.text += s.text.flush()
            ev.finish_reason = "stop"
            return True
        if s.text.stopped:
            ev.finish_reason = "stop"
            return True
        if len(s.tokens) >= p.max_tokens or len(s.prompt) + len(s.tokens) >= self.cfg.block_size:
            evs.append(Event(s.index, None, s.text.flush(), finish_reason="length"))
            return True
        return False

    @staticmethod
    def _logprobs(logits: torch.Tensor, token: int, k: int):
        lp = torch.log_softmax(logits.float(), dim=-1)
        top = None
        if k:
            v, i = lp.topk(min(k, lp.numel()))
            top = list(zip(i.tolist(), v.tolist()))
        return float(lp[token]), top

    @staticmethod
    def _prompt_logprobs(ids: list[int], logits: torch.Tensor, k: int) -> list:
        """[(logprob, top)] of each prompt token given the ones before it; the first has none."""
        out: list = [(None, None)]
        if len(ids) < 2:
            return out
        lp = torch.log_softmax(logits[:-1].float(), dim=-1)
        chosen = lp.gather(1, torch.tensor(ids[1:], device=lp.device)[:, None])[:, 0].tolist()
        tops = [None] * len(chosen)
        if k:
            v, i = lp.topk(min(k, lp.shape[-1]), dim=-1)
            tops = [list(zip(a, b)) for a, b in zip(i.tolist(), v.tolist())]
        return out + list(zip(chosen, tops))

    # ------------------------------------------------------------------ rows and delivery
    def _free(self, seqs: Sequence[Seq]) -> None:
        """Free the rows of these sequences; the last rows move into the holes (rows stay dense)."""
        for i in sorted((self.rows.index(s) for s in seqs), reverse=True):
            j = len(self.rows) - 1
            if i != j:
                self.cache.move(j, i)
                self.rows[i] = self.rows[j]
            self.cache.lens[j] = 0
            self.rows.pop()

    def _fail(self, seqs: Sequence[Seq], message: str, out: Optional[dict] = None) -> None:
        own = out is None
        out = {} if own else out
        for s in list(seqs):
            out.setdefault(s, []).append(Event(s.index, None, "", finish_reason="error", error=message))
        self._free([s for s in seqs if s in self.rows])
        if own:
            self._deliver(out)

    @staticmethod
    def _deliver(out: dict) -> None:
        """One hand-over per request per step (its sequences share one ``push``)."""
        groups: dict = {}
        for s, evs in out.items():
            if evs and not s.cancelled:
                groups.setdefault(s.push, []).extend(evs)
        for push, evs in groups.items():
            try:
                push(evs)
            except Exception:  # e.g. the event loop is gone at shutdown
                log.debug("could not deliver events", exc_info=True)
