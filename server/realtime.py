"""The ``/v1/realtime`` WebSocket route (thin: the work is in ``connection.py``).

With API keys configured, a handshake without ``Authorization: Bearer <key>`` (or the key as the
subprotocol ``openai-insecure-api-key.<key>``) never reaches this route: ``auth.py``'s
``before_websocket`` hook answers the upgrade with HTTP 401.  The route accepts with a subprotocol
the client offered (``realtime``), without which browsers fail the connection.
"""

from __future__ import annotations

from quart import Blueprint, current_app, websocket

from .auth import choose_subprotocol
from .connection import RealtimeConnection
from .openai_realtime import OpenAIConnection, choose, upgrade
from .service import service_of

realtime = Blueprint("realtime", __name__)


@realtime.websocket("/v1/realtime")
async def realtime_socket():
    await websocket.accept(subprotocol=choose_subprotocol(websocket.requested_subprotocols))
    ws, service = websocket._get_current_object(), service_of(current_app)
    dialect = choose(websocket)
    if dialect is None:
        await RealtimeConnection(ws, service, upgrade=upgrade).serve()
    else:
        await OpenAIConnection(ws, service, **dialect).serve()
