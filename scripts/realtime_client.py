"""Client helpers for ``/v1/realtime``, shared by the benchmark, the streaming evaluation and the tests.

* :func:`stream_audio` streams one array of audio over one socket, as one utterance, and records
  what happened and when: ``session.update``, ``input_audio_buffer.commit``, 100 ms appends
  (base64 PCM16 LE, 16 kHz), ``commit`` with ``final: true``, then reads until
  ``transcription.done``.  Appends are sent either at real-time pace (chunk ``k`` at
  ``t0 + k * chunk_s``, scheduled from ``t0`` so the pace does not drift), at a multiple of real
  time (``speed``), or as fast as the socket takes them (``speed=0``).
* :class:`ServerProcess` starts ``jax-realtime serve --config FILE --port <free port>`` in a
  subprocess, waits for ``GET /health``, and kills it on exit (context manager, and ``atexit``).
* :func:`read_health` reads ``GET /health`` (``compile`` = compilation counters, ``sessions``).

Every time is ``time.perf_counter()`` of this process, in seconds; the record's fields are
relative to nothing (subtract ``first_send``).  A receive time is taken when the client's event
loop reads the frame, so a busy client process adds to every latency it measures: keep the
client light (one process, no decoding) and look at ``send_slip`` (how late chunks went out
compared with their schedule).

Importable from scripts and tests::

    sys.path.insert(0, "scripts"); from realtime_client import ServerProcess, stream_audio
"""

from __future__ import annotations

import asyncio
import atexit
import base64
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

import numpy as np

SAMPLE_RATE = 16000
CHUNK_S = 0.1  # 100 ms appends: 1600 samples, 3200 bytes of PCM16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def chunk_pcm(pcm: bytes, chunk_s: float = CHUNK_S) -> list[bytes]:
    size = 2 * round(chunk_s * SAMPLE_RATE)
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


# -- one stream --------------------------------------------------------------------------------------

@dataclasses.dataclass
class StreamRecord:
    """What one streamed utterance produced, with ``time.perf_counter()`` timestamps."""

    session_id: str | None = None
    chunk_s: float = CHUNK_S
    audio_s: float = 0.0
    connected: float | None = None  # socket open and session.created read
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
    pass


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

    ``speed``: 1.0 real time (chunk ``k`` is sent at ``t0 + k * chunk_s / speed``; sleeping to an
    absolute schedule, so late chunks are followed by catch-up ones and the pace never drifts),
    0 as fast as possible.  After the last chunk, ``commit(final=true)`` (unless ``final`` is
    false) and wait up to ``done_timeout`` s for ``transcription.done`` or a ``processing_error``
    (which replaces ``done``).  Protocol errors are recorded, never raised; a failure to connect
    or to validate the model raises :class:`StreamError`.
    """
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    pcm = to_pcm16(audio)
    chunks = chunk_pcm(pcm, chunk_s)
    record = StreamRecord(chunk_s=chunk_s, audio_s=len(pcm) / 2 / SAMPLE_RATE)
    finished = asyncio.Event()
    validated: asyncio.Future = asyncio.get_running_loop().create_future()

    async with connect(url, open_timeout=connect_timeout, ping_interval=None, max_size=None,
                       additional_headers=headers, compression=None) as ws:

        async def receive() -> None:
            try:
                async for message in ws:
                    now = time.perf_counter()
                    event = json.loads(message)
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
                        record.errors.append({"time": now, "code": event.get("code"), "error": event.get("error")})
                        if not validated.done() and event.get("code") in ("model_not_found", "invalid_event",
                                                                          "processing_error", "server_busy"):
                            validated.set_exception(StreamError(f"{event.get('code')}: {event.get('error')}"))
                        elif record.final_sent is not None and event.get("code") == "processing_error":
                            finished.set()  # replaces transcription.done for this utterance
            except ConnectionClosed as exc:
                record.closed = f"closed: {exc}"
            finally:
                if record.closed is None and not finished.is_set():
                    record.closed = "closed by the server"
                if not validated.done():
                    validated.set_exception(StreamError(record.closed or "socket closed"))
                finished.set()

        receiver = asyncio.create_task(receive())
        try:
            record.connected = time.perf_counter()
            session = {"type": "session.update", "model": model}
            if language:
                session["language"] = language
            await ws.send(json.dumps(session))
            await asyncio.wait_for(validated, connect_timeout)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))

            interval = chunk_s / speed if speed > 0 else 0.0
            t0 = time.perf_counter()
            for k, chunk in enumerate(chunks):
                due = t0 + k * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if finished.is_set() and record.closed:
                    break
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(chunk).decode("ascii")}))
                record.chunk_sends.append(time.perf_counter())
                record.chunk_schedule.append(due if interval else record.chunk_sends[-1])
                if not interval:
                    await asyncio.sleep(0)  # let the receiver timestamp what arrived
            if final and record.closed is None:
                await ws.send(json.dumps({"type": "input_audio_buffer.commit", "final": True}))
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


# -- the server --------------------------------------------------------------------------------------

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
    return int(health.get("compile", {}).get("compilations", 0))


def _serve_command() -> list[str]:
    script = shutil.which("jax-realtime", path=os.path.dirname(sys.executable)) or shutil.which("jax-realtime")
    if script:
        return [script]
    return [sys.executable, "-m", "server.cli"]


class ServerProcess:
    """``jax-realtime serve`` in a subprocess on a free port, ready once ``/health`` answers.

    Use as a context manager (sync)::

        with ServerProcess("configs/cpu-tiny.toml") as server:
            record = asyncio.run(stream_audio(server.ws_url, audio, server.model))

    The server's output goes to ``log_path`` (a temporary file by default; :meth:`log_tail`).
    The process is terminated (SIGTERM, then SIGKILL) on ``stop()``, on exit of the ``with``
    block and at interpreter exit.
    """

    def __init__(self, config: str | os.PathLike, *, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: list[str] | None = None, log_path: str | None = None,
                 startup_timeout: float = 900.0, env: dict | None = None):
        self.config = os.path.abspath(os.fspath(config))  # the server runs in the repository root
        self.host = host
        self.port = port or free_port(host)
        self.extra_args = list(extra_args or [])
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.health: dict = {}
        self.startup_s: float | None = None
        self._log = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/realtime"

    @property
    def model(self) -> str:
        """A model name the server accepts (the first of /health's ``models``)."""
        return (self.health.get("models") or [self.health.get("model")])[0]

    def start(self) -> ServerProcess:
        if self.log_path is None:
            fd, self.log_path = tempfile.mkstemp(prefix="jax-realtime-serve-", suffix=".log")
            os.close(fd)
        self._log = open(self.log_path, "ab")
        command = _serve_command() + ["serve", "--config", self.config, "--host", self.host,
                                      "--port", str(self.port), *self.extra_args]
        env = {**os.environ, **(self.env or {})}
        started = time.perf_counter()
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)
        atexit.register(self.stop)
        deadline = started + self.startup_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            try:
                self.health = read_health(self.http_url, timeout=5.0)
                break
            except (urllib.error.URLError, ConnectionError, OSError, ValueError):
                pass
            if time.perf_counter() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not answer /health within {self.startup_timeout} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - started
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_tail(self, chars: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - chars))
                return f.read().decode("utf-8", "replace")
        except (OSError, TypeError):
            return ""

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def model_of(url: str) -> str:
    """A model name the server at ``url`` accepts (from /health)."""
    health = read_health(url)
    return (health.get("models") or [health.get("model")])[0]


# -- machine description --------------------------------------------------------------------------

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
    info = {"cpu": cpu or "unknown", "cores": os.cpu_count(), "usable_cores": usable,
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    return info
