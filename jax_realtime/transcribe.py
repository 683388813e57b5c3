"""Long-form transcription on the engine: audio of any length, many files at once.

Stitching: Whisper's own seek loop, as openai-whisper and faster-whisper run it.  Each window is
30 s of audio from the current position; the window's complete segments are kept, and the next
window starts where the last complete segment ended (or at the window's end when Whisper closed
it with a single timestamp).  The text so far conditions the next window (``<|startofprev|>``).
Why this and not overlapping chunks with strides (whisper-jax): see
``scripts/bench_batch.py``/the long-form issue's note — on this project's eval audio the seek loop
gives the lower WER; a file's windows are sequential, so the batch is filled with windows of
*different files* instead.

The loop is a pure state machine, :class:`LongForm`: it says which :class:`DecodeRequest` it needs
next and takes the engine's results, so the same code runs

* synchronously over many files (:func:`transcribe_batch`: one engine call per round, one window
  of every unfinished file per round), and
* asynchronously through the service's shared batcher (:func:`transcribe_async`, used by REST).

Guards users expect from Whisper: a window whose no-speech probability is above 0.6 (with an
average log-probability below -1) is skipped as silence; a window whose output is repetitive
(gzip compression ratio above 2.4) or unlikely (average log-probability below -1) is decoded again
at the next temperature of ``temperatures`` (0.0, 0.2, ..., 1.0), keeping the best attempt if all
fail; text decoded at a temperature above 0.5 does not condition the next window.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Awaitable, Callable, Iterable, Sequence

import numpy as np

from .audio import CHUNK_LENGTH, HOP_LENGTH, SAMPLE_RATE, AudioError, decode_audio
from .decoding import COMPRESSION_RATIO_THRESHOLD
from .engine import DecodeRequest, DecodeResult, Engine

FRAMES_PER_WINDOW = CHUNK_LENGTH * SAMPLE_RATE // HOP_LENGTH  # 3000 mel frames = 30 s


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # None: detected on the first window (multilingual models)
    task: str = "transcribe"
    # Decode in timestamp mode.  Audio longer than one window always is (the seek loop needs
    # timestamps); a clip that fits one window may be decoded without them.
    timestamps: bool = True
    initial_prompt: str | None = None
    condition_on_previous_text: bool = True
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    prompt_reset_on_temperature: float = 0.5
    seed: int = 0


@dataclasses.dataclass
class TranscriptSegment:
    id: int
    seek: int  # mel frame of the window the segment came from
    start: float  # seconds from the start of the audio
    end: float
    text: str
    tokens: list[int]  # the segment's ids, timestamps included
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


@dataclasses.dataclass
class Transcript:
    text: str
    segments: list[TranscriptSegment]
    language: str
    duration: float
    windows: int  # engine calls made, fallbacks included
    prompt_tokens: int
    completion_tokens: int


class LongForm:
    """Whisper's seek loop over one audio, as a state machine (no engine calls in here)."""

    def __init__(self, engine: Engine, audio: np.ndarray, options: TranscribeOptions):
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono (1-D), got shape {audio.shape}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.audio = np.asarray(audio, np.float32)
        self.options = options
        self.language = options.language
        if self.language is not None or not engine.dims.multilingual:
            self.tokenizer.sot_sequence(self.language, options.task)  # validate now, not mid-file
        self.frames = len(self.audio) // HOP_LENGTH
        self.timestamps = options.timestamps or len(self.audio) > CHUNK_LENGTH * SAMPLE_RATE
        self.seek = 0
        self.segments: list[TranscriptSegment] = []
        initial = options.initial_prompt
        self._all_tokens: list[int] = self.tokenizer.encode(" " + initial.strip()) if initial else []
        self._prompt_reset_since = 0
        self._attempts: list[DecodeResult] = []  # this window's attempts at successive temperatures
        self.windows = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def done(self) -> bool:
        return self.seek >= self.frames

    def _window(self) -> tuple[np.ndarray, int]:
        size = min(FRAMES_PER_WINDOW, self.frames - self.seek)
        start = self.seek * HOP_LENGTH
        return self.audio[start: start + size * HOP_LENGTH], size

    def next_request(self) -> DecodeRequest:
        """The request for the current window (at the next temperature after a failed attempt)."""
        audio, _ = self._window()
        temperature = self.options.temperatures[len(self._attempts)]
        prompt = self._all_tokens[self._prompt_reset_since:]
        # A file longer than one window is decoded in Whisper's full 30 s windows: a shorter
        # encoder window with a previous-text prompt often places no timestamps at all.
        full = len(self.audio) > CHUNK_LENGTH * SAMPLE_RATE
        return DecodeRequest(
            audio, self.language, self.options.task, self.timestamps, prompt,
            temperature=temperature, seed=self.options.seed + self.seek,
            min_window_s=CHUNK_LENGTH if full else 0.0,
        )

    def _needs_fallback(self, result: DecodeResult) -> bool:
        o = self.options
        if o.no_speech_threshold is not None and o.logprob_threshold is not None and \
                result.no_speech_prob > o.no_speech_threshold and result.avg_logprob < o.logprob_threshold:
            return False  # silence: skipped below, another temperature would not help
        too_repetitive = o.compression_ratio_threshold is not None and result.compression_ratio > o.compression_ratio_threshold
        too_unlikely = o.logprob_threshold is not None and result.avg_logprob < o.logprob_threshold
        return too_repetitive or too_unlikely

    def apply(self, result: DecodeResult) -> None:
        """Take the result of :meth:`next_request`."""
        self.windows += 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.sampled_tokens
        self._attempts.append(result)
        if self._needs_fallback(result) and len(self._attempts) < len(self.options.temperatures):
            return  # the same window again, hotter
        result = self._best_attempt()
        self._attempts = []
        if self.language is None:
            self.language = result.language  # detected once, on the first window
        _, size = self._window()
        o = self.options
        if o.no_speech_threshold is not None and result.no_speech_prob > o.no_speech_threshold and \
                (o.logprob_threshold is None or result.avg_logprob < o.logprob_threshold):
            self.seek += size  # silence
            return
        duration = size * HOP_LENGTH / SAMPLE_RATE
        offset = self.seek * HOP_LENGTH / SAMPLE_RATE
        if self.timestamps:  # complete segments only: the next window starts where they end
            window_segments = [s for s in result.segments if s.complete]
            done = result.seek_s >= duration - 1e-9
            advance = size if done else max(1, round(result.seek_s * SAMPLE_RATE / HOP_LENGTH))
        else:
            window_segments, advance = result.segments, size
        for s in window_segments:
            if not s.text.strip() or (self.timestamps and s.end <= s.start):
                continue
            self.segments.append(TranscriptSegment(
                id=len(self.segments), seek=self.seek, start=round(offset + s.start, 3), end=round(offset + s.end, 3),
                text=s.text, tokens=s.raw or s.tokens, temperature=result.temperature, avg_logprob=result.avg_logprob,
                compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob,
            ))
            self._all_tokens += s.raw or s.tokens
        if not o.condition_on_previous_text or result.temperature > o.prompt_reset_on_temperature:
            self._prompt_reset_since = len(self._all_tokens)
        self.seek += advance

    def _best_attempt(self) -> DecodeResult:
        """The last attempt if it passed; else the likeliest that is not repetitive (or of all)."""
        last = self._attempts[-1]
        if not self._needs_fallback(last):
            return last
        threshold = self.options.compression_ratio_threshold
        fine = [r for r in self._attempts if threshold is None or r.compression_ratio <= threshold]
        return max(fine or self._attempts, key=lambda r: r.avg_logprob)

    def transcript(self) -> Transcript:
        return Transcript(
            text="".join(s.text for s in self.segments).strip(),
            segments=self.segments,
            language=self.language or "en",
            duration=len(self.audio) / SAMPLE_RATE,
            windows=self.windows,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )


def transcribe_batch(engine: Engine, audios: Sequence[np.ndarray], options: TranscribeOptions,
                     on_window: Callable[[int, LongForm], None] | None = None) -> list[Transcript]:
    """Transcribe many audios together: each round decodes the next window of every unfinished
    one in a single ``engine.decode`` call (which batches them by window bucket)."""
    jobs = [LongForm(engine, a, options) for a in audios]
    while active := [(i, j) for i, j in enumerate(jobs) if not j.done]:
        results = engine.decode([j.next_request() for _, j in active])
        for (i, job), result in zip(active, results):
            job.apply(result)
            if on_window is not None:
                on_window(i, job)
    return [j.transcript() for j in jobs]


async def transcribe_async(submit: Callable[[DecodeRequest], Awaitable[DecodeResult]], engine: Engine,
                           audio: np.ndarray, options: TranscribeOptions,
                           on_segments: Callable[[list[TranscriptSegment]], Awaitable[None]] | None = None) -> Transcript:
    """One audio through an async ``submit`` (the service's batcher); ``on_segments`` is awaited
    with the segments each window adds (for streaming responses)."""
    job = LongForm(engine, audio, options)
    while not job.done:
        before = len(job.segments)
        job.apply(await submit(job.next_request()))
        if on_segments is not None and len(job.segments) > before:
            await on_segments(job.segments[before:])
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
        return out


def transcribe_files(engine: Engine, paths: Iterable[str | os.PathLike], options: TranscribeOptions) -> list[FileResult]:
    """Decode and transcribe every file; one that cannot be read gets an ``error`` and the rest go on."""
    files = [os.fspath(p) for p in paths]
    out = [FileResult(f) for f in files]
    audios, owners = [], []
    for i, path in enumerate(files):
        try:
            audios.append(decode_audio(path))
            owners.append(i)
        except AudioError as exc:
            out[i].error = str(exc)
    for i, transcript in zip(owners, transcribe_batch(engine, audios, options) if audios else []):
        out[i].transcript = transcript
    return out
