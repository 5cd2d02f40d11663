"""The FastAPI app: OpenAI's routes over a :class:`~scalelm.serve.server.Server`.

    GET  /                       the web chat page (webchat.py; no API key needed)
    GET  /health                 liveness, active rows, queue depth (no API key needed)
    GET  /metrics                Prometheus text
    GET  /v1/models              the one served model
    POST /v1/completions         text or token-id prompts; streaming, n, stop, logprobs, echo
    POST /v1/chat/completions    messages rendered with the model directory's chat template

A request becomes sequences (one per prompt and per ``n``) that the engine decodes in its
batch; their tokens come back as one JSON body or as server-sent events (``data: {...}``
chunks, then ``data: [DONE]``). Every error is a JSON body in OpenAI's shape: validation errors
and bad JSON are 400 (not FastAPI's 422), a wrong API key 401, an unknown model 404
(``model_not_found``), an oversized body 413, a full queue 429 with ``Retry-After``. No request
field reaches the filesystem: the model and its tokenizer are fixed at start.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import UserError
from .gate import APIError, Gate, error_response
from .metrics import CONTENT_TYPE_LATEST
from .schemas import ChatCompletionRequest, CompletionRequest
from .server import Choice, ClientGone, Server, Submission
from .structured import compile_for, request_constraint, request_grammar
from .tools import CallStream, ToolPlan, conversation, message, plan
from .webchat import add_web_chat

log = logging.getLogger("scalelm.serve")

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
FINISH = {"stop": "stop", "length": "length", "tool_calls": "tool_calls"}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _Stream(StreamingResponse):
    """SSE response that cancels its sequences however it ends (done, error, client gone)."""

    def __init__(self, content, sub: Submission):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.sub = sub

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.sub.cancel()


# ----------------------------------------------------------------------------- chat prompts
def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """A request's messages as a chat template reads them: text parts joined, ``developer`` as ``system``."""
    msgs = []
    for m in body.messages:
        content = m.content
        if isinstance(content, list):
            if any(part.type != "text" for part in content):
                raise APIError(400, "Only text content parts are supported.", param="messages")
            content = "".join(part.text or "" for part in content)
        msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content or "",
                     **({"name": m.name} if m.name else {})})
    return msgs


def chat_prompt_ids(server: Server, body: ChatCompletionRequest, tools: Optional[ToolPlan] = None) -> list[int]:
    """The prompt of a chat request: its messages rendered and tokenized as ``scalelm chat`` does (the
    model's :class:`~scalelm.data.chat_template.ChatTemplate`, the one SFT training used). A control
    token's text inside a message stays text: a client cannot end its turn or forge a system turn.
    ``tools``: the request's tools and tool calls, rendered as tools.py says."""
    if server.gen.tokenizer is None:
        raise APIError(400, "This model has no tokenizer: chat needs one.", param="messages")
    try:
        template = server.chat.template.text if server.chat.template is not None else ""
        ids = server.chat.encode(*conversation(body, chat_messages(body), template, tools or ToolPlan()))
    except UserError as e:
        raise APIError(400, str(e), param="messages") from None
    except TypeError:  # the tokenizer refuses e.g. unpaired surrogates
        raise APIError(400, "The text could not be tokenized (is it valid Unicode?).", param="messages") from None
    return server.check_ids(ids, "messages")


# ----------------------------------------------------------------------------- errors
EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "a boolean", "string_type": "a string",
            "list_type": "an array", "dict_type": "an object", "model_type": "an object"}
JSON_TYPES = ((bool, "a boolean"), (int, "an integer"), (float, "a number"), (str, "a string"), (list, "an array"),
              (dict, "an object"), (type(None), "null"))


def type_error(errs: list) -> Optional[JSONResponse]:
    """The first error, when it is a field of the wrong JSON type, answered as OpenAI answers it
    (``invalid_type``); None for other errors. A field whose type is a union (``prompt``) fails once
    per member, under the members' names: those keep the general message."""
    err = errs[0] if errs else {}
    loc = [x for x in err.get("loc", ()) if x != "body"]
    if err.get("type") not in EXPECTED or not loc or \
            sum(1 for x in errs if [y for y in x.get("loc", ()) if y != "body"][:1] == loc[:1]) > 1:
        return None
    name = str(loc[0]) + "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in loc[1:])
    got = next((what for t, what in JSON_TYPES if isinstance(err.get("input"), t)), "another type")
    return error_response(400, f"Invalid type for '{name}': expected {EXPECTED[err['type']]}, but got {got} "
                               "instead.", param=name, code="invalid_type")


# ----------------------------------------------------------------------------- the app
def error_chunk(ev) -> str:
    """The stream's last event when a decode step failed (the HTTP status is already sent)."""
    return sse({"error": {"message": f"Generation failed: {ev.error}.", "type": "server_error",
                          "param": None, "code": None}})


def stream_end(server: Server, body, head: dict, sub: Submission, prompts: list, dropped: int) -> Iterator[str]:
    """The usage chunk (when ``stream_options.include_usage``), then ``[DONE]``."""
    if body.stream_options is not None and body.stream_options.include_usage:
        gen_tokens = sum(len(s.tokens) for s in sub.seqs)
        yield sse({**head, "choices": [], "usage": server.usage(prompts, gen_tokens, dropped)})
    yield "data: [DONE]\n\n"


async def collect_choices(sub: Submission, request: Request, n_choices: int) -> Optional[list]:
    """Every choice of a non-streaming request, or None when the client went away."""
    try:
        events = await sub.collect(request)
    except ClientGone:
        return None
    choices = [Choice() for _ in range(n_choices)]
    for ev in events:
        choices[ev.index].add(ev)
    return choices


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        if not server.engine.alive:
            server.engine.start()
        yield
        server.engine.stop()

    app = FastAPI(title="scalelm serve", version="1", lifespan=lifespan,
                  description="An OpenAI-compatible API for one scalelm model directory.")
    app.state.server = server
    app.add_middleware(Gate, server=server)
    add_web_chat(app)  # GET / : the web chat page (no API key needed; its calls send the one typed in)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        errs = e.errors()
        if errs and errs[0].get("type") == "json_invalid":
            return error_response(400, "The request body is not valid JSON.", code="invalid_json")
        wrong = type_error(errs)
        if wrong is not None:
            return wrong
        parts, param = [], None
        for err in errs[:3]:
            loc = [str(x) for x in err.get("loc", ()) if x != "body"]
            param = param or (loc[0] if loc else None)
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}")
        return error_response(400, "Invalid request: " + "; ".join(parts), param=param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        return error_response(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None,
                              headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request, e: Exception):
        log.exception("unhandled error")
        return error_response(500, "Internal server error.", type="server_error")

    @app.get("/health")
    async def health():
        eng = server.engine
        body = {"status": "ok" if eng.alive else "engine stopped", "model": server.name,
                "active_rows": eng.active, "queued": eng.queued, "max_batch": eng.max_batch,
                "max_queue": eng.max_queue}
        return JSONResponse(body, status_code=200 if eng.alive else 503)

    # probes that send HEAD (load balancers, curl -I) get GET's status and headers, no body
    app.add_api_route("/health", health, methods=["HEAD"], include_in_schema=False)

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": server.name, "object": "model", "created": server.created, "owned_by": "scalelm",
                "max_model_len": server.gen.cfg.block_size}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(model: str):
        server.check_model(model)
        return model_card()

    def ready() -> None:
        if not server.engine.alive:
            raise APIError(503, "The decode engine is not running.", type="server_error")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        server.check_model(body.model)
        ready()
        p = body.prompt
        items = [p] if isinstance(p, str) or (p and all(isinstance(x, int) for x in p)) else list(p)
        if not items:
            raise APIError(400, "The prompt is empty: give a text, token ids, or a list of them.", param="prompt")
        given, texts = [], []
        for x in items:
            ids = server.check_ids(server.encode(x, "prompt") if isinstance(x, str) else list(x), "prompt")
            given.append(ids)
            texts.append(x if isinstance(x, str) else server.decode(ids))
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        # the model reads prompts[i], the last tokens of given[i]: cuts[i] were dropped (truncation)
        fitted = [server.fit_prompt(ids, max_tokens, body.truncate_prompt_tokens, "prompt") for ids in given]
        prompts, cuts = [ids for ids, _ in fitted], [cut for _, cut in fitted]
        # compiled off the event loop (a large schema takes a while; llguidance releases the GIL)
        constraint = await run_in_threadpool(request_constraint, server, body)
        params = server.seq_params(body, max_tokens, body.logprobs, body.echo and body.logprobs is not None,
                                   constraint=constraint)
        sub = Submission(server.engine)
        sub.start(server.make_seqs(sub, prompts, body.n, params))
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": server.name}
        n = body.n
        want_lp = body.logprobs is not None

        def prompt_pairs(i: int, plp: Optional[list]) -> list:
            """The echoed prompt is the one sent: tokens truncation dropped have no logprob, as the first."""
            return [(t, None, None) for t in given[i][:cuts[i]]] + \
                [(t, lp, top) for t, (lp, top) in zip(prompts[i], plp or [(None, None)] * len(prompts[i]))]

        if body.stream:
            async def chunks():
                started, sent = set(), [0] * len(prompts) * n
                async for ev in sub.events():
                    if ev.error is not None:
                        yield error_chunk(ev)
                        break
                    text, pairs, off = ev.text, [], sent[ev.index]
                    if ev.index not in started:
                        started.add(ev.index)
                        if body.echo:
                            text = texts[ev.index // n] + text
                            if want_lp:
                                pairs += prompt_pairs(ev.index // n, ev.prompt_logprobs)
                    if ev.token is not None and want_lp:
                        pairs.append((ev.token, ev.logprob, ev.top))
                    sent[ev.index] += len(text)
                    if not text and not pairs and ev.finish_reason is None:
                        continue
                    yield sse({**head, "choices": [{
                        "index": ev.index, "text": text,
                        "logprobs": server.completion_logprobs(pairs, off) if want_lp else None,
                        "finish_reason": FINISH.get(ev.finish_reason)}]})
                for line in stream_end(server, body, head, sub, prompts, sum(cuts)):
                    yield line
            return _Stream(chunks(), sub)

        choices = await collect_choices(sub, request, len(prompts) * n)
        if choices is None:
            return Response(status_code=499)
        out = []
        for i, c in enumerate(choices):
            prefix = texts[i // n] if body.echo else ""
            lp = None
            if want_lp:
                pairs = (prompt_pairs(i // n, c.prompt_lp) if body.echo else []) + \
                        [(t, a, b) for t, (a, b) in zip(c.tokens, c.lps)]
                lp = server.completion_logprobs(pairs)
            out.append({"index": i, "text": prefix + c.text, "logprobs": lp, "finish_reason": FINISH.get(c.finish)})
        return {**head, "choices": out, "usage": server.usage(prompts, sum(len(c.tokens) for c in choices), sum(cuts))}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        server.check_model(body.model)
        if server.chat is None:
            raise APIError(400, server.chat_error, param="messages", code="no_chat_template")
        ready()
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        # structured output and tool calls: the grammar the reply keeps to (tools.py, structured.py)
        fmt = request_grammar(body)
        tp = plan(body, fmt)
        grammar, param = (tp.grammar, "tools") if tp.grammar is not None else fmt or (None, None)
        constraint = await run_in_threadpool(compile_for, server, grammar, param) if grammar is not None else None
        # without max_tokens the reply may fill the context: the prompt needs room for one token
        ids, cut = server.fit_prompt(chat_prompt_ids(server, body, tp), 1 if asked is None else asked,
                                     body.truncate_prompt_tokens, "messages")
        max_tokens = server.gen.cfg.block_size - len(ids) if asked is None else asked
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = server.seq_params(body, max_tokens, k, False, extra_stops=server.chat.stops, constraint=constraint)
        sub = Submission(server.engine)
        sub.start(server.make_seqs(sub, [ids], body.n, params))
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": server.name}

        if body.stream:
            async def chunks():
                obj = {**head, "object": "chat.completion.chunk"}
                for i in range(body.n):
                    yield sse({**obj, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "logprobs": None, "finish_reason": None}]})
                calls = [CallStream(tp) for _ in range(body.n)]  # text as content; tool calls as tool_calls deltas
                async for ev in sub.events():
                    if ev.error is not None:
                        yield error_chunk(ev)
                        break
                    lp = None
                    if k is not None and ev.token is not None:
                        lp = server.chat_logprobs([(ev.token, ev.logprob, ev.top)])
                    deltas, finish = calls[ev.index].feed(ev.text), FINISH.get(ev.finish_reason)
                    if ev.finish_reason is not None:
                        rest, finish = calls[ev.index].finish(finish)
                        deltas += rest
                    if not deltas and lp is None and finish is None:
                        continue
                    for j, d in enumerate(deltas or [{}]):
                        last = j == max(len(deltas), 1) - 1
                        yield sse({**obj, "choices": [{"index": ev.index, "delta": d,
                                                       "logprobs": lp if j == 0 else None,
                                                       "finish_reason": finish if last else None}]})
                for line in stream_end(server, body, obj, sub, [ids], cut):
                    yield line
            return _Stream(chunks(), sub)

        choices = await collect_choices(sub, request, body.n)
        if choices is None:
            return Response(status_code=499)
        out = []
        for i, c in enumerate(choices):
            msg, finish = message(c.text, FINISH.get(c.finish), tp)  # tool calls parsed out (tools.py)
            out.append({"index": i, "message": msg,
                        "logprobs": server.chat_logprobs([(t, a, b) for t, (a, b) in zip(c.tokens, c.lps)])
                        if k is not None else None, "finish_reason": finish})
        return {**head, "object": "chat.completion", "choices": out,
                "usage": server.usage([ids], sum(len(c.tokens) for c in choices), cut)}

    return app
