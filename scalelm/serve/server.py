"""Requests to sequences and back: validation, prompts, sampling settings, OpenAI's shapes.

:class:`Server` holds what the routes share (the generator, engine, metrics, chat format) and
turns request fields into :class:`~scalelm.serve.engine.Seq` objects, checking every limit
first (context length, vocabulary, stop strings, logit bias) so that the engine only sees valid
work. :class:`Submission` carries one request's sequences into the engine and their events back
to the event loop (an asyncio queue fed with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Optional

import torch
from fastapi import Request

from ..errors import UserError
from ..generate.generator import Generator
from ..generate.sampling import SamplingParams
from . import MAX_BATCH
from .engine import Engine, Event, QueueFull, Seq, SeqParams
from .gate import MAX_BODY, APIError
from .metrics import Metrics
from .schemas import MAX_STOPS, SamplingFields

log = logging.getLogger("scalelm.serve")

GREEDY_BELOW = 1e-5  # temperatures this small are greedy (dividing logits by them overflows)
MAX_STEER = 1e4  # the largest entry of scale x steering vector a request may add to the residual stream
MIN_TOP_P = 1e-6  # smaller top_p values keep only the top token anyway


class Submission:
    """One request's sequences in the engine; their events arrive on an asyncio queue."""

    def __init__(self, engine: Engine):
        self.engine, self.loop, self.queue = engine, asyncio.get_running_loop(), asyncio.Queue()
        self.seqs: list[Seq] = []
        self.finished: set[int] = set()

    def push(self, events: list) -> None:  # called by the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, events)

    def start(self, seqs: list[Seq]) -> "Submission":
        self.seqs = seqs
        try:
            self.engine.submit(seqs)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry later.", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None
        return self

    async def events(self):
        while len(self.finished) < len(self.seqs):
            for ev in await self.queue.get():
                if ev.finish_reason is not None:
                    self.finished.add(ev.index)
                yield ev

    def cancel(self) -> None:
        left = [s for s in self.seqs if s.index not in self.finished]
        if left:
            self.engine.cancel(left)

    async def collect(self, request: Request) -> list[Event]:
        """All events; cancelled if the client disconnects first."""
        async def run():
            return [ev async for ev in self.events()]

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(run()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                self.cancel()
        if not work.done() or work.cancelled():
            raise ClientGone()
        return work.result()


class ClientGone(Exception):
    pass


class Choice:
    """A choice being assembled from its events."""

    def __init__(self):
        self.text, self.tokens, self.lps = "", [], []
        self.prompt_lp: Optional[list] = None
        self.finish: Optional[str] = None

    def add(self, ev: Event) -> None:
        if ev.error is not None:
            raise APIError(500, f"Generation failed: {ev.error}.", type="server_error")
        if ev.prompt_logprobs is not None:
            self.prompt_lp = ev.prompt_logprobs
        if ev.token is not None:
            self.tokens.append(ev.token)
            self.lps.append((ev.logprob, ev.top))
        self.text += ev.text
        if ev.finish_reason is not None:
            self.finish = ev.finish_reason


# ----------------------------------------------------------------------------- the server
class Server:
    """What the routes share: the generator (model + tokenizer), engine, metrics, settings."""

    def __init__(self, gen: Generator, name: str, max_batch: int = MAX_BATCH, max_queue: int = 64,
                 api_key: Optional[str] = None, max_body: int = MAX_BODY, model_dir=None,
                 truncate_prompts: bool = False, steer_vectors: Optional[dict] = None, **engine_kw):
        self.gen, self.name, self.api_key, self.max_body = gen, name, api_key or None, max_body
        self.steer_vectors = dict(steer_vectors or {})  # name -> (vector, layer): requests' `steer` by name
        self.truncate_prompts = truncate_prompts
        self.metrics = Metrics()
        # engine_kw: prefix_cache_mb, prefill_chunk (engine.py's defaults if not given)
        self.engine = Engine(gen, max_batch=max_batch, max_queue=max_queue, metrics=self.metrics, **engine_kw)
        self.metrics.bind(self.engine)
        self.created = int(time.time())
        self.chat, self.chat_error = None, None
        if gen.chat_template is None:
            self.chat_error = (f"The model `{name}` has no chat template (tokenizer_config.json or "
                               "chat_template.jinja in its directory); use /v1/completions instead.")
        else:
            from ..generate.chat import ChatFormat

            try:
                self.chat = ChatFormat(gen, model_dir)
            except UserError as e:
                self.chat_error = f"The model's chat template cannot be used: {e}"
                log.warning("chat disabled: %s", e)
        self._tokstr: dict[int, str] = {}

    # ------------------------------------------------------------------ prompts
    def check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"The model `{model}` does not exist (this server serves `{self.name}`).",
                           param="model", code="model_not_found")

    def encode(self, text: str, param: str, special: bool = True) -> list[int]:
        if self.gen.tokenizer is None:
            raise APIError(400, "This model has no tokenizer: send the prompt as token ids.", param=param)
        try:
            return self.gen.encode(text, add_special_tokens=special)
        except Exception:  # e.g. unpaired surrogates, which the tokenizer cannot take
            raise APIError(400, "The text could not be tokenized (is it valid Unicode?).", param=param) from None

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        V = self.gen.cfg.vocab_size
        bad = next((i for i in ids if not 0 <= i < V), None)
        if bad is not None:
            raise APIError(400, f"Token id {bad} is outside the vocabulary [0, {V}).", param=param)
        if not ids:
            if self.gen.bos_id is None:
                raise APIError(400, "The prompt is empty and the model has no end-of-text token to start "
                                    "from.", param=param)
            ids = [self.gen.bos_id]
        return ids

    def check_length(self, ids: list[int], max_tokens: int, param: str) -> None:
        ctx = self.gen.cfg.block_size
        if len(ids) > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has "
                                f"{len(ids)} tokens. Please shorten it.", param=param, code="context_length_exceeded")
        if len(ids) + max_tokens > ctx:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                                "completion). Please reduce the prompt or max_tokens.", param="max_tokens",
                           code="context_length_exceeded")

    def fit_prompt(self, ids: list[int], max_tokens: int, keep: Optional[int], param: str) -> tuple[list[int], int]:
        """``(the prompt the model reads, how many tokens were dropped from its start)``: the last
        ``keep`` tokens (a request's ``truncate_prompt_tokens``), or with ``truncate_prompts`` the
        last ones that leave room for ``max_tokens``; else the prompt, if it fits the context."""
        ctx = self.gen.cfg.block_size
        if keep is not None and keep > ctx:
            raise APIError(400, f"truncate_prompt_tokens={keep} is more than this model's context of {ctx} tokens.",
                           param="truncate_prompt_tokens")
        if keep is None and self.truncate_prompts and max_tokens < ctx:
            keep = ctx - max_tokens
        cut = max(0, len(ids) - keep) if keep is not None else 0
        self.check_length(ids[cut:], max_tokens, param)
        return ids[cut:], cut

    def decode(self, ids: list[int]) -> str:
        return self.gen.decode(ids) if self.gen.tokenizer is not None else ""

    def token_str(self, i: int) -> str:
        s = self._tokstr.get(i)
        if s is None:
            s = self.gen.tokenizer.decode([i], skip_special_tokens=False) if self.gen.tokenizer else f"token_id:{i}"
            self._tokstr[i] = s
        return s

    # ------------------------------------------------------------------ sampling settings
    def seq_params(self, body: SamplingFields, max_tokens: int, logprobs: Optional[int], echo_logprobs: bool,
                   extra_stops=(), constraint=None) -> SeqParams:
        """``constraint``: the request's compiled grammar (structured.py, tools.py), if any."""
        V = self.gen.cfg.vocab_size
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS:
            raise APIError(400, f"At most {MAX_STOPS} stop strings are allowed.", param="stop")
        stops = [s for s in stops if s] + list(extra_stops)
        if stops and self.gen.tokenizer is None:
            raise APIError(400, "Stop strings need a tokenizer, which this model has not.", param="stop")
        for t in body.stop_token_ids or []:
            if not 0 <= t < V:
                raise APIError(400, f"stop_token_ids: {t} is outside the vocabulary [0, {V}).",
                               param="stop_token_ids")
        bias = {}
        for k, b in (body.logit_bias or {}).items():
            if not k.isdigit() or int(k) >= V:
                raise APIError(400, f"logit_bias: {k!r} is not a token id in [0, {V}).", param="logit_bias")
            if not -100 <= b <= 100:
                raise APIError(400, f"logit_bias: {b} is outside [-100, 100].", param="logit_bias")
            bias[int(k)] = b
        if body.min_tokens > max_tokens:
            raise APIError(400, f"min_tokens={body.min_tokens} is more than max_tokens={max_tokens}.",
                           param="min_tokens")
        temp = body.temperature if body.temperature >= GREEDY_BELOW else 0.0
        try:
            # a top_p below float32's range would drop every token (sampling compares in float32)
            top_p = max(body.top_p, MIN_TOP_P)
            sampling = SamplingParams(temp, max(0, body.top_k), top_p, body.repetition_penalty,
                                      body.no_repeat_ngram_size).validate()
        except UserError as e:
            raise APIError(400, str(e)) from None
        return SeqParams(max_tokens=max_tokens, sampling=sampling, presence_penalty=body.presence_penalty,
                         frequency_penalty=body.frequency_penalty, min_tokens=body.min_tokens,
                         ignore_eos=body.ignore_eos, stop=tuple(stops), stop_token_ids=tuple(body.stop_token_ids or ()),
                         logit_bias=bias or None, logprobs=logprobs, prompt_logprobs=echo_logprobs,
                         seed=None if body.seed is None else body.seed % 2**63, steer=self.steering(body),
                         constraint=constraint)

    def steering(self, body: SamplingFields) -> Optional[tuple]:
        """A request's ``steer`` as ``(vector, layer, scale)``, checked against the model (None without one)."""
        st = body.steer
        if st is None:
            return None
        cfg = self.gen.cfg
        if getattr(cfg, "arch", "gpt") != "gpt":
            raise APIError(400, "Steering vectors are for decoder-only models.", param="steer")
        if isinstance(st.vector, str):
            if st.vector not in self.steer_vectors:
                have = ", ".join(sorted(self.steer_vectors)) or "none (start it with --steer-vector NAME=FILE)"
                raise APIError(400, f"Unknown steering vector {st.vector!r}; this server has: {have}.",
                               param="steer.vector")
            vec, layer = self.steer_vectors[st.vector]
        else:
            if len(st.vector) != cfg.n_embd:
                raise APIError(400, f"steer.vector has {len(st.vector)} numbers; this model's residual stream has "
                                    f"{cfg.n_embd}.", param="steer.vector")
            vec = torch.tensor(st.vector, dtype=torch.float32)
            if not bool(torch.isfinite(vec).all()):
                raise APIError(400, "steer.vector must hold finite numbers.", param="steer.vector")
            if st.layer is None:
                raise APIError(400, "steer.layer is required with a vector given as numbers.", param="steer.layer")
            layer = None
        layer = st.layer if st.layer is not None else layer
        if not 0 <= layer < cfg.n_layer:
            raise APIError(400, f"steer.layer={layer} is outside this model's layers [0, {cfg.n_layer}).",
                           param="steer.layer")
        peak = float(vec.abs().max()) * abs(st.scale)
        if peak > MAX_STEER:  # beyond this the stream overflows into inf/NaN: no text, and logprobs that are no JSON
            raise APIError(400, f"steer: scale x vector reaches {peak:.3g} in one entry; at most {MAX_STEER:g} "
                                "(a steering vector's entries are usually below 10).", param="steer.scale")
        return vec, layer, float(st.scale)

    def make_seqs(self, sub: Submission, prompts: list[list[int]], n: int, params: SeqParams) -> list[Seq]:
        if len(prompts) * n > self.engine.max_queue:
            raise APIError(400, f"The request asks for {len(prompts) * n} sequences (prompts x n); this server "
                                f"queues at most {self.engine.max_queue}.", param="n")
        seqs = []
        for i, ids in enumerate(prompts):
            for j in range(n):
                p = params if params.seed is None or j == 0 else \
                    SeqParams(**{**params.__dict__, "seed": (params.seed + j) % 2**63})
                seqs.append(Seq(i * n + j, ids, p, sub.push))
        return seqs

    # ------------------------------------------------------------------ logprobs in OpenAI's shapes
    def completion_logprobs(self, pairs: list, offset0: int = 0) -> dict:
        """pairs: [(token id, logprob or None, top or None)] -> the legacy completions shape."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        off = offset0
        for tok, lp, top in pairs:
            s = self.token_str(tok)
            out["tokens"].append(s)
            out["token_logprobs"].append(lp)
            if lp is None:
                out["top_logprobs"].append(None)
            else:
                d: dict = {}
                for i, v in [*(top or []), (tok, lp)]:  # tokens that decode alike keep the likeliest
                    d.setdefault(self.token_str(i), v)
                out["top_logprobs"].append(d)
            out["text_offset"].append(off)
            off += len(s)
        return out

    def chat_logprobs(self, pairs: list) -> dict:
        def entry(tok, lp):
            s = self.token_str(tok)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

        return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in (top or [])]}
                            for t, lp, top in pairs]}

    def usage(self, prompts: list[list[int]], completion_tokens: int, dropped: int = 0) -> dict:
        """OpenAI's usage; ``prompt_tokens_dropped`` (only when some were) counts the prompt tokens
        that truncation kept from the model (``prompt_tokens`` counts the ones it read)."""
        p = sum(len(x) for x in prompts)
        return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens,
                **({"prompt_tokens_dropped": dropped} if dropped else {})}
