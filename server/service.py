"""The service object the routes share (no Quart in it): the warm engine, the one batcher, the
config, the metrics, the live sessions, and the start/stop life cycle.

Imports run one way: ``app`` (the Quart application) and the routes (``realtime``, ``rest``,
``connection``) import this module; it imports only the library and ``metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Callable

from jax_realtime.batcher import Batcher
from jax_realtime.capacity import Capacity, LoadMeter
from jax_realtime.config import ServiceConfig
from jax_realtime.engine import Engine
from jax_realtime.vad import VADBatcher

from .metrics import Metrics

log = logging.getLogger("jax_realtime.server")


@dataclasses.dataclass
class Service:
    """What the routes share: the warm engine, the one batcher, the config and live sessions."""

    config: ServiceConfig
    engine: Engine
    batcher: Batcher
    model_names: tuple[str, ...]
    started: float
    warmup_seconds: float
    metrics: Metrics
    load: LoadMeter
    vad: VADBatcher | None = None  # voice activity for the realtime sessions ([stream] vad)
    sessions: set = dataclasses.field(default_factory=set)
    requests_in_flight: int = 0  # REST transcriptions being decoded
    rest_active: int = 0  # REST audio requests holding one of max_concurrent_requests (rest.py)
    draining: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # set on SIGTERM/SIGINT
    stopped: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)  # set once drained

    def serves(self, model: str) -> bool:
        return model in self.model_names

    def streaming_sessions(self) -> int:
        return sum(1 for session in self.sessions if session.streaming)

    def capacity(self) -> Capacity:
        return self.load.capacity(len(self.sessions))

    def admits_session(self) -> bool:
        """Whether one more realtime session fits: under ``max_sessions``, and the engine's measured
        load leaves room for every session connected now plus this one to stream at once."""
        connected, limits = len(self.sessions), self.config.server
        return connected < limits.max_sessions and (not limits.admission_control or self.load.admits(connected))

    def note_streaming(self) -> None:
        """A session started or ended an utterance (the load meter weighs its busy time by this)."""
        self.load.note_streaming(self.streaming_sessions())

    def observe_batch(self, requests: int, rows: int, seconds: float) -> None:
        """The batcher's hook after every engine step."""
        self.metrics.observe_batch(requests, rows, seconds)
        self.load.record_batch(seconds)

    async def drain(self) -> None:
        """Stop taking new work, let running utterances and REST requests finish (each utterance
        sends its ``transcription.done``; sessions then close with 1001), for at most
        ``[server] drain_timeout_s``."""
        if self.draining.is_set():
            return
        self.draining.set()
        log.info("draining: %d sessions, %d requests in flight", len(self.sessions), self.requests_in_flight)
        for session in list(self.sessions):
            session.drain()
        deadline = time.monotonic() + self.config.server.drain_timeout_s
        while (self.sessions or self.requests_in_flight) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        log.info("drained: %d sessions and %d requests left", len(self.sessions), self.requests_in_flight)
        self.stopped.set()


def model_names(config: ServiceConfig, engine: Engine) -> tuple[str, ...]:
    """Names a client may ask for: the configured ones, else the checkpoint's name and its
    usual aliases (``tiny.en``, ``whisper-tiny.en``, ``openai/whisper-tiny.en``)."""
    if config.server.model_names:
        return tuple(config.server.model_names)
    base = engine.name.rsplit("/", 1)[-1].removeprefix("whisper-")
    return tuple(dict.fromkeys([engine.name, base, f"whisper-{base}", f"openai/whisper-{base}"]))


class Lifecycle:
    """The service's start and stop, from ``before_serving`` on (``app.extensions[LIFECYCLE]``).

    ``service`` is None until the engine is warm; ``error`` is what made the start fail; ``stopped``
    is set once the server may shut down (drained, stopped while warming, or failed to start)."""

    def __init__(self) -> None:
        self.service: Service | None = None
        self.error: BaseException | None = None
        self.stopped: asyncio.Event | None = None  # created on the serving loop
        self.task: asyncio.Task | None = None
        self.then: Callable[[], None] | None = None  # the server's own SIGTERM handler, if any

    @property
    def state(self) -> str:
        return "failed" if self.error is not None else "starting" if self.service is None else "serving"

    async def stop(self, then: Callable[[], None] | None = None) -> None:
        """Drain the service if it is up (else nothing runs yet), set ``stopped``, then ``then()``."""
        if self.service is not None:
            await self.service.drain()
        self.stopped.set()
        if then is not None:
            then()


LIFECYCLE = "jax_realtime_lifecycle"


def service_of(app: Any) -> Service:
    """The Quart application's service (set once the engine is warm)."""
    return app.extensions["jax_realtime"]
