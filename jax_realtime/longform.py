"""Long-form transcription's window policy: audio of any length as a sequence of 30 s windows.

Two ways to stitch 30 s windows into one transcript (``TranscribeOptions.strategy``):

* ``"seek"``: Whisper's own loop, as openai-whisper and faster-whisper run it.  Each window is
  30 s of audio from the current position; the window's complete segments are kept, and the next
  window starts where the last complete segment ended (or at the window's end when Whisper closed
  it with a single timestamp).  The text so far conditions the next window (``<|startofprev|>``).
  A file's windows are sequential, so the batch is filled with windows of *different files*.
* ``"chunked"``: whisper-jax / the Hugging Face pipeline: 30 s chunks every ``30 - 2 * stride``
  seconds (5 s of overlap on each side by default), decoded independently, so every chunk of a
  file can share one batch; neighbouring chunks' text tokens are merged where they agree best
  (the pipeline's longest-common-sequence merge, cutting in the middle of the overlap).

Each is a state machine per audio (:class:`LongForm` for ``seek``, :class:`Chunked` for
``chunked``): it says which :class:`DecodeRequest` objects it needs next and takes the engine's
results, and runs nothing itself (no engine call, no I/O), so the drivers of ``transcribe.py`` run
it synchronously over many files or asynchronously through the service's batcher.

Decision: ``seek`` is the default.  Measured with ``scripts/eval_longform.py`` (tiny.en, float32,
default buckets, 2-core CPU shared with other jobs, so speeds are indicative; WER normalised with
Whisper's English normaliser; the stream is the 116 Hi-Fi TTS clips of the eval set back to back):

=============================  ============================  ============================
                               5-min stream (298 s)          1-hour file (stream x 12)
=============================  ============================  ============================
clips one by one (baseline)    WER 8.73 %, 8.8x realtime
seek                           WER 6.57 %, 11.8x / 14.2x     WER 6.51 %, 19.5x, 133 windows
chunked, stride 5 s            WER 6.14 %, 17.0x / 19.4x     WER 7.76 %, 22.7x, 181 windows
chunked, stride 2.5 s          WER 12.18 %, 19.0x
=============================  ============================  ============================

(two runs of the 5-minute stream, same process per run.)  Eight copies of the 5-minute stream as
eight files at once (``--files 8``): seek 32.3x realtime (88 windows), chunked 25.9x (120
windows), WER as above.  Why ``seek``:

* accuracy: on the hour, where merge failures have room to show, chunked loses 1.25 points; a
  merge aligns the two chunks' tokens only, and when a chunk's end is transcribed differently (or
  not at all: Whisper often stops before a cut-off sentence) it can align wrongly and drop text
  (stride 2.5 s: one merge dropped ~20 s of speech); seek keeps the model's own timestamps where
  chunked interpolates them inside merged segments;
* speed where it counts: chunked is faster only while one file cannot fill the batch on its own
  (its chunks share a batch; +16 % on the hour, +35-45 % on 5 minutes), at the price of 1.36x the
  windows (overlaps); with many files, seek fills the batch with other files' windows and does
  less work (32.3x against 25.9x on eight files);
* seek's segments come in order, window by window (the REST API streams them).

``--strategy chunked`` stays for a single long file when speed matters more than the last point
of WER.  Also tried: cutting a long file at its quietest moments into parts of 40-100 s that run
the seek loop side by side (a file fills the batch without overlap): no faster on the hour
(180 windows: the parts' short tail windows) and worse (WER 9.65 % at 40 s, 12.26 % at 60 s,
parts starting without context), so it was dropped.

Guards users expect from Whisper (both strategies): a window whose no-speech probability is above
0.6 (with an average log-probability below -1) is skipped as silence; a window whose output is
repetitive (gzip compression ratio above 2.4) or unlikely (average log-probability below -1) is
decoded again at the next temperature of ``temperatures`` (0.0, 0.2, ..., 1.0), keeping the best
attempt if all fail; in ``seek``, text decoded at a temperature above 0.5 does not condition the
next window.

Word timestamps (``TranscribeOptions.word_timestamps``, ``seek`` only; the engine must have them
enabled): each window's words (``alignment.py``) are handed to its segments with Whisper's
heuristics and shifted by the window's offset, and, as openai-whisper and faster-whisper do, a
window that did not end with a single timestamp is followed from the end of its last word rather
than from its last timestamp.  Segments then start at their first word and end at their last.

The drivers that run these state machines on the engine are in ``transcribe.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from .alignment import SegmentSpan, WordTiming, segment_words
from .audio import CHUNK_LENGTH, FRAMES_PER_SECOND, HOP_LENGTH, SAMPLE_RATE
from .engine import DecodeRequest, DecodeResult, Engine
from .thresholds import COMPRESSION_RATIO_THRESHOLD, LOGPROB_THRESHOLD, NO_SPEECH_THRESHOLD, TEMPERATURES

FRAMES_PER_WINDOW = CHUNK_LENGTH * SAMPLE_RATE // HOP_LENGTH  # 3000 mel frames = 30 s
STRATEGIES = ("seek", "chunked")


@dataclasses.dataclass(frozen=True)
class TranscribeOptions:
    language: str | None = None  # None: detected on the first window (multilingual models)
    task: str = "transcribe"
    # Decode in timestamp mode.  Audio longer than one window always is (stitching needs
    # timestamps); a clip that fits one window may be decoded without them.
    timestamps: bool = True
    initial_prompt: str | None = None
    condition_on_previous_text: bool = True  # seek only: chunks are decoded independently
    temperatures: tuple[float, ...] = TEMPERATURES
    compression_ratio_threshold: float | None = COMPRESSION_RATIO_THRESHOLD
    logprob_threshold: float | None = LOGPROB_THRESHOLD
    no_speech_threshold: float | None = NO_SPEECH_THRESHOLD
    prompt_reset_on_temperature: float = 0.5
    seed: int = 0
    strategy: str = "seek"  # see the module's docstring
    chunk_stride_s: float = 5.0  # chunked: overlap with each neighbouring chunk
    word_timestamps: bool = False  # seek only: words with start and end times in every segment

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.word_timestamps and self.strategy != "seek":
            raise ValueError("word timestamps need the seek strategy")
        if not 0 <= self.chunk_stride_s < CHUNK_LENGTH / 4:
            raise ValueError(f"chunk_stride_s must be in [0, {CHUNK_LENGTH / 4}), not {self.chunk_stride_s}")
        if not self.temperatures:
            raise ValueError("temperatures needs at least one value")


@dataclasses.dataclass
class TranscriptSegment:
    id: int
    seek: int  # mel frame of the window the segment came from
    start: float  # seconds from the start of the audio
    end: float
    text: str
    tokens: list[int]  # the segment's ids (seek: timestamps included; chunked: text tokens)
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float
    words: list[WordTiming] | None = None  # word timestamps (absolute times), when asked for


@dataclasses.dataclass
class Transcript:
    text: str
    segments: list[TranscriptSegment]
    language: str
    duration: float
    windows: int  # engine calls made, fallbacks included
    prompt_tokens: int
    completion_tokens: int

    @property
    def words(self) -> list[WordTiming] | None:
        """Every segment's words in order; None without word timestamps."""
        if not any(s.words is not None for s in self.segments):
            return None
        return [w for s in self.segments for w in s.words or []]


class _Guards:
    """Whisper's hallucination guards for one window: temperature fallback and no-speech skip."""

    def __init__(self, options: TranscribeOptions):
        self.options = options

    def is_silence(self, result: DecodeResult) -> bool:
        o = self.options
        return o.no_speech_threshold is not None and result.no_speech_prob > o.no_speech_threshold and \
            (o.logprob_threshold is None or result.avg_logprob < o.logprob_threshold)

    def needs_fallback(self, result: DecodeResult) -> bool:
        o = self.options
        if o.logprob_threshold is not None and self.is_silence(result):
            return False  # silence: skipped, another temperature would not help
        too_repetitive = o.compression_ratio_threshold is not None and result.compression_ratio > o.compression_ratio_threshold
        too_unlikely = o.logprob_threshold is not None and result.avg_logprob < o.logprob_threshold
        return too_repetitive or too_unlikely

    def retry(self, attempts: list[DecodeResult]) -> bool:
        """Decode the window again at the next temperature?"""
        return self.needs_fallback(attempts[-1]) and len(attempts) < len(self.options.temperatures)

    def best(self, attempts: list[DecodeResult]) -> DecodeResult:
        """The last attempt if it passed; else the likeliest that is not repetitive (or of all)."""
        last = attempts[-1]
        if not self.needs_fallback(last):
            return last
        threshold = self.options.compression_ratio_threshold
        fine = [r for r in attempts if threshold is None or r.compression_ratio <= threshold]
        return max(fine or attempts, key=lambda r: r.avg_logprob)


class Job:
    """What the drivers need of a strategy: requests to run, results to take, the transcript."""

    def __init__(self, engine: Engine, audio: np.ndarray, options: TranscribeOptions):
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be mono (1-D), got shape {audio.shape}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.audio = audio
        self.options = options
        self.guards = _Guards(options)
        self.language = options.language
        if self.language is not None or not engine.dims.multilingual:
            self.tokenizer.sot_sequence(self.language, options.task)  # validate now, not mid-file
        self.long = len(audio) > CHUNK_LENGTH * SAMPLE_RATE
        self.timestamps = options.timestamps or self.long
        self.initial_prompt: list[int] = self.tokenizer.encode_prompt(options.initial_prompt)
        self.windows = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLE_RATE

    def request(self, audio: np.ndarray, prompt: Sequence[int], temperature: float, seed: int) -> DecodeRequest:
        # Audio longer than one window is decoded in Whisper's full 30 s windows: a shorter encoder
        # window with a previous-text prompt often places no timestamps at all.
        return DecodeRequest(audio, self.language, self.options.task, self.timestamps, prompt,
                             temperature=temperature, seed=seed, min_window_s=CHUNK_LENGTH if self.long else 0.0,
                             word_timestamps=self.options.word_timestamps)

    def count(self, result: DecodeResult) -> None:
        self.windows += 1
        self.prompt_tokens += result.prompt_tokens
        self.completion_tokens += result.sampled_tokens

    def segment(self, seek: int, start: float, end: float, text: str, tokens: list[int],
                result: DecodeResult, words: list[WordTiming] | None = None) -> TranscriptSegment:
        return TranscriptSegment(
            id=0, seek=seek, start=round(start, 3), end=round(end, 3), text=text, tokens=tokens,
            temperature=result.temperature, avg_logprob=result.avg_logprob,
            compression_ratio=result.compression_ratio, no_speech_prob=result.no_speech_prob, words=words,
        )

    # the interface the drivers use
    done: bool
    segments: list[TranscriptSegment]

    def wants(self) -> int:
        """Requests this job could run now."""
        raise NotImplementedError

    def pending(self, limit: int) -> list[DecodeRequest]:
        """Up to ``limit`` (at least 1) requests; their results go to :meth:`take`, in order."""
        raise NotImplementedError

    def take(self, results: list[DecodeResult]) -> None:
        raise NotImplementedError

    @property
    def progress_s(self) -> float:
        """Seconds of the audio decoded for good."""
        raise NotImplementedError

    def transcript(self) -> Transcript:
        segments = self.segments
        for i, s in enumerate(segments):
            s.id = i
        return Transcript(
            text="".join(s.text for s in segments).strip(),
            segments=segments,
            language=self.language or "en",
            duration=self.duration,
            windows=self.windows,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
        )


class LongForm(Job):
    """Whisper's seek loop over one audio, as a state machine (no engine calls in here)."""

    def __init__(self, engine: Engine, audio: np.ndarray, options: TranscribeOptions):
        super().__init__(engine, audio, options)
        self.frames = len(self.audio) // HOP_LENGTH
        self.seek = 0
        self.segments: list[TranscriptSegment] = []
        self._all_tokens: list[int] = list(self.initial_prompt)
        self._prompt_reset_since = 0
        self._attempts: list[DecodeResult] = []  # this window's attempts at successive temperatures
        self._last_speech = 0.0  # word timestamps: where the speech of the windows so far ended

    @property
    def done(self) -> bool:
        return self.seek >= self.frames

    @property
    def progress_s(self) -> float:
        return min(self.seek, self.frames) * HOP_LENGTH / SAMPLE_RATE

    def _window(self) -> tuple[np.ndarray, int]:
        size = min(FRAMES_PER_WINDOW, self.frames - self.seek)
        start = self.seek * HOP_LENGTH
        return self.audio[start: start + size * HOP_LENGTH], size

    def next_request(self) -> DecodeRequest:
        """The request for the current window (at the next temperature after a failed attempt)."""
        audio, _ = self._window()
        temperature = self.options.temperatures[len(self._attempts)]
        return self.request(audio, self._all_tokens[self._prompt_reset_since:], temperature, self.options.seed + self.seek)

    def wants(self) -> int:
        return 0 if self.done else 1

    def pending(self, limit: int) -> list[DecodeRequest]:
        return [self.next_request()]

    def take(self, results: list[DecodeResult]) -> None:
        (result,) = results
        self.apply(result)

    def apply(self, result: DecodeResult) -> None:
        """Take the result of :meth:`next_request`."""
        self.count(result)
        self._attempts.append(result)
        if self.guards.retry(self._attempts):
            return  # the same window again, hotter
        result = self.guards.best(self._attempts)
        self._attempts = []
        if self.language is None:
            self.language = result.language  # detected once, on the first window
        _, size = self._window()
        o = self.options
        if self.guards.is_silence(result):
            self.seek += size
            return
        duration = size * HOP_LENGTH / SAMPLE_RATE
        offset = self.seek * HOP_LENGTH / SAMPLE_RATE
        if self.timestamps:  # complete segments only: the next window starts where they end
            window_segments = [s for s in result.segments if s.complete]
            done = result.seek_s >= duration - 1e-9
            advance = size if done else max(1, round(result.seek_s * SAMPLE_RATE / HOP_LENGTH))
        else:
            window_segments, advance = result.segments, size
        spans = [SegmentSpan(offset + s.start, offset + s.end, len(s.tokens)) for s in window_segments]
        words: list[list[WordTiming] | None] = [None] * len(spans)
        if result.words is not None:
            words, self._last_speech = segment_words(result.words, spans, offset, self._last_speech)
            tokens, begin = result.tokens, self.tokenizer.timestamp_begin
            single_ending = len(tokens) >= 2 and tokens[-2] < begin <= tokens[-1]
            if self.timestamps and not single_ending:  # go on from the end of the last word
                last_end = next((w.end for ws in reversed(words) for w in reversed(ws)), spans[-1].end if spans else None)
                if last_end is not None and last_end > offset:
                    advance = max(1, round(last_end * FRAMES_PER_SECOND) - self.seek)
        for s, span, segment_words_ in zip(window_segments, spans, words):
            if not s.text.strip() or (self.timestamps and span.end <= span.start):
                continue
            tokens = s.raw or s.tokens
            self.segments.append(self.segment(self.seek, span.start, span.end, s.text, tokens, result, segment_words_))
            self._all_tokens += tokens
        if not o.condition_on_previous_text or result.temperature > o.prompt_reset_on_temperature:
            self._prompt_reset_since = len(self._all_tokens)
        self.seek += advance


@dataclasses.dataclass
class _Token:
    """A text token of one chunk's output, with where it came from (for timestamps after merging)."""

    id: int
    chunk: int
    segment: int  # index among the chunk's segments
    position: int  # index among the segment's tokens


class Chunked(Job):
    """Overlapping 30 s chunks decoded independently, merged by longest common token sequence."""

    def __init__(self, engine: Engine, audio: np.ndarray, options: TranscribeOptions):
        super().__init__(engine, audio, options)
        window = CHUNK_LENGTH * SAMPLE_RATE
        stride = round(options.chunk_stride_s * SAMPLE_RATE)
        step = window - 2 * stride
        self.starts: list[int] = []
        for start in range(0, len(self.audio), step):
            self.starts.append(start)
            if start + window >= len(self.audio):
                break
        self._window = window
        self._attempts: list[list[DecodeResult]] = [[] for _ in self.starts]
        self._final: list[DecodeResult | None] = [None] * len(self.starts)
        self._todo: list[int] = list(range(len(self.starts)))  # chunks waiting for an (other) attempt
        self._in_flight: list[int] = []
        self._segments: list[TranscriptSegment] | None = None

    @property
    def done(self) -> bool:
        return not self._todo and not self._in_flight

    @property
    def progress_s(self) -> float:
        return self.duration * sum(f is not None for f in self._final) / max(len(self.starts), 1)

    def wants(self) -> int:
        if self.language is None and self.engine.dims.multilingual and self._final[0] is None:
            return 0 if self._in_flight else 1  # the first chunk's language is every chunk's
        return len(self._todo)

    def pending(self, limit: int) -> list[DecodeRequest]:
        n = min(limit, self.wants())
        self._in_flight, self._todo = self._todo[:n], self._todo[n:]
        requests = []
        for c in self._in_flight:
            start = self.starts[c]
            temperature = self.options.temperatures[len(self._attempts[c])]
            requests.append(self.request(self.audio[start:start + self._window], self.initial_prompt, temperature,
                                         self.options.seed + start // HOP_LENGTH))
        return requests

    def take(self, results: list[DecodeResult]) -> None:
        retry = []
        for c, result in zip(self._in_flight, results):
            self.count(result)
            self._attempts[c].append(result)
            if self.guards.retry(self._attempts[c]):
                retry.append(c)
                continue
            self._final[c] = self.guards.best(self._attempts[c])
            if self.language is None:
                self.language = self._final[c].language
        self._in_flight = []
        self._todo = retry + self._todo

    @property
    def segments(self) -> list[TranscriptSegment]:
        """The merged segments (empty until every chunk is decoded)."""
        if not self.done:
            return []
        if self._segments is None:
            self._segments = self._merge()
        return self._segments

    def _merge(self) -> list[TranscriptSegment]:
        sequences = []
        for c, result in enumerate(self._final):
            if result is None or self.guards.is_silence(result):
                sequences.append([])
                continue
            sequences.append([_Token(t, c, i, k) for i, s in enumerate(result.segments) for k, t in enumerate(s.tokens)])
        merged = longest_common_sequence(sequences, key=lambda t: t.id)
        segments: list[TranscriptSegment] = []
        previous_end = 0.0
        run: list[_Token] = []
        for i, token in enumerate(merged):
            run.append(token)
            following = merged[i + 1] if i + 1 < len(merged) else None
            if following is not None and (following.chunk, following.segment) == (token.chunk, token.segment):
                continue
            result = self._final[token.chunk]
            source = result.segments[token.segment]
            offset = self.starts[token.chunk] / SAMPLE_RATE
            n = len(source.tokens)
            span = source.end - source.start  # a run that is part of a segment gets its share of the time
            start = offset + source.start + span * run[0].position / n
            end = offset + source.start + span * (run[-1].position + 1) / n
            start = min(max(start, previous_end), self.duration)
            end = min(max(end, start), self.duration)
            ids = [t.id for t in run]
            text = self.tokenizer.decode(ids)
            if segments and not text[:1].isspace():  # the merge cut inside a word: keep the word whole
                last = segments[-1]
                ids = last.tokens + ids
                segments[-1] = self.segment(last.seek, last.start, end, self.tokenizer.decode(ids), ids, result)
                previous_end = end
            elif text.strip():
                segments.append(self.segment(self.starts[token.chunk] // HOP_LENGTH, start, end, text, ids, result))
                previous_end = end
            run = []
        return segments


def longest_common_sequence(sequences: list[list[Any]], key: Callable[[Any], Any] = lambda x: x) -> list[Any]:
    """Merge token sequences of overlapping chunks, as the Hugging Face Whisper pipeline does.

    For each neighbouring pair, slide the right sequence's start along the left sequence's end and
    take the alignment where most tokens agree (ties to longer overlaps); keep the left sequence up
    to the middle of that overlap and the right one after it.  Without an alignment of two or more
    agreeing tokens both are kept whole.
    """
    sequences = [s for s in sequences if s]
    if not sequences:
        return []
    left = list(sequences[0])
    total: list[Any] = []
    for right in sequences[1:]:
        left_keys = np.array([key(t) for t in left])
        right_keys = np.array([key(t) for t in right])
        n_left, n_right = len(left), len(right)
        best, best_indices = 0.0, (n_left, n_left, 0, 0)
        for i in range(1, n_left + n_right):
            left_start, left_stop = max(0, n_left - i), min(n_left, n_left + n_right - i)
            right_start, right_stop = max(0, i - n_left), min(n_right, i)
            matches = int(np.sum(left_keys[left_start:left_stop] == right_keys[right_start:right_stop]))
            score = matches / i + i / 10000.0  # the epsilon favours long perfect matches
            if matches > 1 and score > best:
                best, best_indices = score, (left_start, left_stop, right_start, right_stop)
        left_start, left_stop, right_start, right_stop = best_indices
        total.extend(left[:(left_start + left_stop) // 2])
        left = list(right[(right_start + right_stop) // 2:])
    total.extend(left)
    return total


def check_options(engine: Engine, options: TranscribeOptions) -> None:
    """ValueError for options the engine cannot use (an unknown language or task, word timestamps
    on an engine compiled without them)."""
    if options.language is not None or not engine.dims.multilingual:
        engine.tokenizer.sot_sequence(options.language, options.task)
    if options.word_timestamps and not engine.word_timestamps:
        raise ValueError("word timestamps are not enabled on this engine (EngineConfig.word_timestamps)")


def make_job(engine: Engine, audio: np.ndarray, options: TranscribeOptions) -> Job:
    """The state machine of ``options.strategy`` for one audio."""
    return Chunked(engine, audio, options) if options.strategy == "chunked" else LongForm(engine, audio, options)
