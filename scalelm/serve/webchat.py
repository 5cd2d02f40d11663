"""The web chat page at ``/``: three static files from the package, talking to ``/v1`` like any client.

    GET  /                  the page (static/index.html); no API key needed
    GET  /static/{name}     its script and style sheet (chat.js, chat.css); no API key needed

The files hold no secret and nothing per server, so they are public (``gate.OPEN_PATHS``): a
browser cannot attach a key to the page load itself. The page asks ``/v1/models`` for the model
and streams ``/v1/chat/completions``, sending ``Authorization: Bearer KEY`` with the key the
user typed into it (kept in the tab's ``sessionStorage``); ``/v1/*`` stay behind the key. No CDN
or web font: the page works offline. Its Content-Security-Policy lets only these files run or
style it and connect only to this server, so even a bug that put model output into the DOM as
markup would not run it (the script writes text as text anyway).
"""

from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import Response

from .gate import APIError

STATIC_URL = "/static/"  # gate.OPEN_PREFIXES holds it too
PAGE_TYPE = "text/html; charset=utf-8"
ASSETS = {"chat.js": "text/javascript; charset=utf-8", "chat.css": "text/css; charset=utf-8"}  # name: type
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate: an upgraded server's page and script stay in step
}


@lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return (files(__package__) / "static" / name).read_bytes()


def asset(name: str) -> Response:
    """One of the page's files, by a name from a fixed list: a request names no path."""
    if name not in ASSETS:
        raise APIError(404, f"There is no static file {name!r}.", code="not_found")
    return Response(_read(name), media_type=ASSETS[name], headers=HEADERS)


def add_web_chat(app: FastAPI) -> None:
    """Route ``/`` and ``/static/{name}`` (GET and HEAD: probes and ``curl -I`` get the headers)."""

    async def page():
        return Response(_read("index.html"), media_type=PAGE_TYPE, headers=HEADERS)

    async def static(name: str):
        return asset(name)

    app.add_api_route("/", page, methods=["GET", "HEAD"], include_in_schema=False)
    app.add_api_route(STATIC_URL + "{name}", static, methods=["GET", "HEAD"], include_in_schema=False)
