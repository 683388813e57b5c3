"""The Quart application: ``create_app()`` builds it; Hypercorn serves it.

Start-up (``before_serving``) loads the model and compiles every shape bucket before Hypercorn
accepts the first connection, then starts the batcher as a background task.  Two ways to run it:

    jax-realtime serve --config configs/cpu-tiny.toml
    JAX_REALTIME_CONFIG=configs/cpu-tiny.toml hypercorn -c configs/hypercorn.toml 'server.app:create_app()'
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time

from quart import Quart

from jax_realtime.batcher import Batcher
from jax_realtime.config import ServiceConfig, load_config
from jax_realtime.engine import Engine, compile_stats

log = logging.getLogger("jax_realtime.server")

CONFIG_ENV = "JAX_REALTIME_CONFIG"


@dataclasses.dataclass
class Service:
    """What the routes share: the warm engine, the one batcher, the config and live sessions."""

    config: ServiceConfig
    engine: Engine
    batcher: Batcher
    model_names: tuple[str, ...]
    started: float
    warmup_seconds: float
    sessions: set = dataclasses.field(default_factory=set)

    def serves(self, model: str) -> bool:
        return model in self.model_names


def model_names(config: ServiceConfig, engine: Engine) -> tuple[str, ...]:
    """Names a client may ask for: the configured ones, else the checkpoint's name and its
    usual aliases (``tiny.en``, ``whisper-tiny.en``, ``openai/whisper-tiny.en``)."""
    if config.server.model_names:
        return tuple(config.server.model_names)
    base = engine.name.rsplit("/", 1)[-1].removeprefix("whisper-")
    return tuple(dict.fromkeys([engine.name, base, f"whisper-{base}", f"openai/whisper-{base}"]))


def create_app(config: ServiceConfig | str | os.PathLike | None = None) -> Quart:
    """The app; ``config`` is a ServiceConfig, a TOML path, or None (``$JAX_REALTIME_CONFIG`` or defaults)."""
    if not isinstance(config, ServiceConfig):
        config = load_config(config if config is not None else os.environ.get(CONFIG_ENV) or None)

    from .realtime import realtime
    from .rest import rest

    app = Quart(__name__)
    app.config["SERVICE_CONFIG"] = config
    app.config["MAX_CONTENT_LENGTH"] = None
    app.register_blueprint(realtime)
    app.register_blueprint(rest)

    @app.before_serving
    async def load_and_warm() -> None:
        started = time.perf_counter()
        engine = await asyncio.to_thread(Engine, config.engine)
        warmup = await asyncio.to_thread(engine.warmup)
        batcher = Batcher(engine)
        service = Service(config, engine, batcher, model_names(config, engine), time.time(), warmup)
        app.extensions["jax_realtime"] = service
        app.add_background_task(_run_batcher, app, batcher)
        log.info(
            "serving %s as %s: %d buckets compiled in %.1f s (%.1f s with loading), %s",
            engine.name, ", ".join(service.model_names), len(engine.buckets), warmup,
            time.perf_counter() - started, compile_stats(),
        )

    return app


async def _run_batcher(app: Quart, batcher: Batcher) -> None:
    """The batcher loop until the app shuts down."""
    loop_task = asyncio.ensure_future(batcher.run())
    stop = asyncio.ensure_future(app.shutdown_event.wait())
    await asyncio.wait({loop_task, stop}, return_when=asyncio.FIRST_COMPLETED)
    await batcher.close()
    stop.cancel()
    await asyncio.gather(loop_task, return_exceptions=True)


def service_of(app: Quart) -> Service:
    return app.extensions["jax_realtime"]
