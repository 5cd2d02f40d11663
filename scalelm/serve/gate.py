"""What every request passes first, and the error shape every answer uses.

:class:`Gate` is ASGI middleware in front of all routes: it counts requests and their latency
per endpoint (``/metrics``), checks the API key (``hmac.compare_digest``; every route but
``/health`` and the web chat page's files) and limits the body to ``max_body`` bytes (413),
reading it itself and replaying it to the app. :class:`APIError` is an error answered as OpenAI does:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import hmac
import time
from typing import Optional

from fastapi.responses import JSONResponse

MAX_BODY = 1 << 20  # bytes of a request body
ENDPOINTS = ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
OPEN_PATHS = ("/health", "/")  # answered without an API key: liveness, and the web chat page (webchat.py)
OPEN_PREFIXES = ("/static/",)  # the page's script and style: public, they hold no secret


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code, self.headers)


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   headers: Optional[dict] = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- the gate
class Gate:
    """ASGI middleware in front of every route: metrics per request, the API key, the body limit.

    The body is read here (at most ``max_body`` bytes, else 413) and replayed to the app, so a
    client cannot make the server buffer more than that."""

    def __init__(self, app, server):  # a serve.server.Server
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        status, t0 = [0], time.perf_counter()

        async def send_seen(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            error = self._refuse(scope, path)
            if error is not None:
                return await error(scope, receive, send_seen)
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = b""
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body += msg.get("body", b"")
                    if len(body) > self.server.max_body:
                        return await self._too_large()(scope, receive, send_seen)
                    if not msg.get("more_body", False):
                        break
                receive = _replay(body, receive)
            await self.app(scope, receive, send_seen)
        finally:
            self.server.metrics.request(endpoint, status[0] or 499, time.perf_counter() - t0)

    def _refuse(self, scope, path: str):
        headers = dict(scope["headers"])
        key = self.server.api_key
        if key is not None and path not in OPEN_PATHS and not path.startswith(OPEN_PREFIXES):
            given = headers.get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), key.encode()):
                return error_response(401, "Incorrect or missing API key: send `Authorization: Bearer KEY`.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.server.max_body):
            return self._too_large()
        return None

    def _too_large(self) -> JSONResponse:
        return error_response(413, f"The request body is larger than {self.server.max_body} bytes.",
                              code="request_too_large")


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later calls: the client's disconnect
    return replayed
