"""The Quart application: ``create_app()`` builds it; Hypercorn serves it.

Start-up (``before_serving``) starts loading the model and compiling every shape bucket on a
background thread and returns at once, so Hypercorn listens while the engine warms: ``/health``
answers 503 ``{"status": "starting"}`` (load balancers keep traffic away), every ``/v1/`` route and
the WebSocket handshake 503 with ``Retry-After``, ``/metrics`` works.  Once warm, the batcher starts
as a background task and ``/health`` answers 200.  A start that fails (a model that cannot be
loaded) stops the server with the error (``jax-realtime serve`` exits 2 with it).
``create_app`` also installs the API-key check (``auth.py``), OpenAI-style error bodies
(``errors.py``), the REST limits (``[server]`` max_upload_mb, request_timeout_s, max_audio_s,
max_concurrent_requests) and the metrics registry (``metrics.py``).  Two ways to run it:

    jax-realtime serve --config configs/cpu-tiny.toml
    JAX_REALTIME_CONFIG=configs/cpu-tiny.toml hypercorn -c configs/hypercorn.toml 'server.app:create_app()'
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time

import numpy as np
from quart import Quart, request, websocket
from quart.asgi import ASGIWebsocketConnection
from quart.wrappers.request import Body, Request
from werkzeug.exceptions import RequestEntityTooLarge

from jax_realtime.audio import SAMPLE_RATE, decode_audio
from jax_realtime.batcher import Batcher
from jax_realtime.capacity import LoadMeter, calibrate
from jax_realtime.config import ConfigError, ServiceConfig, load_config
from jax_realtime.engine import DecodeRequest, Engine, compile_stats
from jax_realtime.vad import VADBatcher, shared as shared_vad

from .auth import KeyChecker, install_auth
from .demo import demo
from .errors import APIError, install_error_handlers
from .metrics import Metrics
from .realtime import realtime
from .rest import rest
from .service import LIFECYCLE, Lifecycle, Service, model_names

log = logging.getLogger("jax_realtime.server")

CONFIG_ENV = "JAX_REALTIME_CONFIG"


class _CappedBody(Body):
    """Quart's request body, with ``MAX_CONTENT_LENGTH`` enforced on the total received.

    Quart checks a declared Content-Length against the cap, but for a chunked upload it only
    checks what is buffered and not yet consumed, which the multipart parser keeps draining: a
    chunked upload of any size got through.  Here every byte received counts (a test sends one)."""

    def __init__(self, expected_content_length: int | None, max_content_length: int | None) -> None:
        super().__init__(expected_content_length, max_content_length)
        self._received = 0

    def append(self, data: bytes) -> None:
        if data and self._must_raise is None and self._max_content_length is not None:
            self._received += len(data)
            if self._received > self._max_content_length:
                self._must_raise = RequestEntityTooLarge()
                self.set_complete()
                return
        super().append(data)


class _Request(Request):
    body_class = _CappedBody


STARTING_RETRY_AFTER_S = 5


def starting_error():
    """The 503 of ``/v1/`` while the engine warms."""
    return APIError(503, "The server is starting: the model is loading and compiling. Retry later.",
                    headers={"Retry-After": str(STARTING_RETRY_AFTER_S)})


def create_app(config: ServiceConfig | str | os.PathLike | None = None) -> Quart:
    """The app; ``config`` is a ServiceConfig, a TOML path, or None (``$JAX_REALTIME_CONFIG`` or defaults)."""
    if not isinstance(config, ServiceConfig):
        config = load_config(config if config is not None else os.environ.get(CONFIG_ENV) or None)
    if not logging.getLogger().handlers:  # under the hypercorn command nobody else sets logging up
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


    try:
        keys = config.server.effective_api_keys()
    except ValueError as exc:  # a bad $JAX_REALTIME_API_KEY, or a key file gone since the config was read
        raise ConfigError(str(exc)) from None
    limits = config.server
    metrics = Metrics()

    app = Quart(__name__)
    app.request_class = _Request
    app.asgi_websocket_class = _PacedWebsocketConnection
    app.config["SERVICE_CONFIG"] = config
    app.config["MAX_CONTENT_LENGTH"] = limits.max_upload_bytes  # REST bodies; over it: 400 (errors.py)
    app.config["MAX_FORM_MEMORY_SIZE"] = 64 * 1024  # one form field (not the file): a prompt is 4096 chars at most
    app.config["BODY_TIMEOUT"] = limits.request_timeout_s  # an upload slower than this: 408
    app.config["RESPONSE_TIMEOUT"] = limits.request_timeout_s + 30  # a backstop: routes keep their own deadline
    app.extensions["jax_realtime_metrics"] = metrics
    lifecycle = app.extensions[LIFECYCLE] = Lifecycle()
    install_error_handlers(app)
    install_auth(app, KeyChecker(keys))
    app.register_blueprint(realtime)
    app.register_blueprint(rest)
    app.register_blueprint(demo)  # GET / : the live transcription page

    # while the engine warms, /v1/ answers 503 (after the key check: a bad key is still a 401)
    @app.before_request
    async def not_before_warm():
        if request.path.startswith("/v1/") and lifecycle.service is None:
            return starting_error().response()
        return None

    @app.before_websocket
    async def no_session_before_warm():
        if websocket.path.startswith("/v1/") and lifecycle.service is None:
            return starting_error().response()
        return None

    @app.before_serving
    async def start_warming() -> None:
        lifecycle.stopped = asyncio.Event()
        _stop_on_signals(lifecycle)  # a SIGTERM while warming stops the server too
        lifecycle.task = asyncio.get_running_loop().create_task(_load_and_warm(app, config, metrics, keys))

    @app.after_serving
    async def stop_warming() -> None:
        if lifecycle.task is not None and not lifecycle.task.done():
            lifecycle.task.cancel()  # the loading thread is a daemon: it ends with the process
        if lifecycle.error is not None:
            raise lifecycle.error  # the server exits with it (Hypercorn: a failed lifespan shutdown)

    return app


CALIBRATION_AUDIO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jax_realtime",
                                 "examples", "ljspeech-LJ001-0006.wav")


def calibrate_streaming(engine: Engine, config: ServiceConfig) -> float:
    """Engine seconds per second of one streaming session, timed on a typical step: a window of
    ``trim_after_s`` of the bundled example speech decoded in timestamp mode, ``max_step_tokens`` new
    tokens, at the smallest and the largest batch (see capacity.calibrate)."""
    stream = config.stream
    speech = decode_audio(CALIBRATION_AUDIO)
    seconds = min(stream.trim_after_s, stream.max_window_s)
    audio = np.resize(speech, round(seconds * SAMPLE_RATE))  # repeated when the example is shorter

    def run_step(batch: int) -> float:
        requests = [DecodeRequest(audio, timestamps=True, max_new_tokens=stream.max_step_tokens)] * batch
        started = time.perf_counter()
        engine.decode(requests)
        return time.perf_counter() - started

    return calibrate(run_step, engine.batch_buckets, stream.step_s)


class _PacedWebsocketConnection(ASGIWebsocketConnection):
    """Quart's WebSocket connection with a bounded queue of received messages.

    Quart reads every message the server gets into an unbounded queue, whether the handler reads
    it or not.  Bounded, a handler that stops reading (a session whose audio is not decoded yet,
    see connection._wait_for_room) stops Quart reading, then Hypercorn (its own queue is bounded by
    ``max_app_queue_size``), then the socket: TCP flow control slows the client down."""

    QUEUE = 16

    def __init__(self, app, scope) -> None:
        super().__init__(app, scope)
        self.queue = asyncio.Queue(self.QUEUE)


async def _load_and_warm(app: Quart, config: ServiceConfig, metrics: Metrics, keys: tuple[str, ...]) -> None:
    """Load the model and compile every bucket off the event loop, then start serving."""
    lifecycle: Lifecycle = app.extensions[LIFECYCLE]
    started = time.perf_counter()

    def load():
        engine = Engine(config.engine)
        warmup = engine.warmup()
        vad = shared_vad() if config.stream.vad else None  # loaded now, not in a session's first step
        return engine, warmup, calibrate_streaming(engine, config), vad

    try:
        engine, warmup, per_session, vad = await _in_daemon_thread(load)
    except Exception as exc:  # a model that cannot be loaded, a device that fails: stop the server
        log.error("the service cannot start: %s", exc, exc_info=not isinstance(exc, ValueError))
        lifecycle.error = exc
        await lifecycle.stop(lifecycle.then)
        return
    if lifecycle.stopped.is_set():  # stopped by a signal while warming
        return
    limits = config.server
    batcher = Batcher(engine, max_pending=limits.effective_max_pending, gather_s=limits.batch_gather_s)
    service = Service(config, engine, batcher, model_names(config, engine), time.time(), warmup, metrics,
                      LoadMeter(per_session, target=limits.target_load),
                      VADBatcher(vad) if vad is not None else None, stopped=lifecycle.stopped)
    batcher.on_batch = service.observe_batch
    metrics.attach(service)
    app.extensions["jax_realtime"] = service
    lifecycle.service = service
    app.add_background_task(_run_batcher, app, batcher)
    log.info(
        "serving %s as %s: %d buckets compiled in %.1f s (%.1f s with loading), %s; API keys: %s; "
        "at most %d REST requests at once, %d windows queued; capacity %s",
        engine.name, ", ".join(service.model_names), len(engine.buckets), warmup, time.perf_counter() - started,
        compile_stats(), f"{len(keys)} configured" if keys else "none (open)", limits.max_concurrent_requests,
        batcher.max_pending, service.capacity().as_dict(),
    )


async def _in_daemon_thread(fn):
    """``fn()`` on a daemon thread: unlike ``asyncio.to_thread``, a process stopped while it runs
    (SIGTERM during a long compilation) does not wait for it to finish."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(setter, value) -> None:
        def settle():
            if not future.done():
                setter(value)
        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # the loop has closed: nobody is waiting
            pass

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting coroutine
            deliver(future.set_exception, exc)
        else:
            deliver(future.set_result, result)

    threading.Thread(target=run, name="jax-realtime-warmup", daemon=True).start()
    return await future


async def wait_stopped(app: Quart) -> None:
    """Until the service may shut down: drained after SIGTERM/SIGINT, or its start failed
    (``jax-realtime serve``'s shutdown trigger)."""
    lifecycle: Lifecycle = app.extensions[LIFECYCLE]
    while lifecycle.stopped is None:  # before_serving has not run yet
        await asyncio.sleep(0.05)
    await lifecycle.stopped.wait()


def startup_error(app: Quart) -> BaseException | None:
    """What made the start fail, if it did."""
    return app.extensions[LIFECYCLE].error


async def _run_batcher(app: Quart, batcher: Batcher) -> None:
    """The batcher loop until the app shuts down."""
    loop_task = asyncio.ensure_future(batcher.run())
    stop = asyncio.ensure_future(app.shutdown_event.wait())
    await asyncio.wait({loop_task, stop}, return_when=asyncio.FIRST_COMPLETED)
    await batcher.close()
    stop.cancel()
    await asyncio.gather(loop_task, return_exceptions=True)


def _stop_on_signals(lifecycle: Lifecycle) -> None:
    """SIGTERM/SIGINT drain the service first (or, while it warms, just stop), then do what they
    did before.

    Under the ``hypercorn`` command that is Hypercorn's own handler (stop accepting, wait for the
    graceful timeout, shut down), which is chained after the drain; under ``jax-realtime serve``
    there is none, and its shutdown trigger waits for ``lifecycle.stopped`` instead.  asyncio keeps
    a loop's signal handlers in ``_signal_handlers``: reading it is the only way to chain them.
    A start that fails runs the SIGTERM chain the same way (``lifecycle.then``).
    """
    loop = asyncio.get_running_loop()
    registered = getattr(loop, "_signal_handlers", None)
    if registered is None or threading.current_thread() is not threading.main_thread():
        return  # not a Unix selector loop, or not the main thread (an app in a test): leave signals alone
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = registered.get(sig)

        def then(previous=previous) -> None:
            if previous is not None and not previous.cancelled():
                previous._run()  # noqa: SLF001 - the handler the server installed

        if sig == signal.SIGTERM:
            lifecycle.then = then

        def on_signal(then=then) -> None:
            asyncio.ensure_future(lifecycle.stop(then))

        loop.add_signal_handler(sig, on_signal)
