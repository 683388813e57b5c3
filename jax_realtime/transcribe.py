"""Long-form transcription on the engine: the drivers of ``longform.py``'s window policy, and files.

The loop is a state machine per audio (``longform.LongForm`` for ``seek``, ``longform.Chunked``
for ``chunked``; the strategies, the decision between them and Whisper's guards are described
there): it says which :class:`DecodeRequest` objects it needs next and takes the engine's
results, so the same code runs

* synchronously over many files (:func:`run_jobs`, :func:`transcribe_batch`: one engine call per
  round with the pending windows of every unfinished file), and
* asynchronously through the service's shared batcher (:func:`transcribe_async`, used by REST).

Under ``jax.distributed`` :func:`run_jobs` keeps the processes in lockstep: each decodes its own
files, and all of them keep calling the engine (with an empty batch when they have nothing left)
until every process is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from typing import Any, Awaitable, Callable, Iterable, Iterator, Sequence

import numpy as np

from . import sharding
from .alignment import WordTiming
from .audio import AudioError, decode_audio
from .engine import DecodeRequest, DecodeResult, Engine
from .longform import Job, Transcript, TranscribeOptions, TranscriptSegment, check_options, make_job


# -- drivers ---------------------------------------------------------------------------------------

def run_jobs(engine: Engine, sources: Iterable[tuple[Any, np.ndarray | Exception]], options: TranscribeOptions,
             max_rows: int | None = None,
             on_progress: Callable[[float], None] | None = None) -> Iterator[tuple[Any, Transcript | Exception]]:
    """Transcribe audios as they come; yields ``(key, transcript)`` as each finishes.

    ``sources`` yields ``(key, audio)``, or ``(key, exception)`` for an input that could not be
    read: that is yielded back as is, and the rest go on.  It is pulled only when there is room,
    so at most about ``max_rows`` audios are in memory (None: all of them at once).  Each round
    is one ``engine.decode`` call with up to ``max_rows`` windows: one per unfinished file in
    ``seek``, as many chunks as fit in ``chunked``.  ``on_progress`` gets the seconds of audio
    finished in each round.

    Under ``jax.distributed`` every process runs this over its own sources, and all of them
    keep calling the engine until every process is done.
    """
    check_options(engine, options)
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, not {max_rows}")
    budget = max_rows if max_rows is not None else math.inf
    sources = iter(sources)
    exhausted = False
    active: list[tuple[Any, Job, float]] = []  # key, job, progress already reported
    while True:
        while not exhausted and sum(job.wants() for _, job, _ in active) < budget:
            try:
                key, audio = next(sources)
            except StopIteration:
                exhausted = True
                break
            if isinstance(audio, Exception):
                yield key, audio
                continue
            try:
                active.append((key, make_job(engine, audio, options), 0.0))
            except ValueError as exc:
                yield key, exc
        if not sharding.any_process(bool(active)):
            return
        room, requests, owners = budget, [], []
        for index, (_, job, _) in enumerate(active):
            if room <= 0:
                break
            wanted = int(min(job.wants(), room))
            if wanted:
                batch = job.pending(wanted)
                requests += batch
                owners.append((index, len(batch)))
                room -= len(batch)
        results = engine.decode(requests)
        position = 0
        for index, n in owners:
            active[index][1].take(results[position:position + n])
            position += n
        still = []
        for key, job, reported in active:
            progress = job.progress_s
            if on_progress is not None and progress > reported:
                on_progress(progress - reported)
            if job.done:
                yield key, job.transcript()
            else:
                still.append((key, job, progress))
        active = still


def default_rows(engine: Engine) -> int:
    """Windows per round for file transcription: twice the largest batch, so that the windows of
    a round, grouped by encoder window, still fill whole batches."""
    return 2 * engine.local_capacity


def transcribe_batch(engine: Engine, audios: Sequence[np.ndarray], options: TranscribeOptions) -> list[Transcript]:
    """Transcribe many audios together (all in memory): each round decodes the pending windows of
    every unfinished one in a single ``engine.decode`` call (which batches them by window bucket)."""
    out: dict[int, Transcript] = {}
    for index, transcript in run_jobs(engine, enumerate(audios), options):
        if isinstance(transcript, Exception):
            raise transcript
        out[index] = transcript
    return [out[i] for i in range(len(audios))]


async def transcribe_async(submit: Callable[[DecodeRequest], Awaitable[DecodeResult]], engine: Engine,
                           audio: np.ndarray, options: TranscribeOptions,
                           on_segments: Callable[[list[TranscriptSegment]], Awaitable[None]] | None = None) -> Transcript:
    """One audio through an async ``submit`` (the service's batcher); ``on_segments`` is awaited
    with the segments each round adds (for streaming responses; ``chunked`` has them all at the end)."""
    job = make_job(engine, audio, options)
    sent = 0
    while not job.done:
        requests = job.pending(max(job.wants(), 1))
        job.take(list(await asyncio.gather(*(submit(r) for r in requests))))
        segments = job.segments
        if on_segments is not None and len(segments) > sent:
            await on_segments(segments[sent:])
            sent = len(segments)
    return job.transcript()


# -- files -----------------------------------------------------------------------------------------

@dataclasses.dataclass
class FileResult:
    file: str
    transcript: Transcript | None = None
    error: str | None = None

    def as_dict(self, timestamps: bool) -> dict:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        t = self.transcript
        out = {
            "file": self.file,
            "text": t.text,
            "language": t.language,
            "duration_s": round(t.duration, 3),
            "tokens": [tok for s in t.segments for tok in s.tokens],
        }
        if timestamps:
            out["segments"] = [{"start": s.start, "end": s.end, "text": s.text.strip()} for s in t.segments]
        if t.words is not None:
            out["words"] = [word_dict(w) for w in t.words]
        return out


def word_dict(w: WordTiming) -> dict:
    """A word as OpenAI's verbose_json has it (the text without its leading space), with faster-whisper's
    ``probability``."""
    return {"word": w.word.strip(), "start": w.start, "end": w.end, "probability": round(w.probability, 4)}


def read_files(paths: Iterable[str | os.PathLike]) -> Iterator[tuple[str, np.ndarray | AudioError]]:
    """``(path, audio)`` for each file, decoded only when pulled; ``(path, AudioError)`` if unreadable."""
    for path in paths:
        path = os.fspath(path)
        try:
            yield path, decode_audio(path)
        except AudioError as exc:
            yield path, exc


def transcribe_files(engine: Engine, paths: Iterable[str | os.PathLike], options: TranscribeOptions,
                     max_rows: int | None = None) -> list[FileResult]:
    """Decode and transcribe every file; one that cannot be read gets an ``error`` and the rest go on.

    Files are read as room frees up (at most about ``max_rows`` in memory; default:
    :func:`default_rows`)."""
    files = [os.fspath(p) for p in paths]
    out = [FileResult(f) for f in files]
    keyed = ((i, audio) for i, (_, audio) in enumerate(read_files(files)))
    for i, transcript in run_jobs(engine, keyed, options, max_rows or default_rows(engine)):
        if isinstance(transcript, Exception):
            out[i].error = str(transcript)
        else:
            out[i].transcript = transcript
    return out
