"""The demo page: ``GET /`` (and ``/demo``) transcribes the microphone, or a local recording, live.

One static page (``web/index.html``) and its scripts (``web/*.js``: no framework, no build step,
nothing from another origin; shipped as package data).  The page speaks ``/v1/realtime`` like any
other client, opting in to ``transcription.partial``; with API keys it sends the key as the
WebSocket subprotocol ``openai-insecure-api-key.<key>`` (see ``auth.py``).  The page and its
assets stay open like ``/health``: they hold no data.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response

from .errors import APIError

WEB = Path(__file__).with_name("web")
ASSETS = {
    "demo.js": "text/javascript; charset=utf-8",
    "resample.js": "text/javascript; charset=utf-8",
    "capture-worklet.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
}
# The page loads nothing from elsewhere and talks only to this server.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

demo = Blueprint("demo", __name__)


def _file(name: str, content_type: str) -> Response:
    response = Response((WEB / name).read_bytes(), content_type=content_type)
    response.headers.update(SECURITY_HEADERS)
    return response


@demo.get("/")
@demo.get("/demo")
async def page():
    return _file("index.html", "text/html; charset=utf-8")


@demo.get("/demo/<name>")
async def asset(name: str):
    if name not in ASSETS:
        raise APIError(404, f"No demo asset named {name!r}.")
    return _file(name, ASSETS[name])
