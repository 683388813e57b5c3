"""Helpers for the end-to-end tests of ``/v1/realtime``: a real server process and a small client.

No mocks: :class:`ServerProcess` starts ``jax-realtime serve`` (or Hypercorn on ``create_app()``)
as a child process on a free local port and waits for ``GET /health``; :class:`RealtimeClient`
speaks the wire protocol over a ``websockets`` connection.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

SAMPLE_RATE = 16_000
BYTES_PER_SECOND = 2 * SAMPLE_RATE


# ------------------------------------------------------------------------------------ audio


def pcm16(samples: np.ndarray) -> bytes:
    """float32 [-1, 1] mono 16 kHz -> PCM16 little-endian bytes."""
    clipped = np.clip(np.asarray(samples, np.float32), -1.0, 1.0)
    return (clipped * 32767.0).round().astype("<i2").tobytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def chunks(pcm: bytes, chunk_s: float = 0.1) -> list[bytes]:
    """Split PCM16 bytes into appends of ``chunk_s`` seconds (even byte counts)."""
    size = max(2, int(round(chunk_s * SAMPLE_RATE)) * 2)
    return [pcm[i : i + size] for i in range(0, len(pcm), size)]


# ------------------------------------------------------------------------------------ server


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def venv_script(name: str) -> str:
    """A console script installed next to the running interpreter (the project's virtualenv)."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    import shutil

    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"console script {name!r} not found next to {sys.executable} nor on PATH")
    return found


class ServerError(RuntimeError):
    pass


class ServerProcess:
    """A server child process on ``127.0.0.1:port``; its output goes to ``log_path``."""

    def __init__(self, name: str, argv: list[str], port: int, log_path: Path, env: dict | None = None,
                 cwd: str | os.PathLike | None = None):
        self.name = name
        self.argv = argv
        self.port = port
        self.log_path = Path(log_path)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.baseline_compilations: int | None = None

    # -- addresses
    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    # -- life cycle
    def start(self, timeout: float = 900.0) -> "ServerProcess":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.cwd, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.name} exited with {self.proc.returncode} before serving\n"
                                  f"{self.log_tail()}")
            try:
                health = self.health(timeout=2.0)
            except (OSError, ValueError):
                time.sleep(0.5)
                continue
            self.baseline_compilations = health["compile"]["compilations"]
            return self
        self.stop()
        raise ServerError(f"{self.name} not healthy after {timeout:.0f} s\n{self.log_tail()}")

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGINT (graceful shutdown), then SIGKILL if it does not exit in ``timeout`` seconds."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return f"(no log at {self.log_path})"
        return f"--- last {lines} lines of {self.log_path} ---\n" + "\n".join(text[-lines:])

    # -- HTTP
    def health(self, timeout: float = 10.0) -> dict:
        with urllib.request.urlopen(self.http + "/health", timeout=timeout) as r:
            if r.status != 200:
                raise ValueError(f"/health answered {r.status}")
            return json.loads(r.read())

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


# ------------------------------------------------------------------------------------ client


class RealtimeClient:
    """One ``/v1/realtime`` connection; events are dicts, read in order with :meth:`recv`."""

    def __init__(self, ws: ClientConnection):
        self.ws = ws
        self.created: dict | None = None

    @classmethod
    async def connect(cls, url: str, *, expect_created: bool = True, **kwargs) -> "RealtimeClient":
        ws = await connect(url, open_timeout=30, close_timeout=5, max_size=None, **kwargs)
        client = cls(ws)
        if expect_created:
            client.created = await client.expect("session.created")
        return client

    async def __aenter__(self) -> "RealtimeClient":
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
        await self.send("session.update", model=model, **fields)
        return await self.expect("session.updated") if wait else None

    async def append(self, pcm: bytes) -> None:
        await self.send("input_audio_buffer.append", audio=b64(pcm))

    async def commit(self, final: bool = False) -> None:
        await self.send("input_audio_buffer.commit", final=final)

    async def stream(self, pcm: bytes, chunk_s: float = 0.1, interval: float = 0.0) -> None:
        """Append ``pcm`` in ``chunk_s`` pieces, sleeping ``interval`` between them (0: no pause,
        but still yields to the loop; ``chunk_s``: real-time pace)."""
        start = time.monotonic()
        for i, piece in enumerate(chunks(pcm, chunk_s)):
            await self.append(piece)
            if interval:
                # Pace against the clock so that sends do not drift behind real time.
                delay = start + (i + 1) * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            else:
                await asyncio.sleep(0)

    # -- receiving
    async def recv(self, timeout: float = 60.0) -> dict:
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

    async def transcribe(self, pcm: bytes, chunk_s: float = 0.1, interval: float = 0.0,
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
    """Run a coroutine to completion in a fresh event loop (pytest has no asyncio plugin here)."""

    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())
