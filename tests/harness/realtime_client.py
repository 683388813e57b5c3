"""Client helpers for ``/v1/realtime``, shared by the benchmark, the streaming evaluation and the tests.

* Audio: :func:`to_pcm16` (float32 in [-1, 1] -> PCM16 LE bytes, the inverse of the server's
  decoding), :func:`chunk_pcm` (100 ms appends by default), :func:`b64`, :func:`join_clips`.
* :class:`ServerProcess`: a server child process on a local port, ready once ``GET /health``
  answers 200 (it answers 503 ``starting`` while the engine warms); :meth:`ServerProcess.serve`
  builds ``jax-realtime serve --config FILE --port <free>``, the constructor takes any command
  (Hypercorn on ``create_app()``, say).  Output goes to a log
  file (:meth:`~ServerProcess.log_tail`); :meth:`~ServerProcess.stop` sends SIGINT (graceful
  shutdown), then kills.  A context manager, and stopped at interpreter exit.
* :class:`RealtimeClient`: one connection, one event at a time (``update``, ``append``,
  ``commit``, ``stream``, ``recv``, ``expect``, ``until_done``...), what the end-to-end tests use.
* :func:`stream_audio`: one array of audio streamed as one utterance on a :class:`RealtimeClient`
  (``session.update``, ``commit``, paced appends, ``commit`` with ``final: true``, read until
  ``transcription.done``), with every send and receive time in a :class:`StreamRecord`.
* :func:`read_health` / :func:`compilations` / :func:`default_model`: ``GET /health`` and what is
  read from it; :func:`machine`: the CPU this runs on.

Every time is ``time.perf_counter()`` of this process, in seconds; a record's fields are relative
to nothing (subtract ``first_send``).  A receive time is taken when the client's event loop reads
the frame, so a busy client process adds to every latency it measures: keep the client light (one
process, no decoding) and look at ``send_slip`` (how late chunks went out compared with their
schedule).

Part of the test harness (``tests/harness``): tests import it as ``harness.realtime_client``
(pytest puts ``tests/`` on ``sys.path``), scripts too, after putting ``tests/`` there::

    from harness.realtime_client import RealtimeClient, ServerProcess, stream_audio
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Callable, Iterable

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SAMPLE_RATE = 16000
BYTES_PER_SECOND = 2 * SAMPLE_RATE  # PCM16 mono
CHUNK_S = 0.1  # 100 ms appends: 1600 samples, 3200 bytes of PCM16
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository


# -- audio -------------------------------------------------------------------------------------------

def to_pcm16(audio: np.ndarray | bytes) -> bytes:
    """PCM16 little-endian bytes of float32 audio in [-1, 1] (int16 arrays and bytes pass through)."""
    if isinstance(audio, (bytes, bytearray)):
        return bytes(audio)
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype("<i2").tobytes()
    # the inverse of the server's pcm16_to_float32 (x / 32768): audio read from PCM16 wavs round-trips exactly
    scaled = np.round(np.asarray(audio, np.float32) * 32768.0)
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def chunk_pcm(pcm: bytes, chunk_s: float = CHUNK_S) -> list[bytes]:
    """Split PCM16 bytes into appends of ``chunk_s`` seconds (even byte counts)."""
    size = max(2, 2 * round(chunk_s * SAMPLE_RATE))
    return [pcm[i:i + size] for i in range(0, len(pcm), size)]


@dataclasses.dataclass(frozen=True)
class ClipSpan:
    """Where one clip lies in a stream of clips joined back to back."""

    ref: dict  # the refs.jsonl row (``id``, ``text``, ...)
    start_s: float
    duration_s: float


def join_clips(refs: list[dict], clips: list[np.ndarray]) -> tuple[np.ndarray, list[ClipSpan]]:
    """The clips back to back (no gap) as one array, and where each one lies in it."""
    spans, offset = [], 0
    for ref, clip in zip(refs, clips):
        spans.append(ClipSpan(ref, offset / SAMPLE_RATE, len(clip) / SAMPLE_RATE))
        offset += len(clip)
    audio = np.concatenate(clips).astype(np.float32) if clips else np.zeros(0, np.float32)
    return audio, spans


# -- addresses and /health ---------------------------------------------------------------------------

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def http_url_of(url: str) -> str:
    """``ws://host:port/v1/realtime`` or ``http://host:port`` -> ``http://host:port``."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    return ("https" if scheme in ("wss", "https") else "http") + "://" + host


def ws_url_of(url: str) -> str:
    """``http://host:port`` or ``ws://host:port[/v1/realtime]`` -> ``ws://host:port/v1/realtime``."""
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    return ("wss" if scheme in ("wss", "https") else "ws") + "://" + host + "/v1/realtime"


def read_health(url: str, timeout: float = 10.0) -> dict:
    """``GET /health`` of the server at ``url`` (http or ws form)."""
    with urllib.request.urlopen(http_url_of(url) + "/health", timeout=timeout) as response:
        return json.loads(response.read())


def compilations(health: dict) -> int:
    """The server's XLA compilations so far (``compile.compilations`` of /health)."""
    return int(health.get("compile", {}).get("compilations", 0))


def default_model(health: dict) -> str:
    """A model name the server accepts: the first of /health's ``models``."""
    return (health.get("models") or [health.get("model")])[0]


# -- the server --------------------------------------------------------------------------------------

def _server_environ() -> dict:
    """This process's environment minus settings that would change the server under test (an API key
    the developer happens to have set would turn every request into a 401)."""
    return {k: v for k, v in os.environ.items() if k not in ("JAX_REALTIME_API_KEY", "JAX_REALTIME_CONFIG")}


def venv_script(name: str) -> str:
    """A console script installed next to the running interpreter (the project's virtualenv), else on PATH."""
    found = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if not found:
        raise FileNotFoundError(f"console script {name!r} not found next to {sys.executable} nor on PATH")
    return found


class ServerError(RuntimeError):
    """The server exited, or did not answer /health, while starting."""


class ServerProcess:
    """A server child process serving on ``host:port``, ready once ``GET /health`` answers 200.

    ``argv`` is the whole command (it must bind ``port``); :meth:`serve` builds the usual one.
    Use as a context manager (sync)::

        with ServerProcess.serve("configs/cpu-tiny.toml") as server:
            record = asyncio.run(stream_audio(server.ws_url, audio, server.model))

    The command runs in the repository root (``cwd``) with ``env`` added to this process's
    environment, in a session of its own; its output goes to ``log_path`` (a temporary file by
    default).  It is stopped on :meth:`stop`, on exit of the ``with`` block and at interpreter exit.
    """

    def __init__(self, argv: list[str], port: int, *, name: str = "server", host: str = "127.0.0.1",
                 env: dict | None = None, cwd: str | os.PathLike = ROOT, log_path: str | os.PathLike | None = None,
                 startup_timeout: float = 900.0):
        self.argv = [os.fspath(a) for a in argv]
        self.port = port
        self.name = name
        self.host = host
        self.env = env
        self.cwd = cwd
        self.log_path = None if log_path is None else os.fspath(log_path)
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.startup_health: dict = {}  # /health as first answered with 200
        self.startup_statuses: list[tuple[int, str]] = []  # every answer of /health while starting
        self.startup_s: float | None = None
        self._launched: float | None = None
        self._log = None

    @classmethod
    def serve(cls, config: str | os.PathLike, *, port: int | None = None, host: str = "127.0.0.1",
              extra_args: list[str] | None = None, **kwargs: Any) -> ServerProcess:
        """``jax-realtime serve --config CONFIG --host HOST --port PORT`` (a free port by default);
        not started yet.  ``kwargs`` go to the constructor."""
        port = port or free_port(host)
        argv = [venv_script("jax-realtime"), "serve", "--config", os.path.abspath(os.fspath(config)),
                "--host", host, "--port", str(port), *(extra_args or [])]
        return cls(argv, port, host=host, **kwargs)

    # -- addresses
    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    @property
    def model(self) -> str:
        """A model name the server accepts (the first of /health's ``models``)."""
        return default_model(self.startup_health)

    @property
    def baseline_compilations(self) -> int | None:
        """Compilations when /health first answered (after warm-up)."""
        return compilations(self.startup_health) if self.startup_health else None

    # -- life cycle
    def start(self) -> ServerProcess:
        """Start the command and wait until /health answers 200 (raises :class:`ServerError`)."""
        self.launch()
        return self.wait_ready()

    def launch(self) -> ServerProcess:
        """Start the command; do not wait (see :meth:`wait_ready`)."""
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix=f"jax-realtime-{self.name}-", suffix=".log")
            os.close(fd)
        self._log = open(self.log_path, "ab")
        self._launched = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**_server_environ(), **(self.env or {})},
                                     start_new_session=True)
        atexit.register(self.stop)
        return self

    def wait_ready(self, poll_s: float = 0.1) -> ServerProcess:
        """Poll /health until it answers 200 (the engine is warm); every answer before that (503
        ``starting``) is kept in ``startup_statuses``.  Raises :class:`ServerError` if the process
        exits or ``startup_timeout`` passes."""
        deadline = self._launched + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode} while starting\n{self.log_tail()}")
            try:
                self.startup_health = self.health(timeout=5.0)
                self.startup_statuses.append((200, self.startup_health.get("status", "")))
                break
            except urllib.error.HTTPError as exc:  # listening, not ready: 503 {"status": "starting"}
                try:
                    status = json.loads(exc.read()).get("status", "")
                except ValueError:
                    status = ""
                self.startup_statuses.append((exc.code, status))
            except (OSError, ValueError):  # not listening yet
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise ServerError(f"{self.name} did not answer /health with 200 within {self.startup_timeout:.0f} s"
                                  f"\n{self.log_tail()}")
            time.sleep(poll_s)
        self.startup_s = time.perf_counter() - self._launched
        return self

    def stop(self, timeout: float = 40.0, sig: int = signal.SIGINT) -> int | None:
        """``sig`` (SIGINT: graceful shutdown; SIGTERM works too), then SIGKILL if the process has not
        exited within ``timeout`` seconds; returns its exit status (None if never started).  Idempotent."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                text = f.read().splitlines()
        except (OSError, TypeError):
            return f"(no log at {self.log_path})"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- /health now
    def health(self, timeout: float = 10.0) -> dict:
        return read_health(self.http_url, timeout)

    async def ahealth(self) -> dict:
        return await asyncio.to_thread(self.health)

    async def wait_sessions(self, expected: int, timeout: float = 10.0) -> dict:
        """Poll /health until ``sessions == expected``; returns the last health (asserts on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            health = await self.ahealth()
            if health["sessions"] == expected or time.monotonic() > deadline:
                assert health["sessions"] == expected, (health, self.log_tail(20))
                return health
            await asyncio.sleep(0.1)


# -- one connection ----------------------------------------------------------------------------------

class RealtimeClient:
    """One ``/v1/realtime`` connection; events are dicts, read in order with :meth:`recv`."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.created: dict | None = None

    @classmethod
    async def connect(cls, url: str, *, expect_created: bool = True, open_timeout: float = 30.0,
                      **kwargs: Any) -> RealtimeClient:
        """Open the socket (``kwargs`` go to ``websockets``' ``connect``) and, unless told not to,
        read ``session.created`` (kept in :attr:`created`)."""
        options = {"close_timeout": 5, "max_size": None, **kwargs}
        client = cls(await connect(url, open_timeout=open_timeout, **options))
        if expect_created:
            client.created = await client.expect("session.created")
        return client

    async def __aenter__(self) -> RealtimeClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()

    def abort(self) -> None:
        """Drop the TCP connection without a closing handshake (a client that vanishes)."""
        self.ws.transport.abort()

    # -- sending
    async def send(self, type_: str | None = None, /, **fields: Any) -> None:
        event = dict(fields) if type_ is None else {"type": type_, **fields}
        await self.ws.send(json.dumps(event))

    async def send_raw(self, message: str | bytes) -> None:
        await self.ws.send(message)

    async def update(self, model: str = "tiny.en", *, wait: bool = True, **fields: Any) -> dict | None:
        """``session.update``; with ``wait``, read and return ``session.updated``."""
        await self.send("session.update", model=model, **fields)
        return await self.expect("session.updated") if wait else None

    async def append(self, pcm: bytes) -> None:
        await self.send("input_audio_buffer.append", audio=b64(pcm))

    async def commit(self, final: bool = False) -> None:
        await self.send("input_audio_buffer.commit", final=final)

    async def stream(self, pcm: bytes, chunk_s: float = CHUNK_S, interval: float = 0.0, *, wait_out: bool = True,
                     stop: Callable[[], bool] | None = None,
                     on_send: Callable[[float, float], None] | None = None) -> None:
        """Append ``pcm`` in ``chunk_s`` pieces, piece ``k`` at ``t0 + k * interval`` (``chunk_s``:
        real-time pace; sleeping to an absolute schedule, so late pieces are followed by catch-up
        ones and the pace never drifts; 0: no pause, but still yields to the loop).

        ``wait_out``: return at ``t0 + n * interval``, once the last piece's interval is over too
        (a live source: all its audio has been spoken); false: right after the last append.
        ``stop()`` is asked before each piece (true: send no more); ``on_send(due, sent)`` is called
        after each (``perf_counter`` times; ``due`` is ``sent`` when unpaced)."""
        t0 = time.perf_counter()
        pieces = chunk_pcm(pcm, chunk_s)
        for k, piece in enumerate(pieces):
            due = t0 + k * interval
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if stop is not None and stop():
                return
            await self.append(piece)
            sent = time.perf_counter()
            if on_send is not None:
                on_send(due if interval else sent, sent)
            if not interval:
                await asyncio.sleep(0)  # let a reader timestamp what arrived
        delay = t0 + len(pieces) * interval - time.perf_counter()
        if wait_out and delay > 0:
            await asyncio.sleep(delay)

    # -- receiving
    async def recv(self, timeout: float | None = 60.0) -> dict:
        message = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(message, str), f"server sent a binary frame: {message[:50]!r}"
        return json.loads(message)

    async def expect(self, type_: str, timeout: float = 60.0) -> dict:
        event = await self.recv(timeout)
        assert event.get("type") == type_, f"expected {type_}, got {event}"
        return event

    async def expect_error(self, code: str, message: str | None = None, timeout: float = 30.0) -> dict:
        event = await self.expect("error", timeout)
        assert set(event) == {"type", "error", "code"}, event
        assert isinstance(event["error"], str), event
        assert event["code"] == code, event
        if message is not None:
            assert event["error"] == message, event
        return event

    async def until_done(self, timeout: float = 120.0) -> tuple[list[str], dict]:
        """Read ``transcription.delta`` events until ``transcription.done``; an ``error`` fails."""
        deltas: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            event = await self.recv(max(0.1, deadline - time.monotonic()))
            kind = event.get("type")
            if kind == "transcription.delta":
                assert isinstance(event["delta"], str), event
                deltas.append(event["delta"])
            elif kind == "transcription.done":
                return deltas, event
            else:
                raise AssertionError(f"unexpected event while waiting for done: {event}")

    async def transcribe(self, pcm: bytes, chunk_s: float = CHUNK_S, interval: float = 0.0,
                         timeout: float = 120.0) -> tuple[list[str], dict]:
        """One utterance (vLLM client order): commit, appends, final, then read to ``done``."""
        await self.commit()
        await self.stream(pcm, chunk_s, interval)
        await self.commit(final=True)
        return await self.until_done(timeout)

    async def closed(self, timeout: float = 10.0) -> ConnectionClosed:
        """Wait for the server to close the socket; returns the ConnectionClosed (its ``rcvd``
        carries the close frame). Events still arriving are an error."""
        try:
            event = await asyncio.wait_for(self.ws.recv(), timeout)
        except ConnectionClosed as exc:
            return exc
        raise AssertionError(f"expected the server to close, got {event!r}")


def check_done(deltas: Iterable[str], done: dict) -> str:
    """The invariants of every ``transcription.done``; returns its text."""
    deltas = list(deltas)
    assert list(done) == ["type", "text", "usage"], done
    usage = done["usage"]
    assert list(usage) == ["prompt_tokens", "total_tokens", "completion_tokens", "prompt_tokens_details"], usage
    assert usage["prompt_tokens_details"] is None
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"], usage
    assert done["text"] == "".join(deltas), (done["text"], deltas)
    return done["text"]


def run(coro, timeout: float = 300.0):
    """Run a coroutine to completion in a fresh event loop, within ``timeout`` seconds."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


# -- one timed stream --------------------------------------------------------------------------------

@dataclasses.dataclass
class StreamRecord:
    """What one streamed utterance produced, with ``time.perf_counter()`` timestamps."""

    session_id: str | None = None
    chunk_s: float = CHUNK_S
    audio_s: float = 0.0
    connected: float | None = None  # socket open
    chunk_sends: list[float] = dataclasses.field(default_factory=list)  # send time of chunk k (after send returned)
    chunk_schedule: list[float] = dataclasses.field(default_factory=list)  # when chunk k was due
    final_sent: float | None = None  # commit(final=true) sent
    deltas: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (arrival, text), empty ones included
    done_text: str | None = None
    done_time: float | None = None
    usage: dict | None = None
    errors: list[dict] = dataclasses.field(default_factory=list)  # {"time", "code", "error"}
    closed: str | None = None  # why the socket closed early (None: it did not)

    # -- derived ---------------------------------------------------------------------------------
    @property
    def first_send(self) -> float | None:
        return self.chunk_sends[0] if self.chunk_sends else None

    @property
    def text(self) -> str:
        """The concatenation of the deltas (must equal ``done_text``)."""
        return "".join(d for _, d in self.deltas)

    @property
    def first_delta_time(self) -> float | None:
        """Arrival of the first non-empty delta."""
        return next((t for t, d in self.deltas if d), None)

    @property
    def time_to_first_delta(self) -> float | None:
        """First non-empty delta's arrival minus the first append's send time."""
        if self.first_delta_time is None or self.first_send is None:
            return None
        return self.first_delta_time - self.first_send

    @property
    def final_latency(self) -> float | None:
        """``transcription.done`` arrival minus the time ``final: true`` was sent."""
        if self.done_time is None or self.final_sent is None:
            return None
        return self.done_time - self.final_sent

    @property
    def send_slip(self) -> list[float]:
        """How late each chunk went out compared with its schedule (0 for unpaced streams)."""
        return [s - d for s, d in zip(self.chunk_sends, self.chunk_schedule)]

    @property
    def ok(self) -> bool:
        return self.done_text is not None and not self.errors and self.closed is None

    def chunk_send_time(self, t: float) -> float:
        """Send time of the chunk that holds audio time ``t`` (seconds into the stream)."""
        k = int(np.floor(t / self.chunk_s + 1e-9))
        return self.chunk_sends[min(max(k, 0), len(self.chunk_sends) - 1)]

    def as_dict(self) -> dict:
        """Everything, times relative to the first append (JSON-friendly)."""
        t0 = self.first_send or 0.0

        def rel(t):
            return None if t is None else round(t - t0, 4)

        return {
            "session_id": self.session_id, "audio_s": self.audio_s, "chunk_s": self.chunk_s,
            "deltas": [[rel(t), d] for t, d in self.deltas], "done_text": self.done_text,
            "done_time": rel(self.done_time), "final_sent": rel(self.final_sent),
            "chunk_sends": [rel(t) for t in self.chunk_sends], "usage": self.usage,
            "errors": [{**e, "time": rel(e["time"])} for e in self.errors], "closed": self.closed,
        }


class StreamError(RuntimeError):
    """The stream could not start: the socket closed or the model was refused before ``session.updated``."""


# errors that answer the session.update of stream_audio (it sends nothing else before session.updated)
_UPDATE_REFUSALS = ("model_not_found", "invalid_event", "processing_error", "server_busy")


async def stream_audio(
    url: str,
    audio: np.ndarray | bytes,
    model: str,
    *,
    speed: float = 1.0,
    chunk_s: float = CHUNK_S,
    final: bool = True,
    language: str | None = None,
    done_timeout: float = 120.0,
    connect_timeout: float = 30.0,
    headers: dict | None = None,
) -> StreamRecord:
    """Stream ``audio`` (float32 in [-1, 1], int16, or PCM16 bytes; 16 kHz mono) as one utterance.

    ``speed``: 1.0 real time (chunk ``k`` is sent at ``t0 + k * chunk_s / speed``, see
    :meth:`RealtimeClient.stream`), 0 as fast as possible.  After the last chunk,
    ``commit(final=true)`` (unless ``final`` is false) and wait up to ``done_timeout`` s for
    ``transcription.done`` or a ``processing_error`` (which replaces ``done``).  Events are read by
    a task of their own while chunks go out, so every arrival is timestamped as it comes.
    Protocol errors are recorded, never raised; a failure to connect or to validate the model
    raises :class:`StreamError` (or the connection's own exception).
    """
    pcm = to_pcm16(audio)
    record = StreamRecord(chunk_s=chunk_s, audio_s=len(pcm) / BYTES_PER_SECOND)
    finished = asyncio.Event()
    validated: asyncio.Future = asyncio.get_running_loop().create_future()

    def on_event(event: dict, now: float) -> None:
        kind = event.get("type")
        if kind == "transcription.delta":
            record.deltas.append((now, event.get("delta") or ""))
        elif kind == "transcription.done":
            record.done_text, record.done_time, record.usage = event.get("text"), now, event.get("usage")
            finished.set()
        elif kind == "session.created":
            record.session_id = event.get("id")
        elif kind == "session.updated":
            if not validated.done():
                validated.set_result(event)
        elif kind == "error":
            code = event.get("code")
            record.errors.append({"time": now, "code": code, "error": event.get("error")})
            if not validated.done() and code in _UPDATE_REFUSALS:
                validated.set_exception(StreamError(f"{code}: {event.get('error')}"))
            elif record.final_sent is not None and code == "processing_error":
                finished.set()  # replaces transcription.done for this utterance

    async with await RealtimeClient.connect(url, expect_created=False, open_timeout=connect_timeout,
                                            ping_interval=None, compression=None,
                                            additional_headers=headers) as client:

        async def receive() -> None:
            try:
                while True:
                    event = await client.recv(timeout=None)
                    on_event(event, time.perf_counter())
            except ConnectionClosed as exc:
                record.closed = f"closed: {exc}"
            except (AssertionError, ValueError) as exc:  # a binary frame, or one that is not JSON
                record.closed = f"unreadable frame: {exc}"
            finally:  # the socket is gone (or the stream is over and this task cancelled)
                if not validated.done():
                    validated.set_exception(StreamError(record.closed or "socket closed"))
                finished.set()

        def sent(due: float, at: float) -> None:
            record.chunk_schedule.append(due)
            record.chunk_sends.append(at)

        receiver = asyncio.create_task(receive())
        try:
            record.connected = time.perf_counter()
            await client.update(model, wait=False, **({"language": language} if language else {}))
            await asyncio.wait_for(validated, connect_timeout)
            await client.commit()
            # final goes right after the last append, as vLLM's client sends it
            await client.stream(pcm, chunk_s, chunk_s / speed if speed > 0 else 0.0, wait_out=False,
                                stop=lambda: record.closed is not None, on_send=sent)
            if final and record.closed is None:
                await client.commit(final=True)
                record.final_sent = time.perf_counter()
                try:
                    await asyncio.wait_for(finished.wait(), done_timeout)
                except TimeoutError:
                    record.errors.append({"time": time.perf_counter(), "code": "client_timeout",
                                          "error": f"no transcription.done within {done_timeout} s"})
        except ConnectionClosed as exc:
            record.closed = record.closed or f"closed: {exc}"
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)
    return record


# -- machine description -----------------------------------------------------------------------------

def machine() -> dict:
    """CPU model and core count of this machine (where the client, and a started server, run)."""
    cpu = None
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"cpu": cpu or "unknown", "cores": os.cpu_count(), "usable_cores": usable,
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
