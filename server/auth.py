"""API keys: ``Authorization: Bearer <key>`` on every ``/v1/`` route, the WebSocket handshake included.

Browsers cannot set headers on a WebSocket, so the handshake may carry the key as a subprotocol
instead, as OpenAI's browser clients send it: ``Sec-WebSocket-Protocol: realtime,
openai-insecure-api-key.<KEY>`` (JavaScript: ``new WebSocket(url, ["realtime",
"openai-insecure-api-key." + key])``).  Either way is accepted.  A browser fails a connection whose
accepted handshake does not name one of the subprotocols it offered, so the route accepts with
:func:`choose_subprotocol` (``realtime``; never the key).  A key sent this way must be a valid
subprotocol token (letters, digits and ``!#$%&'*+-.^_`|~``; no ``/``, ``=`` or ``:``).

The keys come from ``ServerConfig.effective_api_keys()`` (``[server] api_keys``, ``api_key_file``,
``--api-key``/``--api-key-file`` and ``$JAX_REALTIME_API_KEY``).  None configured: no check.
``/health`` and ``/metrics`` stay open, as vLLM leaves them, for load balancers and Prometheus.

The comparison is constant-time: the presented token and every key are hashed to the same length
(SHA-256) and compared with :func:`hmac.compare_digest`, against every key without stopping at a
match, so neither the keys' values nor which one matched shows in the timing.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from quart import Quart, request, websocket

from .errors import APIError

PROTECTED_PREFIX = "/v1/"
SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class KeyChecker:
    def __init__(self, keys: Iterable[str]):
        self._digests = tuple(_digest(k.encode("utf-8")) for k in keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def allows(self, authorization: str | None) -> bool:
        """Whether an ``Authorization`` header value carries one of the keys (always, with none set)."""
        if not self._digests:
            return True
        scheme, _, token = (authorization or "").strip().partition(" ")
        return self._matches(token.strip()) and scheme.lower() == "bearer"

    def allows_subprotocols(self, protocols: Iterable[str]) -> bool:
        """Whether a WebSocket's requested subprotocols carry one of the keys as
        ``openai-insecure-api-key.<key>`` (always, with none set)."""
        if not self._digests:
            return True
        keys = [p[len(KEY_SUBPROTOCOL_PREFIX):] for p in protocols if p.startswith(KEY_SUBPROTOCOL_PREFIX)]
        return any([self._matches(key) for key in keys])  # a list: every one compared

    def _matches(self, token: str) -> bool:
        # header values reach us decoded as latin-1: encode back to the bytes that were sent
        presented = _digest(token.encode("latin-1", "replace"))
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(presented, digest)
        return matched


def choose_subprotocol(requested: Iterable[str]) -> str | None:
    """The subprotocol to accept a WebSocket with: ``realtime`` if offered, else the first offered
    one that is not a key, else none (a client that offered nothing else gets no subprotocol)."""
    requested = list(requested)
    if SUBPROTOCOL in requested:
        return SUBPROTOCOL
    return next((p for p in requested if not p.startswith(KEY_SUBPROTOCOL_PREFIX)), None)


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key: send it as 'Authorization: Bearer <key>' (a WebSocket may "
                         "offer the subprotocol 'openai-insecure-api-key.<key>' instead).",
                    headers={"WWW-Authenticate": 'Bearer realm="jax-realtime"'})


def install_auth(app: Quart, checker: KeyChecker) -> None:
    """Refuse ``/v1/`` requests and WebSocket handshakes without a valid key (a handshake: in the
    ``Authorization`` header or a subprotocol) with HTTP 401 (a handshake is refused before it is
    accepted, so no event is ever sent)."""
    if not checker.enabled:
        return

    @app.before_request
    async def require_key_http():
        if request.path.startswith(PROTECTED_PREFIX) and not checker.allows(request.headers.get("Authorization")):
            return unauthorized().response()
        return None

    @app.before_websocket
    async def require_key_websocket():
        if websocket.path.startswith(PROTECTED_PREFIX) and not (
            checker.allows(websocket.headers.get("Authorization"))
            or checker.allows_subprotocols(websocket.requested_subprotocols)
        ):
            return unauthorized().response()
        return None
