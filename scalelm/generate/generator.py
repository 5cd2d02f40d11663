"""Text generation: KV-cached decoding with batching, sampling, stop strings and streaming.

Python API::

    gen = Generator.from_checkpoint("runs/baby")          # a model dir, or a RUN_DIR's latest
    out = gen.generate("To be", max_new_tokens=50, sampling=SamplingParams(temperature=0.8), seed=1)
    print(out[0].text)
    for ev in gen.stream(["To be", "Once upon"], max_new_tokens=50):   # token by token
        print(ev.index, ev.text, end="")

How a batch runs: prompts are left-padded to one length (the cache's per-row ``start`` masks
the padding and shifts position ids, so each row sees exactly what it would alone), prefilled
in one forward, then decoded one token per step for every row. A row ends at end-of-text, a
stop string, or its own ``max_new_tokens`` (one for all, or one per prompt); the others go on.
Every row gets what it would get alone, whatever the lengths of its neighbours: the cache holds
each row's prompt and budget (its positions are its own, so a short row may use slots past
``block_size``). When a row would outgrow the context, its window slides: its last 3/4 is
prefilled again and decoding continues (learned positions cannot go beyond ``block_size``); with
``slide=False`` (translation, beam search) it ends there instead. Completions say what the context
did: ``prompt_cut_tokens`` (``truncate``), ``context_slides``, ``stopped_at_context``.

The ``scalelm generate`` command is at the end of this file; ``scalelm chat`` is in
:mod:`scalelm.generate.chat`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import torch

from ..data.chat_template import read_chat_template
from ..data.tokenizer import load_tokenizer
from ..model.gpt import GPT
from ..model.io import load_model_dir
from ..model.kv_cache import GeneratorKVCache, PreallocatedKVCache
from ..precision import pick_device
from ..runs import TOKENIZER, resolve_checkpoint
from .constrained import Grammar, compile_grammar, mask_logits
from .cpu_layout import compile_decode_step, pack_linears, shallow_copy, should_pack
from .outputs import Completion, Event, GenerationError  # defined there, imported from here too
from .sampling import NON_FINITE, NonFiniteLogits, SamplingParams, constrain, next_token_checked
from .speculative import Speculator, load_draft
from .textstream import TextStream

EOT = "<|endoftext|>"
Prompt = Union[str, Sequence[int]]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on a GPU that has it, else fp32 (the reference; bf16 on CPU is an option)."""
    if dtype == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if dtype not in DTYPES:
        raise GenerationError(f"unknown dtype {dtype!r}: choose auto, {', '.join(DTYPES)}")
    if dtype == "float16" and device.type == "cpu":
        raise GenerationError("float16 on CPU is very slow and has no advantage; use bfloat16 or float32")
    return DTYPES[dtype]


def _check_other_tokenizer(tok, given: Union[str, Path], ckpt: Path, model_vocab: int) -> None:
    """Refuse a ``--tokenizer`` that cannot decode what the model emits: ids it lacks would be
    dropped from the text without a word. With the checkpoint's own tokenizer.json to compare, the
    sizes must be equal; without one, the model's vocabulary may exceed the tokenizer's only as
    padding: a multiple of 64, less than 128 above it (as GPT-2's 50257 padded to 50304)."""
    from ..data.tokenizer import vocab_size_of

    n = vocab_size_of(tok)
    if (ckpt / TOKENIZER).is_file():
        own = vocab_size_of(load_tokenizer(ckpt))
        if n != own:
            raise GenerationError(f"--tokenizer {given} has {n:,} tokens but {ckpt}'s own tokenizer.json has "
                                  f"{own:,}: the ids the model emits would decode as other text or be dropped. "
                                  f"Leave out --tokenizer (the checkpoint's is used), or give one of {own:,} tokens")
    elif model_vocab > n and (model_vocab % 64 or model_vocab - n >= 128):
        raise GenerationError(f"--tokenizer {given} has {n:,} tokens but the model in {ckpt} emits ids up to "
                              f"{model_vocab - 1:,}: those would be dropped from the text. Give the tokenizer the "
                              f"model was trained with (a model vocabulary padded to a multiple of 64 is accepted)")


class Generator:
    """A model, its tokenizer and end-of-text ids, ready to generate."""

    speculator: Optional[Speculator] = None  # set by draft= / prompt_lookup= (speculative decoding)
    seq2seq = False  # True for scalelm.generate.seq2seq.Seq2SeqGenerator (an encoder-decoder model)

    def __init__(self, model: GPT, tokenizer=None, eos_ids: Sequence[int] = (), bos_id: Optional[int] = None,
                 chat_template: Optional[str] = None, compile: bool = False, pack: Union[bool, str] = "auto", *,
                 draft: Optional[GPT] = None, speculate_k: int = 4, prompt_lookup: int = 0):
        p = next(model.parameters())
        # work on a copy that shares the weights: the caller's model keeps its mode and modules
        # compile packs weights itself (freezing); otherwise a CPU copy gets BLAS-friendly layouts
        packed = not compile and (pack is True or (pack == "auto" and should_pack(p.device)))
        if not isinstance(model, torch.nn.Module):  # another runtime's model (onnx_backend.OrtModel): as it is
            self.model = model
        else:
            self.model = (pack_linears(model) if packed else shallow_copy(model)).eval()
        self.cfg = model.cfg
        if (getattr(self.cfg, "arch", "gpt") == "encoder-decoder") != self.seq2seq:
            raise GenerationError("Seq2SeqGenerator needs an encoder-decoder model" if self.seq2seq else
                                  "this is an encoder-decoder model: it translates a source (`scalelm translate`, or "
                                  "scalelm.generate.seq2seq.Seq2SeqGenerator in Python), it does not continue a prompt")
        self.tokenizer = tokenizer
        self.eos_ids = frozenset(int(i) for i in eos_ids)
        self.bos_id = bos_id if bos_id is not None else (min(self.eos_ids) if self.eos_ids else None)
        self.chat_template = chat_template
        self.device, self.dtype = p.device, p.dtype
        self._step = compile_decode_step(self.model) if compile else self.model
        # speculative decoding: a draft model or prompt lookup proposes, see scalelm/generate/speculative.py
        self.speculator = None if draft is None and not prompt_lookup else Speculator(
            self, draft, speculate_k, prompt_lookup, compile, pack)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoint(cls, path: Union[str, Path], tokenizer: Optional[Union[str, Path]] = None,
                        device: str = "auto", dtype: str = "auto", compile: bool = False,
                        verify: bool = True, *, draft: Optional[Union[str, Path]] = None, speculate_k: int = 4,
                        prompt_lookup: int = 0, backend: str = "torch") -> "Generator":
        """``backend="onnxruntime"``: ``path`` is a directory from ``scalelm export --format onnx``."""
        from ..model.hf import special_token_ids

        if backend == "onnxruntime":
            from .onnx_backend import load_onnx_model

            ckpt, model = Path(path), load_onnx_model(path, verify=verify)
        else:
            ckpt = resolve_checkpoint(path)
            dev = pick_device(device, option="--device")
            model = load_model_dir(ckpt, device=dev, dtype=resolve_dtype(dtype, dev), verify=verify)
        tok_src = Path(tokenizer) if tokenizer is not None else ckpt
        tok = load_tokenizer(tok_src) if tokenizer is not None or (ckpt / TOKENIZER).is_file() else None
        bos, eos = special_token_ids(ckpt)
        if tokenizer is not None:  # another tokenizer: its own end-of-text token
            _check_other_tokenizer(tok, tokenizer, ckpt, model.cfg.vocab_size)
            bos = eos = tok.token_to_id(EOT)
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        tok_dir = tok_src if tok_src.is_dir() else tok_src.parent if tok_src.is_file() else None  # not hf:NAME
        template = read_chat_template(tok_dir) if tok_dir is not None else None
        spec = {} if draft is None and not prompt_lookup else dict(speculate_k=speculate_k, prompt_lookup=prompt_lookup)
        if draft is not None:  # refused unless it has the target's vocabulary and tokenizer
            spec["draft"] = load_draft(draft, model, str(tokenizer or path), tok, verify)
        return cls(model, tok, eos_ids, bos, template, compile, **spec)

    # ------------------------------------------------------------------ text <-> ids
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise GenerationError("this checkpoint has no tokenizer.json: pass a tokenizer "
                                  "(--tokenizer PATH) or token ids (--prompt-ids)")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids)) if self.tokenizer is not None else ""

    def prompt_ids(self, prompt: Prompt, truncate: bool = False) -> list[int]:
        """Token ids of a prompt; empty starts from end-of-text; too long is an error unless truncated."""
        return self._prompt_and_cut(prompt, truncate)[0]

    def _prompt_and_cut(self, prompt: Prompt, truncate: bool) -> tuple[list[int], int]:
        """:meth:`prompt_ids`, and how many tokens truncation dropped from its start."""
        ids = self.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            if self.bos_id is None:
                raise GenerationError("empty prompt and no end-of-text token to start from: give a prompt")
            ids = [self.bos_id]
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(ids) > self.cfg.block_size:
            if not truncate:
                raise GenerationError(
                    f"the prompt has {len(ids)} tokens but the model's context is {self.cfg.block_size}: "
                    "shorten it, or pass --truncate to keep its last tokens")
            return ids[-self.window_keep:], len(ids) - self.window_keep
        return ids, 0

    @staticmethod
    def _prompt_list(prompts) -> list:
        """A text, a list of token ids, or a list of either, as a list of prompts."""
        if isinstance(prompts, torch.Tensor):
            prompts = prompts.tolist()
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        if not plist:
            raise GenerationError("no prompt given")
        return plist

    def _prompt_rows(self, prompts, truncate: bool) -> tuple[list[list[int]], list[int]]:
        """The rows to decode from (one per prompt) and the tokens truncation cut from each (the
        encoder-decoder's rows are its start token, its prompts the sources)."""
        rows, cuts = zip(*(self._prompt_and_cut(p, truncate) for p in self._prompt_list(prompts)))
        return list(rows), list(cuts)

    def budgets(self, rows: list[list[int]], max_new_tokens: Union[int, Sequence[int]],
                slide: bool = True) -> tuple[list[int], list[bool]]:
        """Each row's own token budget, and whether its context cut it short of ``max_new_tokens``.

        ``max_new_tokens``: one for every row, or one per row. Without sliding a row can take
        ``block_size - len(row) + 1`` tokens (the last one predicted from a full context), whatever
        the other rows of its batch: a batch gives each row what it would get alone."""
        n = [int(max_new_tokens)] * len(rows) if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
        if len(n) != len(rows):
            raise GenerationError(f"max_new_tokens has {len(n)} budgets for {len(rows)} prompts: give one, or one "
                                  f"per prompt")
        bad = next((m for m in n if m < 1), None)
        if bad is not None:
            raise GenerationError(f"max_new_tokens={bad} is invalid: must be >= 1")
        if slide:
            return n, [False] * len(rows)
        room = [self.cfg.block_size - len(r) + 1 for r in rows]
        return [min(m, r) for m, r in zip(n, room)], [r < m for m, r in zip(n, room)]

    @property
    def window_keep(self) -> int:
        """Tokens kept when the context slides (and when a long prompt is truncated)."""
        return max(1, self.cfg.block_size - self.cfg.block_size // 4)

    # ------------------------------------------------------------------ generation
    def generate(self, prompts: Union[Prompt, list[Prompt]], max_new_tokens: int = 128, **kw) -> list[Completion]:
        """Run to the end; one Completion per prompt (per sample with ``num_samples``)."""
        out: dict[int, Completion] = {}
        for _ in self.stream(prompts, max_new_tokens, completions=out, **kw):
            pass
        return [out[i] for i in sorted(out)]

    def beam_search(self, prompts: Union[Prompt, list[Prompt]], num_beams: int = 4, max_new_tokens: int = 128,
                    **kw) -> list[Completion]:
        """The best continuation of each prompt by beam search (see :mod:`scalelm.generate.beam`)."""
        from .beam import beam_search

        return beam_search(self, prompts, num_beams, max_new_tokens, **kw)

    def stream(self, prompts: Union[Prompt, list[Prompt]], max_new_tokens: Union[int, Sequence[int]] = 128,
               sampling: Optional[SamplingParams] = None, stop: Sequence[str] = (),
               seed: Optional[int] = None, num_samples: int = 1, truncate: bool = False,
               ignore_eos: bool = False, completions: Optional[dict] = None, slide: bool = True,
               grammar: Optional[Grammar] = None) -> Iterator[Event]:
        """An iterator of Events: one per generated token per row, then a closing one per row.

        ``prompts``: a text, a list of token ids, or a list of either (a batch). Rows are the
        prompts in order, each repeated ``num_samples`` times. ``max_new_tokens``: one budget, or
        one per prompt. ``slide=False``: a row whose context fills ends there (``"length"``,
        ``stopped_at_context``) instead of sliding its window. ``grammar`` (a JSON schema, regex,
        ...: :mod:`scalelm.generate.constrained`): every row's text matches it; a row ends
        (``"stop"``) when its grammar is complete. Bad arguments fail here, before iterating.
        ``completions`` (a dict) receives each row's Completion when it finishes.
        """
        sampling = (sampling or SamplingParams()).validate()
        if isinstance(max_new_tokens, int) and max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={max_new_tokens} is invalid: must be >= 1")
        if num_samples < 1:
            raise GenerationError(f"num_samples={num_samples} is invalid: must be >= 1")
        if stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer (this checkpoint has none)")
        prompt_rows, prompt_cuts = self._prompt_rows(prompts, truncate)
        budgets, short = self.budgets(prompt_rows, max_new_tokens, slide)
        k = num_samples
        rows = [r for r in prompt_rows for _ in range(k)]
        budgets, short = [n for n in budgets for _ in range(k)], [s for s in short for _ in range(k)]
        cuts = [c for c in prompt_cuts for _ in range(k)]
        gen = None
        if not sampling.greedy:  # a private generator: the global RNG is neither used nor disturbed
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed if seed is not None else random.SystemRandom().randrange(2**63))
        done = completions if completions is not None else {}
        eos = frozenset() if ignore_eos else self.eos_ids
        constraint = None
        if grammar is not None:  # compiled before iterating: a schema that cannot compile fails here
            constraint = compile_grammar(grammar, self.tokenizer, self.cfg.vocab_size, self.eos_ids)
        if self.speculator is None:
            events = self._decode(rows, budgets, sampling, list(stop), gen, eos, done, constraint)
        elif constraint is not None:
            raise GenerationError("a grammar (--json-schema, --regex, --choice) is not for speculative decoding: "
                                  "decode without --draft/--prompt-lookup")
        elif sampling.constrains:
            raise GenerationError("no_repeat_ngram_size and min_new_tokens are not for speculative decoding: decode "
                                  "without --draft/--prompt-lookup")
        elif slide and len(set(budgets)) == 1:
            events = self.speculator.decode(self, rows, budgets[0], sampling, list(stop), gen, eos, done)
        else:
            raise GenerationError("speculative decoding takes one max_new_tokens for every prompt and slides the "
                                  "context: decode without --draft/--prompt-lookup")
        return self._noted(events, done, cuts, short)

    @staticmethod
    def _noted(events: Iterator[Event], done: dict, cuts: list[int], short: list[bool]) -> Iterator[Event]:
        """``events``, each row's Completion marked with what the context did to it as it finishes."""
        for ev in events:
            if ev.finish_reason is not None:
                c = done[ev.index]
                c.prompt_cut_tokens = cuts[ev.index]
                c.stopped_at_context = short[ev.index] and ev.finish_reason == "length"
            yield ev

    @torch.inference_mode()
    def _decode(self, rows: list[list[int]], budgets: list[int], sampling: SamplingParams,
                stops: list[str], gen: Optional[torch.Generator], eos: frozenset,
                done: dict[int, Completion], constraint=None) -> Iterator[Event]:
        """Each row as it would decode alone. Rows line up at the right (left padding) and a
        finished row leaves the batch (``index_rows``). When every row's prompt and budget fit the
        context, the cache is made long enough for all of them (each row's positions are its own,
        so a short row may use slots past ``block_size``) and nothing is recomputed. Otherwise the
        batch is prefilled again when a row fills its context (that row keeps its last 3/4, the
        others all they have: no row loses context to a longer neighbour) or when the slots run out."""
        B, T = len(rows), self.cfg.block_size
        fits = all(len(r) + n - 1 <= T for r, n in zip(rows, budgets))
        cache = self._new_cache(B, max(map(len, rows)) + max(budgets) - 1 if fits else T)
        seqs = [list(r) for r in rows]
        texts = [TextStream(self.tokenizer, r, stops) for r in rows]
        comps = [Completion(i, list(r)) for i, r in enumerate(rows)]
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen = torch.zeros(B, self.cfg.vocab_size, dtype=torch.bool, device=self.device)
            for b, r in enumerate(rows):
                seen[b, r] = True
        live = list(range(B))  # the cache's rows, in order
        held = [len(r) for r in rows]  # live[j]'s tokens in the cache: the last held[j] of its sequence
        matchers = [constraint.matcher() for _ in rows] if constraint is not None else None
        logits = self._prefill(cache, seqs)
        while True:
            if sampling.constrains:  # no repeated n-gram, no end-of-text before min_new_tokens
                logits = constrain(logits, sampling, [seqs[b] for b in live], [len(comps[b].tokens) for b in live],
                                   sorted(eos))
            if matchers is not None:  # structured output: only what each row's grammar allows
                logits = mask_logits(logits, [matchers[b] for b in live])
            tok = next_token_checked(logits, sampling, gen, seen)
            ids = tok.tolist()  # the one host sync per step: text, stops and eos need the ids
            if NON_FINITE in ids:  # logits that are no distribution (a broken model or graph): stop and say so
                b = live[ids.index(NON_FINITE)]
                raise NonFiniteLogits(len(comps[b].tokens) + 1, b)
            still = []
            for j, b in enumerate(live):
                t, c = ids[j], comps[b]
                if t in eos:
                    yield self._finish(c, texts[b], "eos", done)
                    continue
                c.tokens.append(t)
                seqs[b].append(t)
                delta = texts[b].add(t)
                if matchers is not None and matchers[b].advance(t):  # the grammar is complete: nothing may follow
                    yield Event(b, t, delta + texts[b].flush())
                    yield self._finish(c, texts[b], "stop", done)
                    continue
                if texts[b].stopped:
                    c.text = texts[b].text
                    yield Event(b, t, delta)
                    yield self._finish(c, texts[b], "stop", done)
                    continue
                yield Event(b, t, delta)
                if len(c.tokens) >= budgets[b]:
                    yield self._finish(c, texts[b], "length", done)
                    continue
                still.append(j)
            if not still:
                break
            if len(still) < len(live):
                sel = torch.tensor(still, device=self.device)
                cache.index_rows(sel)
                tok = tok[sel]
                seen = seen[sel] if seen is not None else None
                live, held = [live[j] for j in still], [held[j] for j in still]
            if seen is not None:
                seen.scatter_(1, tok[:, None], True)
            full = {j for j in range(len(live)) if held[j] >= T}  # rows that outgrew the context: slide
            if full or cache.pos >= cache.max_len:
                window = [seqs[b][-(self.window_keep if j in full else held[j] + 1):] for j, b in enumerate(live)]
                for j in full:
                    comps[live[j]].context_slides += 1
                logits = self._prefill(cache, window)
                held = [len(w) for w in window]
            else:
                logits = self._step(tok[:, None], kv_cache=cache, last_only=True)[0][:, -1]
                held = [h + 1 for h in held]

    def _new_cache(self, batch_size: int, capacity: int) -> GeneratorKVCache:
        """The cache one ``_decode`` fills (another runtime's model brings its own, see onnx_backend)."""
        own = getattr(self.model, "new_cache", None)
        if own is not None:
            return own(batch_size, capacity)
        return PreallocatedKVCache(self.cfg, batch_size, max_len=capacity, device=self.device, dtype=self.dtype)

    def _prefill(self, cache: GeneratorKVCache, seqs: list[list[int]]) -> torch.Tensor:
        """Left-pad rows to one length, reset the cache and run them; last-position logits."""
        return self.model(self._left_padded(cache, seqs), kv_cache=cache, last_only=True)[0][:, -1]

    def _left_padded(self, cache: GeneratorKVCache, seqs: list[list[int]]) -> torch.Tensor:
        """``seqs`` left-padded to one length (on the device), the cache reset to skip the padding."""
        T = max(map(len, seqs))
        idx = torch.zeros(len(seqs), T, dtype=torch.long)
        for b, s in enumerate(seqs):
            idx[b, T - len(s):] = torch.tensor(s)
        start = torch.tensor([T - len(s) for s in seqs])
        cache.reset(start if int(start.max()) > 0 else None)
        return idx.to(self.device)

    @staticmethod
    def _finish(c: Completion, text: TextStream, reason: str, done: dict) -> Event:
        delta = text.flush() if reason != "stop" else ""
        c.text, c.finish_reason = text.text, reason
        done[c.index] = c
        return Event(c.index, None, delta, reason)


def generate_text(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 128, temperature: float = 0.8,
                  top_k: int = 200, top_p: float = 1.0, repetition_penalty: float = 1.0,
                  seed: Optional[int] = None, stop: Sequence[str] = ()) -> str:
    """One continuation of ``prompt`` from an in-memory model (e.g. right after training);
    ends at ``<|endoftext|>``; a prompt longer than the context keeps its last tokens."""
    eot = tokenizer.token_to_id(EOT) if tokenizer is not None else None
    gen = Generator(model, tokenizer, [] if eot is None else [eot])
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
    return gen.generate(prompt, max_new_tokens, sampling=params, seed=seed, stop=stop, truncate=True)[0].text
