"""HTTP routes besides the WebSocket: health (with the engine's compilation count)."""

from __future__ import annotations

import time

from quart import Blueprint, current_app

from jax_realtime.engine import compile_stats

from .app import service_of

rest = Blueprint("rest", __name__)


@rest.get("/health")
async def health():
    service = service_of(current_app)
    return {
        "status": "ok",
        "model": service.engine.name,
        "models": list(service.model_names),
        "uptime_s": round(time.time() - service.started, 1),
        "warmup_s": round(service.warmup_seconds, 2),
        "sessions": len(service.sessions),
        "queue_depth": service.batcher.queue_depth,
        "compile": compile_stats(),
        "buckets": len(service.engine.buckets),
    }
